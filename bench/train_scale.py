"""Training at archive scale: memory, start-up and data rate as the manifest grows to 300k rows.

The shared data holds ~2,450 paired images (covid-cxr + medpix), so the large manifests REPEAT
them: row i links (a symlink of its own, so every row is a distinct path and nothing is merged
away by path) to real image i mod 2,450 and carries that image's real report. The cache stores
each content once, so what grows with N is what this measures: the manifest, the file table, the
per-row arrays, the path to content look-ups and the hashing of every row's file.

For each N it measures, in fresh processes:
- cache: `convirt cache build` over the N-row manifest (hashing every row; decoding only the
  contents not cached yet), and decoding throughput per core on the real images (1 process vs
  all cores, on a cache of their own);
- train: `convirt train --config cpu --max-steps 1` with the cache built: peak RSS (the training
  process, from wait4) and seconds from start to the first optimiser step (steps.csv's first row);
- loader: samples/s of the DataLoader alone with one worker against the cpu model's train step
  rate on a batch in memory, measured in the same process.

    python bench/train_scale.py --sizes 10000 100000 300000 --work /tmp/scale
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from convirt.manifest import read_manifest_items
from convirt.paths import default_manifests

CONVIRT = [sys.executable, "-m", "convirt.cli"]


def real_pairs() -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(image, report) of the shared train and dev splits."""
    train, dev = [], []
    for manifest in default_manifests():
        for split, out in (("train", train), ("dev", dev)):
            items, _ = read_manifest_items(manifest, split, require_text=True)
            out += [(item.path, item.text) for item in items]
    return train, dev


def make_manifest(folder: Path, rows: int, train, dev) -> Path:
    """`rows` train rows, each a symlink of its own to a real image, plus the real dev rows."""
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return manifest
    links = folder / "links"
    links.mkdir(parents=True, exist_ok=True)
    with open(folder / "partial.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text", "split"])
        for i in range(rows):
            image, text = train[i % len(train)]
            link = links / f"{i // 1000:04d}" / f"{i:07d}{image.suffix}"
            link.parent.mkdir(exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(image)
            writer.writerow([link.relative_to(folder).as_posix(), text, "train"])
        for image, text in dev:
            writer.writerow([str(image), text, "dev"])
    (folder / "partial.csv").rename(manifest)
    return manifest


def _high_water_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _logged(stream, marker: bytes) -> bool:
    """Whether a process's stderr file holds `marker` yet (read without moving its offset)."""
    return marker in os.pread(stream.fileno(), 1 << 20, 0)


def _has_data_row(path: Path) -> bool:
    try:
        with open(path) as f:
            return sum(1 for _ in islice(f, 2)) >= 2
    except FileNotFoundError:
        return False


READY = b"ready to train"  # logged by convirt train once data and model are loaded


def peak_rss_mb(command: list[str], env: dict, watch: Path | None = None) -> dict:
    """Run a command: its wall time, its peak RSS (MB: VmHWM of the process itself, not of its
    loader workers, polled every 20 ms) and when `watch` first held a data row.

    Not wait4's ru_maxrss: exec carries the forking parent's high-water mark into the child's,
    so every child of a large benchmark process would report at least the benchmark's size."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        first_row, peak_kb, ready_kb = None, 0, None
        while True:
            peak_kb = max(peak_kb, _high_water_kb(process.pid))
            if ready_kb is None and _logged(err, READY):
                ready_kb = peak_kb
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if watch is not None and first_row is None and _has_data_row(watch):
                first_row = time.perf_counter() - started
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        out, err = out.read().decode(), err.read().decode()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    if watch is not None and first_row is None and _has_data_row(watch):
        first_row = seconds
    return {
        "seconds": round(seconds, 2),
        "first_step_s": None if first_row is None else round(first_row, 2),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_rss_ready_mb": None if ready_kb is None else round(ready_kb / 1024, 1),
        "stdout": out,
    }


def decode_rate(train, cache: Path, workers: int, env: dict) -> float:
    """Images/s of a fresh cache build over the real train images with `workers` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "real.csv"
        with open(manifest, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image"])
            writer.writerows([str(image)] for image, _ in train)
        command = [*CONVIRT, "cache", "build", "--manifest", str(manifest), "--size", "219"]
        command += ["--cache", str(cache), "--workers", str(workers), "--no-progress"]
        result = peak_rss_mb(command, env)
    decoded = json.loads(result["stdout"])["decoded"]
    return decoded / result["seconds"]


def loader_vs_model(manifest: Path, cache: Path, batches: int) -> dict:
    """Samples/s of the loader alone (1 worker) and of the cpu model's train step, same process."""
    from training import distributed
    from training.config import load_config
    from training.data import EpochSampler
    from training.run import start_run
    from training.train import train_step

    config = load_config("cpu", {"num_workers": 1, "cache_dir": str(cache), "epochs": 1000})
    with tempfile.TemporaryDirectory() as out:
        run = start_run(
            config, [manifest], Path(out), distributed.DistInfo(), torch.device("cpu"), False
        )
    sampler = EpochSampler(len(run.train_set), config.batch_size, epoch=1, seed=config.seed)
    loader = iter(run.train_loader(sampler))
    batch = next(loader)  # worker start-up: not counted
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    loader_rate = batches * config.batch_size / (time.perf_counter() - started)
    run.ddp_model.train()
    train_step(run, batch)
    started = time.perf_counter()
    steps = max(3, batches // 4)
    for _ in range(steps):
        train_step(run, batch)
    model_rate = steps * config.batch_size / (time.perf_counter() - started)
    return {
        "loader_samples_per_s": round(loader_rate, 1),
        "model_samples_per_s": round(model_rate, 1),
        "loader_over_model": round(loader_rate / model_rate, 2),
    }


def measure(rows: int, work: Path, train, dev, env: dict, args) -> dict:
    folder = work / f"n{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest = make_manifest(folder, rows, train, dev)
    made = time.perf_counter() - started
    cache = work / "cache"
    build = [*CONVIRT, "cache", "build", "--manifest", str(manifest), "--size", "219"]
    build += ["--cache", str(cache), "--no-progress"]
    cache_run = peak_rss_mb(build, env)
    summary = json.loads(cache_run["stdout"])
    out = folder / "run"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    train_command = [*CONVIRT, "train", "--config", "cpu", "--manifest", str(manifest)]
    train_command += ["--out", str(out), "--max-steps", "1", "--no-progress"]
    train_command += ["--set", f"cache_dir={cache}"]
    train_run = peak_rss_mb(train_command, env, watch=out / "steps.csv")
    result = {
        "rows": rows,
        "manifest_s": round(made, 1),
        "cache_build": {
            "seconds": cache_run["seconds"],
            "rows_per_s": round(rows / cache_run["seconds"], 1),
            "hashed": summary["hashed"],
            "decoded": summary["decoded"],
            "peak_rss_mb": cache_run["peak_rss_mb"],
        },
        "train": {
            "peak_rss_mb": train_run["peak_rss_mb"],
            "peak_rss_before_first_step_mb": train_run["peak_rss_ready_mb"],
            "first_step_s": train_run["first_step_s"],
            "seconds": train_run["seconds"],
        },
    }
    if not args.skip_loader:
        result["loader"] = loader_vs_model(manifest, cache, args.loader_batches)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "train-scale")
    parser.add_argument("--loader-batches", type=int, default=12)
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train, dev = real_pairs()
    args.work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    one = decode_rate(train, args.work / "decode-1", 1, env)
    every = decode_rate(train, args.work / f"decode-{cores}", cores, env)
    report = {
        "machine": f"{platform.machine()}, {cores} cores, torch {torch.__version__}",
        "real_images": len(train),
        "decode_images_per_s": {"1 process": round(one, 1), f"{cores} processes": round(every, 1)},
        "decode_images_per_s_per_core": round(every / cores, 1),
        "sizes": [],
    }
    for rows in args.sizes:
        report["sizes"].append(measure(rows, args.work, train, dev, env, args))
        print(json.dumps(report["sizes"][-1]), file=sys.stderr)
    smallest = report["sizes"][0]["train"]
    for size in report["sizes"]:
        train = size["train"]
        train["rss_over_smallest"] = round(train["peak_rss_mb"] / smallest["peak_rss_mb"], 3)
        train["rss_before_first_step_over_smallest"] = round(
            train["peak_rss_before_first_step_mb"] / smallest["peak_rss_before_first_step_mb"], 3
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
