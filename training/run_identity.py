"""What a training run was made with: its identity (what --resume must find unchanged) and the
provenance its bundle records (data manifests by sha256, settings, code commit, time)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from convirt.hashing import sha256_file

from .checkpoint import TrainState
from .config import TrainConfig

# Settings that may change between a run and its --resume without changing what is learned.
# ("preload" is gone, replaced by the image cache; runs saved with it still resume.)
# (Under lr_schedule: cosine, changing epochs re-times the decay from where the run stands.)
RESUMABLE_CHANGES = {
    "epochs", "max_steps", "device", "num_workers", "threads", "preload", "cache_dir",
    "cache_workers", "feature_cache_dir",
}  # fmt: skip


def is_complete(state: TrainState, config: TrainConfig) -> bool:
    """Nothing left to train: early-stopped, all epochs done, or --max-steps reached."""
    out_of_steps = config.max_steps is not None and state.step >= config.max_steps
    return state.finished or state.epoch >= config.epochs or out_of_steps


def manifest_hashes(manifests: list[Path]) -> list[dict]:
    return [{"path": str(Path(m).resolve()), "sha256": sha256_file(m)} for m in manifests]


def run_identity(config: TrainConfig, manifests: list[dict]) -> dict:
    """What a checkpoint was trained with: every setting, and the content of the data manifests."""
    return {**config.model_dump(), "data": [m["sha256"] for m in manifests]}


def refuse_changed_config(saved: dict, current: dict, out_dir: Path) -> None:
    """Refuse to resume (or reuse) a run whose settings or data changed. A setting added to the
    code after the run was saved is absent from `saved`: at its default it changes nothing, so a
    finished `make demo` run is still reused after an update."""
    defaults = TrainConfig().model_dump()

    def differs(key: str) -> bool:
        if key not in saved and key in defaults:
            return current.get(key) != defaults[key]
        return saved.get(key) != current.get(key)

    changed = [
        key for key in sorted(set(saved) | set(current))
        if key not in RESUMABLE_CHANGES and differs(key)
    ]  # fmt: skip
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:3])
        raise ValueError(
            f"cannot resume {out_dir}: it was trained with other settings or data ({details}). "
            "Use a new --out for a new run."
        )


def run_provenance(config: TrainConfig, manifests: list[Path], n_train: int, n_val: int) -> dict:
    return {
        "manifests": manifest_hashes(manifests),
        "train_pairs": n_train,
        "val_pairs": n_val,
        "config": config.model_dump(),
        "code_version": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
