"""Search: a query in, cards out, over the served index version. No HTTP here: plain options in
(query.py), plain cards out (cards.py), refusals as service.errors kinds; service/api/ adapts.

searcher.py    Searcher, the one owner of search: text, image, region, similar, refine,
               suggest, facets and explain; embeds on the model thread, works in its pool
query.py       what goes in and out: SearchOptions, Refinement (plain options), Found
find.py        what a search runs in the pool: search, group, fill, describe, its stages timed
grouping.py    one card per study or patient; feedback.py: refine by example (Rocchio)
cards.py       hits to cards (metadata, report, group, DICOM UIDs; ids, no URLs); viewer.py:
               DICOM UIDs, links to the PACS viewer; case.py: a card's case summary (title,
               age, sex, exam, date, source, licence)
stores.py      StoreSlot: the served index version, swapped on reload, leased per request
kept.py        KeptUploads: uploads kept a while for their uploader, under an upload_id
calibration.py what a score means (strong, possible, weak) per kind of query; scales.py:
               each version's scales, sampled from the index in a background thread
pacs.py        the file of an indexed image: on disk, or fetched from its PACS when viewed
               (own pool, deadline, per-server state)
"""
