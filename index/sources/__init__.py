"""Where images come from: each source lists items (a local file each, its relative path, report
and metadata) for index.write, and a remote one also fetches its images for serving.

    base.py      Source: items, rows that point at nothing, and the hooks a remote source fills
                 in (fetch, name_of, source_info, finish, shard)
    folder.py    a folder tree of images (PNG, JPEG, DICOM)
    manifest.py  a CSV or JSONL manifest with report text and metadata
    dicomweb/    a PACS over DICOMweb: its client, QIDO listing, Orthanc feed, report join,
                 download, sync and serve-time fetch
    remote.py    the one entry the service goes through for an image a remote source holds:
                 is_remote, fetch_one, cached_copy, server_of, server_failed

Adding a source touches this folder and index/cli/ only: a module (or package) here making a
Source, and its flags in the CLI (cli/sources.py). A remote one (another PACS protocol) also
has a serving module with fetch_one, cached_copy, server_of and server_failed, listed under its
path scheme in remote.py's PROTOCOLS; the service and index.write do not change.
"""
