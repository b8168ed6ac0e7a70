"""`convirt train`: the ConVIRT training loop, written out plainly.

One epoch = every training pair once, in batches. After each epoch: validation (loss and dev
retrieval, training/validation.py), the LR plateau scheduler, early stopping, a checkpoint (for
--resume), and the bundle when the selection criterion (`select_by`) improved.

What the loop carries is the Run (training/run.py, which also assembles it); what --resume must
find unchanged is training/run_identity.py; the CSV rows it writes, training/epoch_log.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from convirt.cli_options import resolve_device
from convirt.loss import convirt_loss
from convirt.paths import default_iu_reports

from . import distributed, stages
from .checkpoint import TrainState, load_checkpoint, read_checkpoint_state
from .config import TrainConfig
from .data import EpochSampler, batch_groups
from .pretrain_text import pretrain_text, read_pretrain_info
from .run import BUNDLE_DIR, CHECKPOINT_NAME, Run, start_run
from .run_identity import is_complete, manifest_hashes, refuse_changed_config, run_identity
from .text_corpus import report_corpus
from .validation import Validation, validate

log = logging.getLogger(__name__)

TEXT_STAGE_DIR = "text-pretrained"


@dataclass
class TrainResult:
    out_dir: Path
    bundle_dir: Path | None
    state: TrainState


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
    device = torch.device(resolve_device(config.device))
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
        run.epoch_log.step(step=state.step, epoch=state.epoch + 1, loss=loss, lr=lr)
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
    """Validation, LR schedule, best-bundle export, early stopping, epoch log row."""
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
    run.epoch_log.epoch(
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
