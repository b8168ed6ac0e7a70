"""The served version of an index: what the service opens, searches and reads.

    store.py      IndexStore: the published version CURRENT names, opened for reading
                  (open_current); every query enters here
    segmented.py  SegmentedStore: a version of several segments and deleted ids (format 2)
                  served as one, with the answers one build of its live images gives
    merging.py    the segments' facets and report sentences merged as one build holds them
    opening.py    the checks a version passes before it is served (files load, counts agree)
    search.py     the FAISS part of a search: the query vector normalised (the one place),
                  allowed ids, the one over-fetch loop (widening); Hit
    filters.py    the filter compiler (values, any-of lists, ranges) and per-field tables
    keywords.py   FTS5 keywords a report must (not) contain; ReportTerms (per segment)
    facets.py     what the filters can ask for
    lookup.py     rows: an image's metadata, its other paths, its thumbnail
    sentences.py  the report sentences' space (SentenceSpace)
    hybrid.py     text queries ranked by the image, its report's sentences and its words
    suggest.py    what similar cases said: report sentences for an image
    limits.py     every bound on what one search may ask (k, filters, keywords, ids), once
    timings.py    Timings: the ms of each stage of one query (filter, faiss, reports here)

A query: IndexStore.search (the vector normalised: search.normalised) -> _allowed
(filters.filtered_ids, keywords.keyword_ids: stage filter) -> search.search_within (FAISS,
restricted to the allowed ids: stage faiss) -> Hits; the service then reads their rows
(IndexStore.get_many: lookup). A text query ranked with the reports goes IndexStore.rank_text
-> hybrid (sentences, keywords' FTS5 table, search: stage reports) -> TextRanking.
"""
