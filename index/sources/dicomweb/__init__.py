"""A PACS as an index source over DICOMweb: QIDO-RS finds the instances, WADO-RS fetches them.

    pacs = Pacs("http://pacs:8042/dicom-web", since="20240101", modalities=("CR", "DX"),
                reports=Path("ris.csv"))
    build(root, bundle, list_source(pacs), options)   # convirt index build --dicomweb
    sync_pacs(root, bundle, pacs, options)            # convirt index sync --dicomweb

What an instance becomes:
- an image (it has pixel data the DICOM rules of convirt.imageio decode): stored under the name
  dicomweb://HOST[:PORT]/PREFIX/studies/S/series/R/instances/I, with StudyInstanceUID,
  SeriesInstanceUID, SOPInstanceUID, PatientID, Modality, ViewPosition, BodyPartExamined,
  StudyDate (and AccessionNumber) from its header in the metadata, and its study's report;
- a Structured Report (Modality SR): its TextValue items, joined, are the report of its study's
  images (a row of the --reports table, from the RIS, wins over it);
- anything else (no pixel data, a transfer syntax nothing here decodes, a frame too large) and
  anything the PACS answers badly for it (not multipart DICOM, over --max-instance-mb, not sent
  within --pacs-deadline) is listed with the reason in build_report.json's skipped list.
What was skipped is kept in the version's meta.sqlite (table not_indexed), so a
sync, an add or a rebuild does not fetch it again; --retry-skipped fetches it again.

Everything the PACS sends is bounded (http.py: a byte cap and a total deadline per
request; listing.py: listings on disk, capped at --max-listed). Instances are downloaded
into the write's staging area (ROOT/staging/FINGERPRINT/dicomweb/) and embedded from there by the
same job as a folder build; the copies go when the version is published. A PACS that stops
answering mid-way stops the write: nothing is published, and the same command run again fetches
only what it lacks and embeds only what was not staged.

`sync_pacs` (sync.py) brings an index up to date with the PACS in one new version.

Its rooms, one file each:

    pacs.py      Pacs: the server's URL, the filters and the limits (--since, --modality, ...)
    http.py      PacsHttp: every request bounded in bytes and in time; DicomwebError, BadAnswer
    listing.py   QIDO-RS listings on disk (Instance, Listing)
    orthanc.py   Orthanc's /changes feed and the sync cursor
    reports.py   the RIS report table and Structured Report text joined to the images
    download.py  WADO-RS fetches into the staging area, each instance classified
    source.py    DicomwebSource: a listing as a Source of index.write (build, add)
    sync.py      `convirt index sync`: new instances added, deleted ones removed, in one version
    serving.py   the index.sources.remote entry for dicomweb:// rows: fetch_one for the service

A build: cli -> pacs.Pacs -> source.list_source (listing, orthanc cursor) -> index.write.build ->
DicomwebSource.fetch (download, reports) -> the embedding job -> DicomwebSource.finish.
"""
