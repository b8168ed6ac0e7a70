"""FAISS index + SQLite metadata of an image archive: written by `convirt index`, read by the service.

An index root holds immutable versions (ROOT/versions/NNNNNN/) and CURRENT, the name of the one
served; every write makes a new version and switches CURRENT atomically. Three rooms:

    read/      the served version: store.py (IndexStore, open_current), search.py
               (FAISS search, Hit), metadata reads (lookup.py rows, filters.py the filter compiler,
               keywords.py FTS5 keywords, facets.py), report sentences (sentences.py), hybrid.py
               (text ranking with the reports), suggest.py (what similar cases said), opening.py
               (the checks a version passes before it is served)
    write/     template.py (the one template of every write: lock, tmp dir, publish, prune),
               build.py (build, add, update), rewrite.py (remove, reindex), merge.py, the
               embedding job (embedding.py, staging.py), rows.py (metadata rows written),
               sentences.py (report sentences derived at publish), checks.py (info, verify)
    sources/   where images come from: base.py (Source), folder.py, manifest.py, dicomweb/ (a
               PACS: client, listing, feed, reports, download, sync, serving), remote.py (the one
               entry the service fetches remote images through)
    cli/       `convirt index ...`, one module per command group

and what both sides share, here: layout.py (the root's folders, CURRENT, the write lock, disk
full), version.py (what a version directory holds, read_version), metadata.py (meta.sqlite's
schema), fields.py (the modality and body part vocabulary: derived at publish, read by facets
and cards), faiss_index.py (the FAISS structures: built by write, searched by read), errors.py.

A query: service -> read.store.IndexStore.search -> read.filters / read.keywords (allowed ids)
-> read.search (FAISS, within them) -> read.lookup (rows) -> the service's result.
A build: cli.write -> sources (folder, manifest or dicomweb listing) -> write.build.build inside
write.template.writing -> Source.fetch -> write.embedding.run_job (image cache, model, staging)
-> write.rows (metadata rows) -> write.template publishes (vectors, FAISS, write.sentences).

Where the common changes go:
- a new FAISS index type: faiss_index.py (resolve_factory for build, search_params and
  tune_for_search for search); nothing in read/ or write/ names a structure.
- a new image source: a module or package in sources/ (a Source; for a remote archive also its
  serving module, listed in sources/remote.py PROTOCOLS) and its flags in cli/.
"""

import logging

# faiss logs its CPU-feature probing at INFO on import; `convirt` logs at INFO.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
