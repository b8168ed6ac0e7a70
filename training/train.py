"""`convirt train`: the ConVIRT training loop, written out plainly.

One epoch = every training pair once, in batches. After each epoch: validation (loss and dev
retrieval, training/validation.py), the LR plateau scheduler, early stopping, a checkpoint (for
--resume), and the bundle when the selection criterion (`select_by`) improved.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from convirt.bundle import load_tokenizer, save_bundle
from convirt.imagecache import ImageCache
from convirt.loss import convirt_loss
from convirt.model import ConVIRT, build_model
from convirt.paths import default_iu_reports

from . import distributed, folds, stages
from .checkpoint import TrainState, load_checkpoint, read_checkpoint_state, save_checkpoint
from .config import TrainConfig
from .data import (
    Collator,
    EpochSampler,
    IndexedPairs,
    PairDataset,
    batch_groups,
    load_pairs,
    report_skips,
)
from .pretrain_text import pretrain_text, read_pretrain_info, report_corpus
from .validation import DevSplit, Validation, validate

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
BUNDLE_DIR = "bundle"
TEXT_STAGE_DIR = "text-pretrained"


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
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    state: TrainState
    train_set: PairDataset
    dev_splits: list[DevSplit]
    collate: Collator
    tokenizer: object
    dist: distributed.DistInfo
    device: torch.device
    out_dir: Path
    metrics: MetricsLog
    provenance: dict
    progress: bool
    identity: dict  # what a checkpoint must match to be resumed (see run_identity)
    ema: AveragedModel | None = None  # the averaged weights validated and exported (ema_decay)
    log_temperature: torch.nn.Parameter | None = None  # learn_temperature
    train_collate: Collator | None = None  # lock_text: cached sentence features, not tokens

    @property
    def temperature(self) -> torch.Tensor | float:
        if self.log_temperature is None:
            return self.config.temperature
        return self.log_temperature.exp().clamp(0.01, 1.0)

    @property
    def exported_model(self) -> ConVIRT:
        """The weights that are validated and become the bundle: the average when kept."""
        return self.ema.module if self.ema is not None else self.model

    def autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_loader(self, sampler: EpochSampler) -> DataLoader:
        dataset = self.train_set
        if self.config.false_negatives == "mask":
            dataset = IndexedPairs(dataset)
        collate = self.train_collate or self.collate
        return self.loader(dataset, sampler=sampler, batch_size=self.config.batch_size,
                           collate_fn=collate)  # fmt: skip

    def loader(self, dataset: PairDataset, collate_fn=None, **batching) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.config.num_workers,
            collate_fn=collate_fn or self.collate,
            pin_memory=self.device.type == "cuda",
            # Its own generator: the global RNG (dropout) must not depend on how often loaders start.
            generator=torch.Generator().manual_seed(self.config.seed),
            **batching,
        )

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            save_checkpoint(
                self.out_dir / CHECKPOINT_NAME, self.model, self.optimizer, self.scheduler,
                self.state, self.identity, extras=self.checkpoint_extras(),
            )  # fmt: skip

    def checkpoint_extras(self) -> dict:
        extras = {}
        if self.ema is not None:
            extras["ema"] = self.ema.state_dict()
        if self.log_temperature is not None:
            extras["log_temperature"] = self.log_temperature.detach().clone()
        return extras

    def restore_extras(self, extras: dict) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(extras["ema"])
        if self.log_temperature is not None:
            with torch.no_grad():
                self.log_temperature.copy_(extras["log_temperature"])

    def export_bundle(self, note: str, validation: Validation | None = None) -> None:
        if self.dist.is_main:
            provenance = {
                **self.provenance,
                "epochs_completed": self.state.epoch,
                "step": self.state.step,
                "best_val_loss": self.state.best_val_loss,
                "selected_by": self.config.select_by,
                "note": note,
            }
            if validation is not None:
                provenance["val_loss"] = validation.loss
                provenance["dev_recall_at_10"] = validation.recall
            save_bundle(self.exported_model, self.tokenizer, self.out_dir / BUNDLE_DIR, provenance)


class MetricsLog:
    """Per-epoch and per-step CSV files (appended on resume) and TensorBoard when installed.

    metrics.csv has one dev_r10_<split> column per dev split (text->image recall@10) and their
    mean, dev_r10, beside the losses.
    """

    EPOCH_FIELDS = ("epoch", "step", "train_loss", "val_loss", "dev_r10", "lr", "pairs_per_s",
                    "seconds")  # fmt: skip
    STEP_FIELDS = ("step", "epoch", "loss", "lr")

    def __init__(self, out_dir: Path, enabled: bool, dev_splits: list[str] = ()):
        self.enabled = enabled
        self.epoch_fields = (*self.EPOCH_FIELDS, *(f"dev_r10_{name}" for name in dev_splits))
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
            self._append(self.epochs_path, self.epoch_fields, row)
            if self.tensorboard:
                for key in ("train_loss", "val_loss", "dev_r10", "lr", "pairs_per_s"):
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
) -> tuple[PairDataset, list[DevSplit]]:
    """Training pairs (text required) of every manifest together, and each manifest's validation
    pairs apart (retrieval is scored per dev split), through the image cache: images it lacks
    are decoded into it first, once, for every later run."""
    cache = ImageCache(config.cache_dir)
    side = config.model.resize

    def pairs(sources: list[Path], split: str, train: bool) -> PairDataset:
        table, skipped = load_pairs(
            sources, split, cache, side, config.cache_workers, progress=progress
        )
        report_skips(skipped, f"{split} split")
        return PairDataset(
            table, cache.reader(side), config.model, train=train, seed=config.seed,
            sentence_filter=config.sentence_filter, full_text_words=config.full_text_words,
        )  # fmt: skip

    names = split_names(manifests)
    if config.holdout is not None:  # validate on a fold of train, never on dev
        train_set, dev = folds.holdout_datasets(config, manifests, names, pairs)
    else:
        train_set = pairs(manifests, config.train_split, train=True)
        dev = [DevSplit(name, pairs([m], config.val_split, False)) for name, m in zip(names, manifests, strict=True)]  # fmt: skip
    cache.close()
    if len(train_set) < config.batch_size:
        raise ValueError(
            f"only {len(train_set)} training pairs with text in split "
            f"{config.train_split!r}, fewer than one batch of {config.batch_size}"
        )
    return train_set, [d for d in dev if len(d.dataset)]


def split_names(manifests: list[Path]) -> list[str]:
    """A short name per manifest: its folder (medpix, roco...), numbered when two share one."""
    names = []
    for manifest in manifests:
        name = Path(manifest).resolve().parent.name or "data"
        names.append(name if name not in names else f"{name}{len(names)}")
    return names


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
    identity = run_identity(config, manifest_hashes(manifests))
    config = text_stage(config, manifests, out_dir, dist_info, progress)
    stage1_bundle = stages.run_stage1(config, manifests, out_dir, identity, progress)
    if config.epochs == 0:  # stage 1 alone
        distributed.teardown(dist_info)
        stage1_state, _ = read_checkpoint_state(stage1_bundle.parent / CHECKPOINT_NAME)
        return TrainResult(out_dir, out_dir / BUNDLE_DIR, stage1_state)
    run = start_run(config, manifests, out_dir, dist_info, device, progress, identity)
    stages.start_from_stage1(run.model, stage1_bundle)
    log.info(
        "ready to train in %.1f s: %d training pairs, %d validation pairs",
        time.perf_counter() - started, len(run.train_set), run.provenance["val_pairs"],
    )  # fmt: skip
    if checkpoint_path.exists():
        run.state, _, extras = load_checkpoint(
            checkpoint_path, run.model, run.optimizer, run.scheduler
        )
        run.restore_extras(extras)
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


def text_stage(
    config: TrainConfig,
    manifests: list[Path],
    out_dir: Path,
    dist_info: distributed.DistInfo,
    progress: bool,
) -> TrainConfig:
    """With `pretrain_text` set: pretrain the text tower into OUT/text-pretrained (once: a rerun
    or --resume reuses it) and return the config whose model starts from it."""
    settings = config.pretrain_text
    if settings is None:
        return config
    folder = (out_dir / TEXT_STAGE_DIR).resolve()
    if read_pretrain_info(folder) is not None:
        log.info("text tower: reusing the pretraining in %s", folder)
    elif dist_info.enabled:
        raise ValueError(
            "pretrain_text is not run under torchrun: run `convirt pretrain-text --out DIR` "
            "first, then train with --set model.text_encoder=DIR --set pretrain_text=null"
        )
    else:
        iu_reports = default_iu_reports() if settings.iu_reports else None
        corpus = report_corpus(manifests, config.train_split, iu_reports)
        log.info("text tower: %.1f min of masked-LM pretraining on %d sentences",
                 settings.minutes, len(corpus))  # fmt: skip
        result = pretrain_text(
            config.model.text_encoder, corpus, folder, settings, progress, config.device
        )
        log.info("text tower: %d steps, held-out MLM loss %.3f -> %.3f", result.steps,
                 result.heldout_loss_before, result.heldout_loss_after)  # fmt: skip
    model = config.model.model_copy(update={"text_encoder": str(folder)})
    return config.model_copy(update={"model": model})


def start_run(config, manifests, out_dir, dist_info, device, progress, identity=None) -> Run:
    """Data, model, optimiser and schedule of a run; `identity` (default: this config's) is what
    its checkpoints record."""
    tokenizer = load_tokenizer(config.model)
    train_set, dev_splits = build_datasets(config, manifests, progress and dist_info.is_main)
    model = build_model(config.model, seed=config.seed).to(device)
    stages.lock_towers(model, config)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": trainable}]
    log_temperature = None
    if config.learn_temperature:
        log_temperature = torch.nn.Parameter(
            torch.tensor(float(config.temperature), device=device).log()
        )
        groups.append({"params": [log_temperature], "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(train_set) // dist_info.world_size // config.batch_size
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    ddp_model, train_collate = model, None
    if config.lock_text:
        table = stages.locked_text_table(model, tokenizer, config, train_set, progress)
        train_collate = Collator(tokenizer, config.model.max_text_tokens, text_features=table)
        ddp_model = stages.LockedTextForward(model)
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp_model = DistributedDataParallel(ddp_model, device_ids=device_ids)
    ema = None
    if config.ema_decay is not None:
        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
    n_dev = sum(len(d.dataset) for d in dev_splits)
    return Run(
        config=config, model=model, ddp_model=ddp_model, optimizer=optimizer, scheduler=scheduler,
        state=TrainState(), train_set=train_set, dev_splits=dev_splits,
        collate=Collator(tokenizer, config.model.max_text_tokens), tokenizer=tokenizer,
        dist=dist_info, device=device, out_dir=out_dir,
        metrics=MetricsLog(out_dir, dist_info.is_main, [d.name for d in dev_splits]),
        provenance=_provenance(config, manifests, len(train_set), n_dev), progress=progress,
        ema=ema, log_temperature=log_temperature, train_collate=train_collate,
        identity=identity or run_identity(config, manifest_hashes(manifests)),
    )  # fmt: skip


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The paper's plateau halving (stepped per epoch on the validation loss), or a warm-up and
    cosine decay (stepped per optimiser step) over the whole run."""
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience
        )
    total = max(1, config.epochs * steps_per_epoch)  # --max-steps stops a run, not its schedule
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    stages.freeze_locked_batchnorm(run.model, run.config)


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """One optimiser step on a (global) batch; returns its loss and the number of pairs."""
    pixels = batch["pixels"].to(run.device, non_blocking=True)
    if run.config.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    if "text_features" in batch:  # lock_text: the text tower is not run
        text = (batch["text_features"].to(run.device, non_blocking=True),)
    else:
        text = (batch["input_ids"].to(run.device, non_blocking=True),
                batch["attention_mask"].to(run.device, non_blocking=True))  # fmt: skip
    with run.autocast():
        v, u = run.ddp_model(pixels, *text)
    v, u = distributed.gather_with_grad(v, run.dist), distributed.gather_with_grad(u, run.dist)
    groups = None
    if "index" in batch:  # false_negatives: mask (a gathered batch is masked per rank's share)
        groups = batch_groups(run.train_set.table, batch["index"]) if not run.dist.enabled else None
    loss = convirt_loss(v, u, run.temperature, run.config.image_weight, groups)
    run.optimizer.zero_grad(set_to_none=True)
    (loss * run.dist.world_size).backward()
    run.optimizer.step()
    if run.config.lr_schedule == "cosine":
        run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    run.state.step += 1
    run.state.batch_in_epoch += 1
    return loss.item(), len(v)


def validation(run: Run) -> Validation:
    """Loss and dev retrieval of the weights that would be exported."""
    model = run.exported_model

    def prepare(pixels: torch.Tensor) -> torch.Tensor:
        if run.config.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return pixels

    with run.autocast():
        return validate(
            model, run.dev_splits, run.collate, run.config.batch_size, float(torch.as_tensor(run.temperature).detach()),
            run.config.image_weight, run.loader, run.device, prepare,
        )  # fmt: skip


def end_epoch(run: Run) -> None:
    """Validation, LR schedule, best-bundle export, early stopping, metrics row."""
    state, config = run.state, run.config
    train_loss = state.loss_sum / max(1, state.pairs_in_epoch)
    checked = validation(run)
    if checked.loss != checked.loss:  # NaN: no validation split; steer by the training loss
        checked.loss = train_loss
    checked.loss = distributed.broadcast_value(checked.loss, run.dist, run.device)
    if config.lr_schedule == "plateau":
        run.scheduler.step(checked.loss)
    state.epoch += 1
    state.best_val_loss = min(state.best_val_loss, checked.loss)
    score = distributed.broadcast_value(checked.score(config.select_by), run.dist, run.device)
    if score != score:  # no dev retrieval (no dev split): fall back on the loss
        score = -checked.loss
    if score > state.best_score + 1e-4:
        state.best_score, state.best_epoch = score, state.epoch
        state.epochs_without_improvement = 0
        run.export_bundle(f"best epoch {state.epoch} by {config.select_by}", checked)
    else:
        state.epochs_without_improvement += 1
    run.metrics.epoch(
        epoch=state.epoch, step=state.step, train_loss=train_loss, val_loss=checked.loss,
        dev_r10=checked.mean_recall, lr=run.optimizer.param_groups[0]["lr"],
        pairs_per_s=state.pairs_in_epoch / max(state.train_seconds, 1e-9),
        seconds=state.train_seconds,
        **{f"dev_r10_{name}": value for name, value in checked.recall.items()},
    )  # fmt: skip
    recalls = " ".join(f"{name} {value:.3f}" for name, value in checked.recall.items())
    log.info("epoch %d: train %.4f val %.4f dev R@10 %s (best: epoch %d by %s)", state.epoch,
             train_loss, checked.loss, recalls or "-", state.best_epoch, config.select_by)  # fmt: skip
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
