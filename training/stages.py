"""The two-stage recipe around the main loop: stage 1 (heads on cached features, training/heads.py)
before it, and the locks that make the main loop stage 2.

Why: a locked tower needs no optimiser state, no backward pass and, with its features cached, no
forward pass either. Stage 2 keeps the text tower locked (its sentence features come from the
feature cache: a step never runs it) and trains only the top blocks of the image trunk, starting
from stage 1's heads, so the minutes after stage 1 go to the image tower, where pretrained
ImageNet features are furthest from radiology.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from convirt.model import ConVIRT

from .config import TrainConfig
from .data import PairDataset
from .features import SentenceTable, all_sentences, feature_root, text_features
from .heads import STAGE1_DIR, load_heads, train_heads

log = logging.getLogger(__name__)


def run_stage1(
    config: TrainConfig, manifests: list[Path], out_dir: Path, identity: dict, progress: bool
) -> Path | None:
    """Stage 1 into OUT/stage1 when configured (reused when complete); its bundle's path. With
    epochs 0 that bundle becomes OUT/bundle: the run is stage 1 alone."""
    if config.stage1 is None:
        return None
    from .run import BUNDLE_DIR, build_datasets

    train_set, dev_splits = build_datasets(config, manifests, progress)
    folder = out_dir / STAGE1_DIR
    train_heads(config, config.stage1, train_set, dev_splits, folder, identity, progress)
    bundle = folder / BUNDLE_DIR
    if config.epochs == 0:
        target = out_dir / BUNDLE_DIR
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(bundle, target)
    return bundle


def lock_towers(model: ConVIRT, config: TrainConfig) -> None:
    """requires_grad off for a locked text tower and for the image trunk below its top blocks."""
    if config.lock_text:
        model.text_encoder.requires_grad_(False)
    if config.image_trainable_blocks is not None:
        for module in locked_image_modules(model, config.image_trainable_blocks):
            module.requires_grad_(False)


def locked_image_modules(model: ConVIRT, trainable_blocks: int) -> list[nn.Module]:
    """The image trunk's modules below its top `trainable_blocks` blocks (0: the whole trunk).
    EfficientNet-Lite: stem and MBConv blocks (the final conv counts with the top blocks);
    ResNet50: the stem and the stages counted as blocks."""
    trunk = model.image_encoder.trunk
    net = getattr(trunk, "net", None)
    if net is not None and hasattr(net, "_blocks"):
        if trainable_blocks == 0:
            return [net]
        blocks = list(net._blocks)
        keep = min(trainable_blocks, len(blocks) + 1) - 1  # the final conv is the first "block"
        return [net._conv_stem, net._bn0, *blocks[: len(blocks) - keep]]
    children = list(trunk.children())
    return children[: max(0, len(children) - trainable_blocks)]


def freeze_locked_batchnorm(model: ConVIRT, config: TrainConfig) -> None:
    """BatchNorm of locked image blocks keeps its statistics (eval mode) whatever the setting."""
    if config.image_trainable_blocks is None:
        return
    for module in locked_image_modules(model, config.image_trainable_blocks):
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()


def locked_text_table(
    model: ConVIRT, tokenizer, config: TrainConfig, train_set: PairDataset, progress: bool
) -> SentenceTable:
    """The cached features of every sentence a training sample can draw."""
    sentences = all_sentences(train_set)
    vectors, store = text_features(
        model.text_encoder, tokenizer, config.model.max_text_tokens, sentences,
        feature_root(config.feature_cache_dir), progress=progress,
    )  # fmt: skip
    log.info("locked text tower: %d sentences (%d computed now)", len(sentences), store.computed)
    return SentenceTable(sentences, vectors)


class LockedTextForward(nn.Module):
    """(v, u) from pixels and cached text features: the text tower is not run."""

    def __init__(self, model: ConVIRT):
        super().__init__()
        self.model = model

    def forward(
        self, pixels: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(pixels)[1], self.model.text_head(text_features)


def start_from_stage1(model: ConVIRT, stage1_bundle: Path | None) -> None:
    if stage1_bundle is not None:
        load_heads(model, stage1_bundle)
        log.info("stage 2 starts from the heads of %s", stage1_bundle)
