"""Training settings: one pydantic class, filled from a named YAML config and CLI overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from convirt.config import ModelConfig

from .pretrain_text import PretrainTextConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class HeadsStage(BaseModel):
    """Stage 1 (training/heads.py): both towers locked at their pretrained weights, only the two
    projection heads train, on cached features (seconds per epoch on two cores)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    # Cached views per training image: 1 = eval view, 2 = + its mirror, more = + t_v draws.
    image_views: int = Field(2, ge=1)


class HoldOut(BaseModel):
    """Validate (select the epoch, score configs) on one fold of the train split, grouped by case,
    instead of dev: dev stays untouched until the confirmation (training/folds.py)."""

    model_config = ConfigDict(extra="forbid")

    folds: int = Field(5, ge=2)
    fold: int = Field(0, ge=0)
    seed: int = 0


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    # Optional first stage: masked-LM pretraining of the text tower on the train splits' reports
    # (and iu-reports), written to OUT/text-pretrained; ConVIRT then starts from that tower.
    pretrain_text: PretrainTextConfig | None = None
    # Optimisation (paper: Adam 1e-4, weight decay 1e-6, batch 32, tau 0.1, lambda 0.75).
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    temperature: float = Field(0.1, gt=0)
    # Learn tau with the weights (CLIP's way), starting from `temperature`, kept in [0.01, 1].
    learn_temperature: bool = False
    image_weight: float = Field(0.75, ge=0, le=1, description="lambda: weight of l(v->u)")
    # 0 = stage 1 only (needs stage1): the heads-only bundle is the run's bundle.
    epochs: int = Field(200, ge=0)
    max_steps: int | None = Field(None, ge=1)
    # "plateau": the paper's halving of the LR when the validation loss stalls; "cosine": linear
    # warm-up over warmup_steps, then a cosine decay to zero at the last step of the last epoch.
    lr_schedule: Literal["plateau", "cosine"] = "plateau"
    warmup_steps: int = Field(0, ge=0)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(5, ge=0)
    early_stopping_patience: int = Field(10, ge=1)
    # Which epoch becomes the bundle (and what early stopping watches): the lowest validation
    # loss (paper), or the best mean text->image R@10 over the dev splits (training/validation.py).
    select_by: Literal["val_loss", "retrieval"] = "val_loss"
    # Validate and export an exponential moving average of the weights (decay per step) when set.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # "frozen" keeps the image encoder's BatchNorm statistics fixed (affine weights still learn):
    # train and eval then normalise alike, which matters with small batches.
    image_batchnorm: Literal["train", "frozen"] = "train"
    # Locked towers and the two-stage recipe (issue 22). stage1 first trains the heads on cached
    # features of both locked towers into OUT/stage1; the epochs above then continue from it.
    stage1: HeadsStage | None = None
    # The text tower never trains: its sentence features come from the feature cache.
    lock_text: bool = False
    # Only the top N blocks of the image trunk (and its final conv) train; None = all of it.
    image_trainable_blocks: int | None = Field(None, ge=0)
    feature_cache_dir: str | None = Field(
        None, description="feature cache of locked towers (default: $CONVIRT_CACHE_DIR/features)"
    )
    # "mask": pairs of a batch sharing a report or a case (CASE_COLUMNS) are not negatives.
    false_negatives: Literal["keep", "mask"] = "keep"
    holdout: HoldOut | None = None
    # Data.
    sentence_filter: Literal["none", "imaging"] = "none"
    # Reports of at most this many words are used whole instead of one sampled sentence (0: never).
    full_text_words: int = Field(0, ge=0)
    train_split: str = "train"
    val_split: str = "dev"
    cache_dir: str | None = Field(
        None, description="image cache folder (default: $CONVIRT_CACHE_DIR/images)"
    )
    cache_workers: int | None = Field(None, ge=1, description="decoding processes (all cores)")
    num_workers: int = Field(1, ge=0)
    # Runtime.
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (CPU)")
    seed: int = 0


class ConfigError(ValueError):
    """A config name, file or override is wrong; the message says which and why."""


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A named config (paper, cpu, gpu) or a YAML path, with dotted overrides ('model.image_size')."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no config {name_or_path!r}: use one of {', '.join(available_configs())} "
            "or a path to a YAML file"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid config {path}:\n{err}") from err
    if config.epochs == 0 and config.stage1 is None:
        raise ConfigError(f"invalid config {path}: epochs 0 trains nothing without stage1")
    return config


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE items as overrides; values are YAML (numbers, booleans, lists...)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value
