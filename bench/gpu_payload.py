"""What bench/gpu_check.sh needs on a bare GPU machine, gathered here into one folder.

The GPU machine (DEVELOPERS.md) has its own Python 3.12 with torch, torchvision, transformers,
pytest and pyyaml, reaches no package index, and is sent at most 64 MiB beside the code. So the
payload brings, in well under that:

    wheels/     the pure-Python packages it lacks, and faiss-cpu / pydantic-core built for 3.12
    weights/    the packaged EfficientNet-Lite0 ImageNet weights as fp16 (half the size)
    text/       MiniLM's and MPNet's configs and tokenizers, without weights: random-initialised
                weights are made there (throughput does not depend on their values)
    data/       a few hundred shared images with their manifests, laid out like the data root

    python bench/gpu_payload.py --out .gpu-payload            # then carry .gpu-payload
    python bench/gpu_payload.py --out DIR --no-wheels         # the CPU dry run's payload
    python bench/gpu_payload.py random-text PAYLOAD/text OUT  # there: loadable random encoders
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from convirt.manifest import read_manifest_rows
from convirt.paths import (
    PAIRED_DATASETS,
    data_root,
    packaged_efficientnet_lite0,
    packaged_text_encoder,
)

LIMIT_BYTES = 64 * 2**20
CODE_ALLOWANCE = 8 * 2**20  # the working tree travels beside the payload
TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.txt")  # fmt: skip
# What the GPU machine lacks (its package list: .library/device/KINDS.md), pinned to the
# versions this project's constraints use where they are runtime dependencies.
WHEELS = ("faiss-cpu", "efficientnet-lite-pytorch", "pydantic", "pydantic-core",
          "annotated-types", "typing-inspection")  # fmt: skip
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")  # fmt: skip


def pinned(name: str) -> str:
    constraints = Path(__file__).resolve().parent.parent / "constraints.txt"
    for line in constraints.read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.strip()
    return name


def download_wheels(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run([*command, "-d", str(out), *map(pinned, WHEELS)], check=True)


def copy_weights(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = torch.load(packaged_efficientnet_lite0(), map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half, out / "efficientnet-lite0-fp16.pt")


def copy_text_configs(out: Path) -> None:
    from convirt.mpnet import mpnet_text_encoder

    for name, folder in (("minilm", packaged_text_encoder()), ("mpnet", mpnet_text_encoder())):
        (out / name).mkdir(parents=True, exist_ok=True)
        for file in TEXT_FILES:
            if (folder / file).is_file():
                shutil.copy(folder / file, out / name / file)


def copy_data(out: Path, per_dataset: int) -> None:
    """The first train and dev pairs of each paired dataset, with their manifests."""
    for dataset in PAIRED_DATASETS:
        source = data_root() / dataset
        rows = [r for r in read_manifest_rows(source / "manifest.csv") if r["text"].strip()]
        dev = max(8, per_dataset // 8)
        picked = [r for r in rows if r["split"] == "train"][: per_dataset - dev]
        picked += [r for r in rows if r["split"] == "dev"][:dev]
        (out / dataset / "images").mkdir(parents=True, exist_ok=True)
        for row in picked:
            shutil.copy(source / row["image"], out / dataset / row["image"])
        with open(out / dataset / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "text", "split"])
            writer.writeheader()
            writer.writerows({k: row[k] for k in ("image", "text", "split")} for row in picked)


def random_text_encoders(source: Path, out: Path) -> None:
    """Each carried text config and tokenizer as a loadable folder with random weights."""
    from transformers import AutoConfig, AutoModel

    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        target = out / folder.name
        shutil.copytree(folder, target, dirs_exist_ok=True)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(target)


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    if sys.argv[1:2] == ["random-text"]:  # on the GPU machine: random-text FROM TO
        random_text_encoders(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu-payload"))
    parser.add_argument("--images", type=int, default=200, help="pairs per dataset")
    parser.add_argument("--no-wheels", action="store_true", help="skip the wheels (CPU dry run)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    if not args.no_wheels:
        download_wheels(args.out / "wheels")
    copy_weights(args.out / "weights")
    copy_text_configs(args.out / "text")
    copy_data(args.out / "data", args.images)
    size = size_of(args.out)
    print(json.dumps({"payload": str(args.out), "bytes": size, "limit": LIMIT_BYTES}))
    if size + CODE_ALLOWANCE > LIMIT_BYTES:
        raise SystemExit(f"payload of {size / 2**20:.1f} MiB leaves too little of the 64 MiB")


if __name__ == "__main__":
    main()
