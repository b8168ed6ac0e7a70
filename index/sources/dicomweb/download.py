"""Instances fetched by WADO-RS into the write's staging area, several at once, each classified:
an image, a Structured Report (its text), or a reason it cannot be indexed (a skip)."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tqdm import tqdm

from .http import (
    SKIP_STATUS,
    WADO_ACCEPT,
    BadAnswer,
    PacsHttp,
    dicom_part,
    network_errors,
    normalised_dicom,
    unreachable,
)
from .listing import SR_MODALITY, Instance
from .pacs import Pacs
from .reports import sr_text

log = logging.getLogger(__name__)

SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # the Structured Report storage SOP classes
RETRY_HINT = "--retry-skipped fetches it again"


@dataclass
class Fetched:
    """What one downloaded instance turned out to be."""

    instance: Instance
    path: Path | None
    meta: dict[str, str] = field(default_factory=dict)
    report: str | None = None  # a Structured Report's text
    skip: str | None = None  # why it is not indexed


def retrieve(client: PacsHttp, instance: Instance) -> bytes:
    """The instance as a DICOM Part-10 file (as pydicom writes it back), in the transfer syntax
    the PACS holds it in: a streamed WADO-RS GET of at most the PACS's max_instance_bytes,
    within its deadline. BadAnswer (a skip) for anything but a multipart DICOM answer."""
    pacs = client.pacs
    url = (
        f"{pacs.url}/studies/{quote(instance.study, safe='')}/series/"
        f"{quote(instance.series, safe='')}/instances/{quote(instance.sop, safe='')}"
    )
    doing = f"fetching instance {instance.sop}"
    answer = client.get(url, doing, accept=WADO_ACCEPT, max_bytes=pacs.max_instance_bytes)
    try:
        return normalised_dicom(dicom_part(answer))
    except ValueError as err:
        raise client.bad(url, doing, str(err)) from None


def download(
    pacs: Pacs, instances: list[Instance], folder: Path, progress: bool
) -> tuple[list[Fetched], dict[str, int]]:
    """Every instance as a local file in `folder` (those there already are not fetched again),
    classified. An instance the PACS answers badly for is a skip; a PACS that stops answering
    raises DicomwebError (what was fetched stays)."""
    counts = {"fetched": 0, "resumed": 0}
    local = threading.local()
    lock = threading.Lock()
    bar = tqdm(total=len(instances), desc="fetching", unit="inst", disable=not progress)

    def one(instance: Instance) -> Fetched:
        try:
            return fetch_one(instance)
        finally:
            bar.update(1)

    def fetch_one(instance: Instance) -> Fetched:
        refused = instance.bad_uid() or instance.too_large()
        if refused:
            return Fetched(instance, None, skip=refused)
        path = folder / instance.file_name
        data = None
        if path.is_file():
            with lock:
                counts["resumed"] += 1
        else:
            if not hasattr(local, "client"):
                local.client = pacs.client()
            try:
                data = retrieve(local.client, instance)
            except BadAnswer as err:
                log.warning("skipped %s: %s", instance.sop, err)
                return Fetched(instance, None, skip=f"{err.detail} ({RETRY_HINT})")
            except network_errors() as err:
                response = getattr(err, "response", None)
                if response is not None and response.status_code in SKIP_STATUS:
                    status = f"HTTP {response.status_code} {response.reason}"
                    return Fetched(
                        instance, None, skip=f"the PACS answered {status} ({RETRY_HINT})"
                    )
                raise unreachable(pacs, f"fetching instance {instance.sop}", err) from err
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            with lock:
                counts["fetched"] += 1
        return classify(instance, path, data)

    started = time.perf_counter()
    pool = ThreadPoolExecutor(max(1, pacs.threads), thread_name_prefix="dicomweb-fetch")
    try:
        futures = [pool.submit(one, instance) for instance in instances]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done() and future.exception() is not None:
                raise future.exception()
        results = [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    log.info(
        "fetched %d instances from %s in %.1fs (%d were there already)",
        counts["fetched"],
        pacs.url,
        time.perf_counter() - started,
        counts["resumed"],
    )
    return results, counts


def classify(instance: Instance, path: Path, data: bytes | None = None) -> Fetched:
    """Image, Structured Report, or a reason it cannot be indexed; its metadata from the header
    (the naming table of convirt.imagerecord, as a folder DICOM's), the listing's UIDs where the
    header lacks them. `data`: the file's bytes when they were just fetched (else read once)."""
    import pydicom

    from convirt.decode_budget import ImageDecodeError, check_deflated
    from convirt.imagerecord import header_fields

    try:
        data = path.read_bytes() if data is None else data
        check_deflated(io.BytesIO(data))  # pydicom would inflate a deflated dataset unbounded
    except ImageDecodeError as err:
        return Fetched(instance, path, skip=str(err))
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), defer_size="64 KB", force=True)
    except Exception as err:  # pydicom raises many types for malformed files
        return Fetched(instance, path, skip=f"unreadable DICOM file: {err}")
    meta = header_fields(dataset)
    meta.setdefault("StudyInstanceUID", instance.study)
    meta.setdefault("SeriesInstanceUID", instance.series)
    meta.setdefault("SOPInstanceUID", instance.sop)
    sop_class = str(dataset.get("SOPClassUID", ""))
    modality = str(dataset.get("Modality", instance.modality)).upper()
    if modality == SR_MODALITY or sop_class.startswith(SR_CLASS_PREFIX):
        return Fetched(instance, path, meta, report=sr_text(dataset))
    if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(dataset.get("SOPClassUID"), "name", "") or sop_class or "unknown SOP class"
        return Fetched(instance, path, meta, skip=f"no pixel data ({kind})")
    file_meta = getattr(dataset, "file_meta", None)
    syntax = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    problem = decoder_problem(syntax) if syntax else None
    if problem:
        return Fetched(instance, path, meta, skip=problem)
    return Fetched(instance, path, meta)


def decoder_problem(syntax: str) -> str | None:
    """Why pixels in this transfer syntax cannot be decoded here, or None."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"transfer syntax {uid} ({uid.name}): no decoder exists for it"
    except Exception as err:  # an unknown or malformed UID
        return f"transfer syntax {uid}: {err}"
    if not decoder.is_available:
        return (
            f"transfer syntax {uid} ({uid.name}): its decoder plugin is not installed here "
            "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or gdcm)"
        )
    return None
