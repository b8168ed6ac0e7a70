"""Training checkpoints: everything needed to continue bit-for-bit where a run stopped."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or next to start)
    batch_in_epoch: int = 0  # batches of `epoch` already trained
    step: int = 0  # optimiser steps over the whole run
    loss_sum: float = 0.0  # running sums of the epoch in progress (for its mean train loss)
    pairs_in_epoch: int = 0
    train_seconds: float = 0.0
    best_val_loss: float = float("inf")  # the lowest validation loss so far
    best_score: float = float("-inf")  # of the exported epoch, by select_by (higher is better)
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    finished: bool = False


def save_checkpoint(
    path: Path,
    model,
    optimizer,
    scheduler,
    state: TrainState,
    config: dict,
    extras: dict | None = None,
) -> None:
    """Write atomically: a kill mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": asdict(state),
        "config": config,
        "extras": extras or {},  # what only some configs train: averaged weights, temperature
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[TrainState, dict, dict]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng_cpu"])
    if payload["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return TrainState(**payload["state"]), payload["config"], payload.get("extras", {})


def read_checkpoint_state(path: Path) -> tuple[TrainState, dict]:
    """The progress and settings of a checkpoint, without building a model."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return TrainState(**payload["state"]), payload["config"]
