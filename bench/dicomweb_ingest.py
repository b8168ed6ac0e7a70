"""PACS ingest throughput: `build --dicomweb` from a real Orthanc against a folder build of the same
images, in the same run, on the same model.

The first N shared JPEGs (medpix, then covid-cxr) are wrapped as DICOM Secondary Capture (their JPEG bytes
encapsulated as JPEG Baseline, with study/series/patient tags), stored over STOW-RS into a temporary
Orthanc (Debian's orthanc + orthanc-dicomweb, loopback ports, its own storage), then indexed twice,
each with an empty image cache so both decode everything:
- folder: `build --images` over the JPEG files;
- dicomweb: `build --dicomweb` (QIDO listing, WADO-RS fetch of every instance, DICOM decode).
ratio = dicomweb images/s / folder images/s (whole builds, publishing included). With --rounds R
both run R times, alternating which goes first; the figures are each side's median.

    python bench/dicomweb_ingest.py                       # 200 images, the default model
    python bench/dicomweb_ingest.py --limit 50 --model runs/demo-cpu/bundle
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import add_build_arguments, archive_images, link_archive, untrained_bundle
from pacs_fake import secondary_capture
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit
from serving import free_port

from convirt.bundle import load_bundle
from index.sources.dicomweb.pacs import Pacs
from index.sources.dicomweb.source import list_source
from index.sources.folder import scan_folder
from index.write.build import Options, build

UID_ROOT = "1.2.826.0.1.3680043.10.1137.7."
STOW_BATCH = 50
PLUGINS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def wrap_jpeg(jpeg: Path, n: int) -> Dataset:
    """The JPEG as a Secondary Capture instance of its own study (five images a study)."""
    study, series, sop = f"{UID_ROOT}{n // 5}", f"{UID_ROOT}{n // 5}.1", f"{UID_ROOT}{n // 5}.1.{n}"
    with Image.open(jpeg) as image:
        width, height, mode = image.width, image.height, image.mode
    ds = secondary_capture(study, series, sop, JPEGBaseline8Bit)
    ds.SeriesNumber, ds.InstanceNumber = 1, n
    ds.PatientID, ds.PatientName, ds.StudyDate = f"P{n // 5}", f"Bench^{n // 5}", "20240101"
    ds.Modality = "CR" if "covid" in str(jpeg) else "OT"
    ds.ViewPosition, ds.BodyPartExamined, ds.ConversionType = "PA", "CHEST", "WSD"
    ds.Rows, ds.Columns = height, width
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if mode == "L":
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = (
            3,
            "YBR_FULL_422",
            0,
        )
    ds.PixelData = encapsulate([jpeg.read_bytes()])
    ds["PixelData"].VR = "OB"
    return ds


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    plugin = next(
        (p for d in PLUGINS for p in sorted(Path(d).glob("libOrthancDicomWeb.so*"))), None
    )
    if not Path(binary).is_file() or plugin is None:
        raise SystemExit(
            "Orthanc or its DICOMweb plugin is missing: apt-get install -y orthanc orthanc-dicomweb"
        )
    port = free_port()
    config = {
        "Name": "convirt-bench",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpCompressionEnabled": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/dicom-web"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/studies", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(
                f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-1000:]}"
            )
        time.sleep(0.1)


def timed_build(root: Path, bundle, source_of, options: Options) -> tuple[float, dict]:
    started = time.perf_counter()
    summary = build(root, bundle, source_of(), options)
    seconds = time.perf_counter() - started
    info = json.loads((summary.directory / "version.json").read_text())
    return seconds, {"indexed": summary.count, "embed_seconds": info["embed_seconds"]}


def median_run(runs: list[tuple[float, dict]]) -> tuple[float, dict]:
    return sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_build_arguments(parser, 200, "images (default: %(default)s)")
    parser.add_argument("--fetch-threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="builds of each kind (alternating)")
    args = parser.parse_args()
    images = archive_images(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "orthanc").mkdir()
        process, url = start_orthanc(tmp / "orthanc")
        try:
            from dicomweb_client.api import DICOMwebClient

            started = time.perf_counter()
            datasets = [wrap_jpeg(image, n) for n, image in enumerate(images)]
            client = DICOMwebClient(url)
            for start in range(0, len(datasets), STOW_BATCH):
                client.store_instances(datasets[start : start + STOW_BATCH])
            load_seconds = time.perf_counter() - started
            bundle = load_bundle(args.model or untrained_bundle(tmp / "bundle"), args.device)

            def options(cache: str) -> Options:
                return Options(
                    batch_size=args.batch_size,
                    workers=args.workers,
                    device=args.device,
                    progress=False,
                    cache_dir=tmp / cache,
                )

            archive = link_archive(images, tmp / "archive")
            # warm-up: torch's first batches and the decoders' imports are not either build's
            build(
                tmp / "warm",
                bundle,
                scan_folder(link_archive(images[:8], tmp / "w")),
                options("cw"),
            )
            pacs = Pacs(url, threads=args.fetch_threads)
            runs: dict[str, list[tuple[float, dict]]] = {"folder": [], "dicomweb": []}
            sources = {
                "folder": lambda: scan_folder(archive),
                "dicomweb": lambda: list_source(pacs),
            }
            for round_ in range(args.rounds):
                order = ["folder", "dicomweb"] if round_ % 2 == 0 else ["dicomweb", "folder"]
                for kind in order:
                    where = f"{kind}-{round_}"
                    runs[kind].append(
                        timed_build(tmp / where, bundle, sources[kind], options(f"cache-{where}"))
                    )
        finally:
            process.terminate()
            process.wait(20)
    folder_s, folder_info = median_run(runs["folder"])
    pacs_s, pacs_info = median_run(runs["dicomweb"])
    folder_rate, pacs_rate = len(images) / folder_s, len(images) / pacs_s
    print(
        json.dumps(
            {
                "images": len(images),
                "device": args.device,
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                "image_size": bundle.config.image_size,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "fetch_threads": args.fetch_threads,
                "stow_seconds": round(load_seconds, 2),
                "folder": {
                    **folder_info,
                    "seconds": round(folder_s, 2),
                    "images_per_s": round(folder_rate, 1),
                },
                "dicomweb": {
                    **pacs_info,
                    "seconds": round(pacs_s, 2),
                    "images_per_s": round(pacs_rate, 1),
                },
                "ratio": round(pacs_rate / folder_rate, 3),
                "rounds": args.rounds,
                "seconds_per_round": {
                    kind: [round(seconds, 2) for seconds, _ in done] for kind, done in runs.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
