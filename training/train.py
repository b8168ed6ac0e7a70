"""`convirt train`: the ConVIRT training loop, written out plainly.

One epoch = every training pair once, in batches. After each epoch: validation loss, the LR plateau
scheduler, early stopping, a checkpoint (for --resume), and the bundle when validation improved.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from convirt.bundle import load_tokenizer, save_bundle
from convirt.imagecache import ImageCache
from convirt.loss import convirt_loss
from convirt.model import ConVIRT, build_model

from . import distributed
from .checkpoint import TrainState, load_checkpoint, read_checkpoint_state, save_checkpoint
from .config import TrainConfig
from .data import Collator, EpochSampler, PairDataset, load_pairs, report_skips

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
BUNDLE_DIR = "bundle"


@dataclass
class TrainResult:
    out_dir: Path
    bundle_dir: Path | None
    state: TrainState


@dataclass
class Run:
    """What one training run holds while it goes: passed around instead of a dozen arguments."""

    config: TrainConfig
    model: ConVIRT
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    state: TrainState
    train_set: PairDataset
    val_set: PairDataset
    collate: Collator
    tokenizer: object
    dist: distributed.DistInfo
    device: torch.device
    out_dir: Path
    metrics: MetricsLog
    provenance: dict
    progress: bool

    def autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_loader(self, sampler: EpochSampler) -> DataLoader:
        return self._loader(self.train_set, sampler=sampler, batch_size=self.config.batch_size)

    def val_loader(self, batches: list[list[tuple[int, int]]]) -> DataLoader:
        return self._loader(self.val_set, batch_sampler=batches)

    def _loader(self, dataset: PairDataset, **batching) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.config.num_workers,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
            # Its own generator: the global RNG (dropout) must not depend on how often loaders start.
            generator=torch.Generator().manual_seed(self.config.seed),
            **batching,
        )

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            save_checkpoint(
                self.out_dir / CHECKPOINT_NAME, self.model, self.optimizer, self.scheduler,
                self.state, run_identity(self.config, self.provenance["manifests"]),
            )  # fmt: skip

    def export_bundle(self, note: str) -> None:
        if self.dist.is_main:
            provenance = {
                **self.provenance,
                "epochs_completed": self.state.epoch,
                "step": self.state.step,
                "best_val_loss": self.state.best_val_loss,
                "note": note,
            }
            save_bundle(self.model, self.tokenizer, self.out_dir / BUNDLE_DIR, provenance)


class MetricsLog:
    """Per-epoch and per-step CSV files (appended on resume) and TensorBoard when installed."""

    EPOCH_FIELDS = ("epoch", "step", "train_loss", "val_loss", "lr", "pairs_per_s", "seconds")
    STEP_FIELDS = ("step", "epoch", "loss", "lr")

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.epochs_path = out_dir / "metrics.csv"
        self.steps_path = out_dir / "steps.csv"
        self.tensorboard = _tensorboard_writer(out_dir / "tensorboard") if enabled else None

    def step(self, **row) -> None:
        if self.enabled:
            self._append(self.steps_path, self.STEP_FIELDS, row)
            if self.tensorboard:
                self.tensorboard.add_scalar("loss/train_step", row["loss"], row["step"])

    def epoch(self, **row) -> None:
        if self.enabled:
            self._append(self.epochs_path, self.EPOCH_FIELDS, row)
            if self.tensorboard:
                for key in ("train_loss", "val_loss", "lr", "pairs_per_s"):
                    self.tensorboard.add_scalar(f"epoch/{key}", row[key], row["epoch"])
                self.tensorboard.flush()

    @staticmethod
    def _append(path: Path, fields, row: dict) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(fields)
            writer.writerow(
                [f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in fields]
            )


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_datasets(
    config: TrainConfig, manifests: list[Path], progress: bool
) -> tuple[PairDataset, PairDataset]:
    """Training and validation pairs (text required) of every manifest, through the image cache:
    images it lacks are decoded into it first, once, for every later run."""
    cache = ImageCache(config.cache_dir)
    side = config.model.resize
    datasets = {}
    for role, split in (("train", config.train_split), ("val", config.val_split)):
        table, skipped = load_pairs(
            manifests, split, cache, side, config.cache_workers, progress=progress
        )
        report_skips(skipped, f"{split} split")
        datasets[role] = PairDataset(
            table, cache.reader(side), config.model, train=role == "train", seed=config.seed,
            sentence_filter=config.sentence_filter,
        )  # fmt: skip
    cache.close()
    if len(datasets["train"]) < config.batch_size:
        raise ValueError(
            f"only {len(datasets['train'])} training pairs with text in split "
            f"{config.train_split!r}, fewer than one batch of {config.batch_size}"
        )
    return datasets["train"], datasets["val"]


def train(
    config: TrainConfig,
    manifests: list[Path],
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or continue training) a model; the best epoch ends up in out_dir/bundle."""
    out_dir = Path(out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    dist_info = distributed.setup(device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(
            f"{out_dir} already holds a training run: pass --resume to continue it, "
            "or choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint_path.exists():
        saved_state, saved_identity = read_checkpoint_state(checkpoint_path)
        refuse_changed_config(
            saved_identity, run_identity(config, manifest_hashes(manifests)), out_dir
        )
        if is_complete(saved_state, config) and (out_dir / BUNDLE_DIR).exists():
            log.info(
                "%s is a finished run (%d epochs): reusing its bundle", out_dir, saved_state.epoch
            )
            distributed.teardown(dist_info)
            return TrainResult(out_dir, out_dir / BUNDLE_DIR, saved_state)
    started = time.perf_counter()
    run = start_run(config, manifests, out_dir, dist_info, device, progress)
    log.info(
        "ready to train in %.1f s: %d training pairs, %d validation pairs",
        time.perf_counter() - started, len(run.train_set), len(run.val_set),
    )  # fmt: skip
    if checkpoint_path.exists():
        run.state, _ = load_checkpoint(checkpoint_path, run.model, run.optimizer, run.scheduler)
        log.info("resuming at epoch %d batch %d", run.state.epoch + 1, run.state.batch_in_epoch)

    while not run.state.finished and run.state.epoch < config.epochs:
        if config.max_steps and run.state.step >= config.max_steps:
            break
        if train_epoch(run):
            run.save_checkpoint()
            break
        end_epoch(run)
        run.save_checkpoint()
    bundle_dir = out_dir / BUNDLE_DIR
    if not bundle_dir.exists():  # stopped by --max-steps before any epoch ended
        run.export_bundle(note=f"stopped at step {run.state.step} before validation")
    distributed.teardown(dist_info)
    return TrainResult(out_dir, bundle_dir, run.state)


# Settings that may change between a run and its --resume without changing what is learned.
# ("preload" is gone, replaced by the image cache; runs saved with it still resume.)
RESUMABLE_CHANGES = {
    "epochs", "max_steps", "device", "num_workers", "threads", "preload", "cache_dir",
    "cache_workers",
}  # fmt: skip


def is_complete(state: TrainState, config: TrainConfig) -> bool:
    """Nothing left to train: early-stopped, all epochs done, or --max-steps reached."""
    out_of_steps = config.max_steps is not None and state.step >= config.max_steps
    return state.finished or state.epoch >= config.epochs or out_of_steps


def manifest_hashes(manifests: list[Path]) -> list[dict]:
    return [{"path": str(Path(m).resolve()), "sha256": _sha256(Path(m))} for m in manifests]


def run_identity(config: TrainConfig, manifests: list[dict]) -> dict:
    """What a checkpoint was trained with: every setting, and the content of the data manifests."""
    return {**config.model_dump(), "data": [m["sha256"] for m in manifests]}


def refuse_changed_config(saved: dict, current: dict, out_dir: Path) -> None:
    changed = [
        key for key in sorted(set(saved) | set(current))
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    ]  # fmt: skip
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:3])
        raise ValueError(
            f"cannot resume {out_dir}: it was trained with other settings or data ({details}). "
            "Use a new --out for a new run."
        )


def start_run(config, manifests, out_dir, dist_info, device, progress) -> Run:
    tokenizer = load_tokenizer(config.model)
    train_set, val_set = build_datasets(config, manifests, progress and dist_info.is_main)
    model = build_model(config.model, seed=config.seed).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience
    )
    ddp_model = model
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    return Run(
        config=config, model=model, ddp_model=ddp_model, optimizer=optimizer, scheduler=scheduler,
        state=TrainState(), train_set=train_set, val_set=val_set,
        collate=Collator(tokenizer, config.model.max_text_tokens), tokenizer=tokenizer,
        dist=dist_info, device=device, out_dir=out_dir,
        metrics=MetricsLog(out_dir, enabled=dist_info.is_main),
        provenance=_provenance(config, manifests, len(train_set), len(val_set)), progress=progress,
    )  # fmt: skip


def train_epoch(run: Run) -> bool:
    """Train the rest of the current epoch; True when --max-steps stopped it part-way."""
    config, state = run.config, run.state
    sampler = EpochSampler(
        len(run.train_set), config.batch_size, state.epoch, config.seed,
        rank=run.dist.rank, world_size=run.dist.world_size, start_batch=state.batch_in_epoch,
    )  # fmt: skip
    bar = tqdm(
        total=sampler.batches_per_epoch(), initial=state.batch_in_epoch,
        desc=f"epoch {state.epoch + 1}/{config.epochs}", unit="batch",
        disable=not (run.progress and run.dist.is_main), dynamic_ncols=True,
    )  # fmt: skip
    set_train_mode(run)
    started = time.perf_counter()
    for batch in run.train_loader(sampler):
        loss, batch_pairs = train_step(run, batch)
        state.loss_sum += loss * batch_pairs
        state.pairs_in_epoch += batch_pairs
        state.train_seconds += time.perf_counter() - started
        started = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        run.metrics.step(step=state.step, epoch=state.epoch + 1, loss=loss, lr=lr)
        bar.update()
        bar.set_postfix(
            loss=f"{loss:.3f}", pairs_s=f"{state.pairs_in_epoch / state.train_seconds:.1f}"
        )
        if config.max_steps and state.step >= config.max_steps:
            bar.close()
            return True
    bar.close()
    return False


def set_train_mode(run: Run) -> None:
    run.ddp_model.train()
    if run.config.image_batchnorm == "frozen":
        for module in run.model.image_encoder.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """One optimiser step on a (global) batch; returns its loss and the number of pairs."""
    pixels = batch["pixels"].to(run.device, non_blocking=True)
    if run.config.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    input_ids = batch["input_ids"].to(run.device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(run.device, non_blocking=True)
    with run.autocast():
        v, u = run.ddp_model(pixels, input_ids, attention_mask)
    v, u = distributed.gather_with_grad(v, run.dist), distributed.gather_with_grad(u, run.dist)
    loss = convirt_loss(v, u, run.config.temperature, run.config.image_weight)
    run.optimizer.zero_grad(set_to_none=True)
    (loss * run.dist.world_size).backward()
    run.optimizer.step()
    run.state.step += 1
    run.state.batch_in_epoch += 1
    return loss.item(), len(v)


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """Mean loss over the validation pairs in fixed batches (eval view, fixed sentences)."""
    size, batch_size = len(run.val_set), run.config.batch_size
    batches = [
        [(0, i) for i in range(start, min(start + batch_size, size))]
        for start in range(0, size, batch_size)
    ]
    batches = [b for b in batches if len(b) >= 2]
    if not batches:
        return float("nan")
    run.model.eval()
    total, count = 0.0, 0
    for batch in run.val_loader(batches):
        pixels = batch["pixels"].to(run.device)
        if run.config.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with run.autocast():
            v, u = run.model(pixels, batch["input_ids"].to(run.device),
                             batch["attention_mask"].to(run.device))  # fmt: skip
        total += convirt_loss(v, u, run.config.temperature, run.config.image_weight).item() * len(v)
        count += len(v)
    return total / count


def end_epoch(run: Run) -> None:
    """Validation, LR schedule, best-bundle export, early stopping, metrics row."""
    state, config = run.state, run.config
    train_loss = state.loss_sum / max(1, state.pairs_in_epoch)
    val_loss = validation_loss(run)
    if val_loss != val_loss:  # NaN: no validation split; steer by the training loss instead
        val_loss = train_loss
    val_loss = distributed.broadcast_value(val_loss, run.dist, run.device)
    run.scheduler.step(val_loss)
    state.epoch += 1
    if val_loss < state.best_val_loss - 1e-4:
        state.best_val_loss, state.best_epoch = val_loss, state.epoch
        state.epochs_without_improvement = 0
        run.export_bundle(note=f"best epoch {state.epoch}")
    else:
        state.epochs_without_improvement += 1
    run.metrics.epoch(
        epoch=state.epoch, step=state.step, train_loss=train_loss, val_loss=val_loss,
        lr=run.optimizer.param_groups[0]["lr"],
        pairs_per_s=state.pairs_in_epoch / max(state.train_seconds, 1e-9),
        seconds=state.train_seconds,
    )  # fmt: skip
    log.info("epoch %d: train %.4f val %.4f (best %.4f at %d)", state.epoch, train_loss, val_loss,
             state.best_val_loss, state.best_epoch)  # fmt: skip
    if state.epochs_without_improvement >= config.early_stopping_patience:
        log.info("early stopping: no improvement for %d epochs", state.epochs_without_improvement)
        state.finished = True
    state.batch_in_epoch, state.loss_sum, state.pairs_in_epoch, state.train_seconds = 0, 0.0, 0, 0.0


def _provenance(config: TrainConfig, manifests: list[Path], n_train: int, n_val: int) -> dict:
    return {
        "manifests": manifest_hashes(manifests),
        "train_pairs": n_train,
        "val_pairs": n_val,
        "config": config.model_dump(),
        "code_version": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:  # in blocks: a manifest of 300k rows is ~80 MB
        return hashlib.file_digest(f, "sha256").hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
