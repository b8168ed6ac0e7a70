"""Writing an index root: every operation makes a new version and publishes it atomically.

    template.py   `writing`: the one template of every write (lock, tmp version, publish, prune,
                  summary); VersionWriter writes the files of a version
    build.py      build, add, update (add and remove in one version: what a sync publishes)
    rewrite.py    remove, reindex (nothing embedded)
    merge.py      the shards of a sharded build joined into one version
    embedding.py  the embedding job: image cache, decode threads, the model, in source order
    staging.py    embeddings of an unfinished job, by content hash (a rerun resumes)
    rows.py       meta.sqlite rows written: images, duplicates, what a remote source skipped;
                  the DICOM field renaming reindex migrates older versions with; the
                  normalised modality and body part every publish derives (index/fields.py)
    sentences.py  the report sentences derived and embedded at publish
    lookups.py    the facets and per-field tables written at publish, and its quick_check
    checks.py     `convirt index info` and `verify`

A build: build.build -> template.writing -> Source.fetch (index.sources) -> embedding.run_job
(staging) -> rows.insert_new -> Source.finish -> Write.publish (vectors, FAISS via
index.faiss_index, sentences.write, lookups.write, version.json) -> CURRENT switched.
An image's record (convirt.imagerecord) is made by its one decode in the image cache, given its
vectors by embedding.py, staged by staging.py and written as its row by rows.py: one object.
"""
