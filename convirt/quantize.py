"""An int8 query encoder for CPU serving: the text tower in ONNX Runtime, int8 weights and activations.

    convirt export --int8 BUNDLE      writes BUNDLE/int8/ (text.onnx + int8.json), atomically
    CONVIRT_QUANTIZE=int8             `convirt serve` embeds query texts with it (and quantises
                                      at startup, into a temporary folder, when it is missing)

Only the query path changes: training, evaluation and indexing stay fp32 (torch), the index
vectors are the training-time model's, image queries use the fp32 image tower. The artefact lives
inside the bundle folder, so retraining (which replaces the folder) removes it together with the
weights it came from; int8.json records the fingerprint of the bundle it was derived from and the
sha256 of text.onnx, and an artefact derived from another bundle, or damaged, is refused with the
command that fixes it (`convirt export --int8 BUNDLE`). The bundle's fingerprint (what the index
records) is unchanged: the artefact is beside the weights, not part of them.

What the artefact holds, and why per token and smoothed: convirt/int8_graph.py (the export, the
calibration and the integer rewrite of the graph). Here: the artefact on disk, its checks, the
served encoder and `convirt export`.

Why ONNX Runtime, not torch's dynamic quantisation. Both measured by bench/quantized_quality.py on
the 2-core box (the 1-epoch `cpu` bundle, medpix dev sentences through Embedder.embed_texts, each
encoder in its own process, 2 threads; docs/benchmarks.md "Int8 query encoder"). Speed is close:
one sentence fp32 7.8 ms, torch int8 (quantize_dynamic on every nn.Linear) 2.6 ms, this encoder
2.2 ms (1.5 with ONNX Runtime's spinning on); 32 sentences 133, 41 and 49 ms (37 spinning).
Quality decides: torch's version keeps one activation scale per tensor and offers no way to
smooth or to scale per token short of new kernels; its top-10 overlap with fp32 was 0.77-0.80
(cosine 0.95) against 0.97-0.98 here. ONNX Runtime runs the rewritten graph with stock
operators (QuantizeLinear per row, MatMulInteger), is a pip wheel for every platform, and its
sessions run one intra-op team from the calling thread, as service/model/threads.py wants.

The image tower stays fp32 in torch: ONNX Runtime's static int8 EfficientNet-Lite0 (QDQ, per-channel,
calibrated on 48 train images) gave an image->image top-10 overlap of 0.944 with fp32, under the
0.95 this path promises (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .bundle import Bundle, BundleError, load_bundle, read_bundle_info, replace_dir
from .hashing import sha256_file
from .int8_graph import (
    CALIBRATION_TEXTS,
    OPSET,
    PROVIDERS,
    SMOOTHING_ALPHA,
    int8_text_graph,
    session_options,
)

log = logging.getLogger(__name__)

FOLDER = "int8"  # inside the bundle folder
INFO_NAME = "int8.json"
MODEL_NAME = "text.onnx"
FORMAT = 1
QUERY_ENCODER = "int8-onnx"  # what /readyz reports for this path ("fp32" for the torch one)


class QuantizedModelError(BundleError):
    """The int8 artefact is missing, damaged, or was derived from another bundle."""


def int8_dir(bundle_dir: str | Path) -> Path:
    return Path(bundle_dir) / FOLDER


# -- the artefact ---------------------------------------------------------------------------------


def write_int8(
    bundle: Bundle,
    folder: Path,
    calibration_texts: Sequence[str] = CALIBRATION_TEXTS,
    *,
    alpha: float = SMOOTHING_ALPHA,
) -> dict:
    """Export and quantise the bundle's text tower into `folder` (text.onnx, int8.json)."""
    import onnx
    import onnxruntime

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    model, layers = int8_text_graph(bundle, folder, calibration_texts, alpha)
    onnx.save(model, str(folder / MODEL_NAME))
    info = {
        "format": FORMAT,
        "bundle_fingerprint": bundle.fingerprint,
        "query_encoder": QUERY_ENCODER,
        "engine": f"onnxruntime {onnxruntime.__version__}",
        "exported_with": f"torch {torch.__version__}, onnx {onnx.__version__}, opset {OPSET}",
        "quantisation": f"{layers} BERT linear layers: weights int8 per output channel, "
        "activations int8 per token (symmetric, smoothed); attention scores, projection head fp32",
        "smoothing_alpha": alpha,
        "calibration_texts": len(calibration_texts),
        "model_sha256": sha256_file(folder / MODEL_NAME),
        "export_seconds": round(time.perf_counter() - started, 1),
    }
    (folder / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def export_int8(
    bundle_dir: str | Path, calibration_texts: Sequence[str] = CALIBRATION_TEXTS
) -> dict:
    """BUNDLE/int8/ from the bundle, written atomically (a half-written one never appears)."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    target = int8_dir(bundle_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", dir=bundle_dir))
    try:
        info = write_int8(bundle, staging, calibration_texts)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


# -- serving -------------------------------------------------------------------------------------


def read_int8_info(folder: Path, bundle_fingerprint: str) -> dict:
    """int8.json, checked against the bundle it must come from (cheap: no model is loaded)."""
    fix = f"run `convirt export --int8 {folder.parent}` to derive it from this bundle"
    info_path = folder / INFO_NAME
    if not info_path.is_file() or not (folder / MODEL_NAME).is_file():
        raise QuantizedModelError(f"no int8 query encoder in {folder}: {fix}")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise QuantizedModelError(
            f"{folder}: int8 artefact format {info.get('format')!r}, this code reads {FORMAT}; "
            + fix
        )
    if info.get("bundle_fingerprint") != bundle_fingerprint:
        raise QuantizedModelError(
            f"{folder} was derived from the bundle with fingerprint "
            f"{info.get('bundle_fingerprint')}, not from this one ({bundle_fingerprint}): "
            "its queries would not match the index; " + fix
        )
    return info


def check_int8(bundle_dir: str | Path, bundle_fingerprint: str) -> dict | None:
    """int8.json of BUNDLE/int8 when the artefact is there and belongs to this bundle (format,
    fingerprint, sha256 of text.onnx checked); None when there is none. Raises
    QuantizedModelError for one that cannot be served."""
    folder = int8_dir(bundle_dir)
    if not folder.exists():
        return None
    info = read_int8_info(folder, bundle_fingerprint)
    if sha256_file(folder / MODEL_NAME) != info.get("model_sha256"):
        raise QuantizedModelError(
            f"{folder / MODEL_NAME} does not match the sha256 recorded in {INFO_NAME} (damaged "
            f"or replaced): run `convirt export --int8 {folder.parent}` again"
        )
    return info


class Int8TextEncoder:
    """(input_ids, attention_mask) -> u, as ConVIRT.encode_text's second output, in ONNX Runtime."""

    name = QUERY_ENCODER

    def __init__(self, model_path: Path, info: dict, threads: int, spinning: bool = False):
        import onnxruntime as ort

        self.info = info
        self.session = ort.InferenceSession(
            str(model_path), session_options(threads, spinning), providers=PROVIDERS
        )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {
            "input_ids": input_ids.cpu().numpy().astype(np.int64, copy=False),
            "attention_mask": attention_mask.cpu().numpy().astype(np.int64, copy=False),
        }
        return torch.from_numpy(self.session.run(None, feeds)[0])


def load_int8(
    bundle: Bundle, threads: int | None = None, *, build_missing: bool = False
) -> Int8TextEncoder:
    """The bundle's int8 query encoder (BUNDLE/int8), checked to come from this bundle.

    build_missing: when the bundle has none, quantise it now into a temporary folder (tens of
    seconds) instead of refusing. One derived from another bundle is refused either way.
    """
    threads = threads or torch.get_num_threads()
    if bundle.path is None:
        raise QuantizedModelError("the bundle has no folder: load it with load_bundle(path)")
    info = check_int8(bundle.path, bundle.fingerprint)
    if info is None and build_missing:
        log.warning(
            "no int8 query encoder in %s: quantising now (run `convirt export --int8 %s` once "
            "to start faster)",
            int8_dir(bundle.path),
            bundle.path,
        )
        with tempfile.TemporaryDirectory(prefix="convirt-int8-") as tmp:
            info = write_int8(bundle, Path(tmp))
            return Int8TextEncoder(Path(tmp) / MODEL_NAME, info, threads)
    if info is None:
        raise QuantizedModelError(
            f"no int8 query encoder in {int8_dir(bundle.path)}: run "
            f"`convirt export --int8 {bundle.path}`"
        )
    return Int8TextEncoder(int8_dir(bundle.path) / MODEL_NAME, info, threads)


class ReleasedTextTower(nn.Module):
    """In place of a model's fp32 text encoder once the int8 copy embeds every query text."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "the fp32 text tower was released because query texts go through the int8 encoder "
            "(CONVIRT_QUANTIZE=int8); load the bundle again to embed texts in fp32"
        )


def release_text_tower(bundle: Bundle) -> int:
    """Drop the bundle's fp32 text encoder (the int8 copy replaces it in a server); returns the
    bytes of parameters let go. Only for a bundle nothing else embeds texts with."""
    model = bundle.model
    if isinstance(model.text_encoder, ReleasedTextTower):
        return 0
    size = sum(p.numel() * p.element_size() for p in model.text_encoder.parameters())
    model.text_encoder = ReleasedTextTower()
    return size


# -- `convirt export` ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="convirt export",
        description="Derive a serving artefact from a model bundle. --int8: the text tower "
        "(the query encoder) as an int8 ONNX Runtime model in BUNDLE/int8/, served with "
        "CONVIRT_QUANTIZE=int8; the fp32 bundle, its fingerprint and the index stay as they are.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle folder (RUN/bundle)")
    parser.add_argument(
        "--int8", action="store_true", required=True, help="quantise the query encoder to int8"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        fingerprint = read_bundle_info(args.bundle)["fingerprint"]
        info = export_int8(args.bundle)
    except (BundleError, OSError) as err:
        print(f"convirt export: error: {err}", file=sys.stderr)
        return 1
    size = (int8_dir(args.bundle) / MODEL_NAME).stat().st_size
    print(
        f"wrote {int8_dir(args.bundle)}: {MODEL_NAME} ({size / 2**20:.1f} MiB, "
        f"{info['engine']}) from bundle {fingerprint} in {info['export_seconds']} s; "
        "serve it with CONVIRT_QUANTIZE=int8"
    )
    return 0
