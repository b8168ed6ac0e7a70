"""The model bundle: one directory that fully describes a trained model.

    bundle.json          format (BUNDLE_FORMAT), fingerprint, ModelConfig, training provenance
    weights.safetensors  both encoders and both heads
    text_config/         the BERT architecture (config.json), so loading needs no original folder
    tokenizer/           the tokenizer files

The fingerprint is a hash of the weights; indexes record it so a mismatched model is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .encoders import ImageEncoder, build_image_encoder, build_text_encoder, text_encoder_path
from .model import ConVIRT

BUNDLE_FORMAT = 1
INFO_NAME = "bundle.json"
WEIGHTS_NAME = "weights.safetensors"


class BundleError(ValueError):
    """The bundle directory is missing, incomplete, corrupt or of an unknown format."""


@dataclass
class Bundle:
    model: ConVIRT
    tokenizer: Any
    config: ModelConfig
    fingerprint: str
    path: Path | None = None
    provenance: dict = field(default_factory=dict)


def fingerprint_state(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in name order (16 hex chars)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_encoder_path(config))


def save_bundle(
    model: ConVIRT, tokenizer: Any, out_dir: str | Path, provenance: dict | None = None
) -> str:
    """Write the bundle atomically (a half-written bundle never appears); returns the fingerprint."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fingerprint = fingerprint_state(state)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state, staging / WEIGHTS_NAME)
        model.text_encoder.bert.config.save_pretrained(staging / "text_config")
        tokenizer.save_pretrained(staging / "tokenizer")
        info = {
            "format": BUNDLE_FORMAT,
            "fingerprint": fingerprint,
            "model": model.config.model_dump(),
            "image_feature_dim": model.image_encoder.out_dim,
            "text_feature_dim": model.text_encoder.out_dim,
            "provenance": provenance or {},
        }
        (staging / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fingerprint


def replace_dir(staging: Path, target: Path) -> None:
    """staging becomes target; an existing target is moved aside first and removed after."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def read_bundle_info(path: str | Path) -> dict:
    """bundle.json alone (cheap): fingerprint, config and provenance without loading weights."""
    path = Path(path)
    info_path = path / INFO_NAME
    if not info_path.is_file():
        raise BundleError(
            f"{path} is not a model bundle ({INFO_NAME} missing): train one with "
            "`convirt train --out DIR` and pass DIR/bundle"
        )
    info = json.loads(info_path.read_text())
    if info.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path}: bundle format {info.get('format')!r}, this code reads {BUNDLE_FORMAT}"
        )
    return info


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the model from the bundle alone (no network, no original weight folders)."""
    from transformers import AutoTokenizer

    path = Path(path)
    info = read_bundle_info(path)
    config = ModelConfig.model_validate(info["model"])
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise BundleError(f"{path}: {WEIGHTS_NAME} missing; the bundle is incomplete")
    state = load_file(weights_path)
    fingerprint = fingerprint_state(state)
    if fingerprint != info["fingerprint"]:
        raise BundleError(
            f"{path}: weights fingerprint {fingerprint} does not match the recorded "
            f"{info['fingerprint']}; the weights file is corrupt or was replaced"
        )
    model = ConVIRT(
        config,
        build_image_encoder(config, pretrained=False),
        build_text_encoder(config, bert_config_dir=path / "text_config"),
    )
    model.load_state_dict(state)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    return Bundle(model, tokenizer, config, fingerprint, path, info.get("provenance", {}))


def initial_image_encoder(config: ModelConfig) -> ImageEncoder:
    """The image encoder as training started from it (the ImageNet weights, by default): the
    baseline ConVIRT must beat."""
    return build_image_encoder(config)
