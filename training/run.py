"""What one training run holds while it goes (the Run), and how `convirt train` assembles it:
data (through the image cache, per dev split), model, optimiser, LR schedule, epoch log."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from convirt.bundle import load_tokenizer, save_bundle
from convirt.imagecache import ImageCache
from convirt.model import ConVIRT, build_model

from . import distributed, folds, stages
from .checkpoint import TrainState, save_checkpoint
from .config import TrainConfig
from .data import Collator, EpochSampler, IndexedPairs, PairDataset, load_pairs, log_skips
from .epoch_log import EpochLog
from .run_identity import manifest_hashes, run_identity, run_provenance
from .validation import DevSplit, Validation

CHECKPOINT_NAME = "checkpoint.pt"
BUNDLE_DIR = "bundle"


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
    epoch_log: EpochLog
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
        log_skips(skipped, f"{split} split")
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
        epoch_log=EpochLog(out_dir, dist_info.is_main, [d.name for d in dev_splits]),
        provenance=run_provenance(config, manifests, len(train_set), n_dev), progress=progress,
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
