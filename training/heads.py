"""Stage 1 of the two-stage recipe: only the projection heads train, on cached tower features.

Why: both towers locked at their pretrained weights (LiT's finding, and issue 22's calibration:
10 epochs of heads alone matched the 17-minute `cpu` run on the held-out test splits), every
image view and sentence goes through its tower once (training/features.py, shared across runs),
and an epoch of the heads over the 4.8k training pairs takes well under a second on two cores.

The sampling is the main loop's: a seeded permutation per epoch, one sentence drawn per pair with
PairDataset's seed for (seed, epoch, row), and a view drawn among the K cached ones; so a run is
reproducible and `--resume` continues bit-for-bit. The bundle holds the full towers (serving
embeds queries exactly as these features were computed) with the best epoch's heads.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from convirt.bundle import WEIGHTS_NAME, load_tokenizer, save_bundle
from convirt.loss import convirt_loss
from convirt.model import ConVIRT, build_model
from convirt.sentences import sample_sentence

from .checkpoint import TrainState, load_checkpoint, read_checkpoint_state, save_checkpoint
from .config import HeadsStage, TrainConfig
from .data import EpochSampler, PairDataset, batch_groups
from .features import all_sentences, feature_root, image_features, text_features
from .validation import DevSplit, Validation, text_to_image_recall

log = logging.getLogger(__name__)

STAGE1_DIR = "stage1"
HEAD_PREFIXES = ("image_head.", "text_head.")


@dataclass
class DevFeatures:
    name: str
    images: torch.Tensor  # rows x Dv: eval view
    reports: torch.Tensor  # distinct reports x Du: whole text, as validation embeds it
    pair_texts: torch.Tensor  # rows x Du: the sentence validation samples for each pair
    text_ids: np.ndarray


@dataclass
class HeadsData:
    """Everything stage 1 reads: no image or sentence is run through a tower after this."""

    images: torch.Tensor  # train rows x K x Dv
    sentences: torch.Tensor  # distinct sentences x Du
    sentence_index: dict[str, int]
    train_set: PairDataset
    dev: list[DevFeatures]


def heads_features(
    config: TrainConfig,
    model: ConVIRT,
    tokenizer,
    train_set: PairDataset,
    dev_splits: list[DevSplit],
    views: int,
    progress: bool = False,
) -> HeadsData:
    """Cached features of the train pairs (K views, every sentence) and of the dev splits."""
    root = feature_root(config.feature_cache_dir)
    max_tokens = config.model.max_text_tokens
    sentences = all_sentences(train_set)
    dev_texts = []
    for split in dev_splits:
        dev_texts += list(split.dataset.table.texts) + _pair_sentences(split.dataset)
    texts = list(dict.fromkeys(sentences + dev_texts))
    vectors, _ = text_features(model.text_encoder, tokenizer, max_tokens, texts, root,
                               progress=progress)  # fmt: skip
    index = {t: i for i, t in enumerate(texts)}
    table = torch.from_numpy(vectors)
    images, _ = image_features(model.image_encoder, train_set, views, root, progress=progress)
    dev = []
    for split in dev_splits:
        ds = split.dataset
        eval_view, _ = image_features(model.image_encoder, ds, 1, root, progress=progress)
        dev.append(DevFeatures(
            split.name, torch.from_numpy(eval_view[:, 0]),
            table[[index[t] for t in ds.table.texts]],
            table[[index[t] for t in _pair_sentences(ds)]], ds.table.text_ids,
        ))  # fmt: skip
    return HeadsData(torch.from_numpy(images), table, index, train_set, dev)


def draw_sentence(dataset: PairDataset, epoch: int, row: int) -> str:
    """The sentence PairDataset draws for (epoch, row), without reading the image."""
    rng = random.Random(dataset.sample_seed(epoch, row))
    return sample_sentence(dataset.sentences(row), rng, dataset.table.text(row))


def _pair_sentences(dataset: PairDataset, epoch: int = 0) -> list[str]:
    return [draw_sentence(dataset, epoch, row) for row in range(len(dataset))]


def heads(model: ConVIRT) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({"image_head": model.image_head, "text_head": model.text_head})


def train_heads(
    config: TrainConfig,
    stage: HeadsStage,
    train_set: PairDataset,
    dev_splits: list[DevSplit],
    out_dir: Path,
    identity: dict,
    progress: bool = False,
    max_steps: int | None = None,
) -> TrainState:
    """Stage 1 into out_dir (checkpoint.pt, metrics.csv, bundle/); resumes a checkpoint there,
    and returns at once when that run is complete."""
    from .epoch_log import EpochLog
    from .run import BUNDLE_DIR, CHECKPOINT_NAME
    from .run_identity import refuse_changed_config

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT_NAME
    identity = {**identity, "stage1": stage.model_dump()}
    if checkpoint.exists():
        state, saved = read_checkpoint_state(checkpoint)
        refuse_changed_config(saved, identity, out_dir)
        if state.epoch >= stage.epochs and (out_dir / BUNDLE_DIR).exists():
            return state
    started = time.perf_counter()
    model = build_model(config.model, seed=config.seed)
    tokenizer = load_tokenizer(config.model)
    data = heads_features(config, model, tokenizer, train_set, dev_splits, stage.image_views,
                          progress)  # fmt: skip
    log.info("stage 1: features of %d pairs (%d views) and %d texts ready in %.1f s",
             len(train_set), stage.image_views, len(data.sentences),
             time.perf_counter() - started)  # fmt: skip
    trained = heads(model)
    optimizer = torch.optim.Adam(trained.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = TrainState()
    if checkpoint.exists():
        state, _, _ = load_checkpoint(checkpoint, trained, optimizer, scheduler)
    metrics = EpochLog(out_dir, True, [d.name for d in data.dev])
    while state.epoch < stage.epochs:
        if heads_epoch(config, stage, data, trained, optimizer, state, max_steps):
            save_checkpoint(checkpoint, trained, optimizer, scheduler, state, identity)
            break
        checked = heads_validation(config, data, trained)
        state.epoch += 1
        state.best_val_loss = min(state.best_val_loss, checked.loss)
        score = checked.score(config.select_by)
        if score != score:
            score = -checked.loss
        if score > state.best_score + 1e-4:
            state.best_score, state.best_epoch = score, state.epoch
            provenance = {"stage": 1, "epochs_completed": state.epoch, "step": state.step,
                          "val_loss": checked.loss, "dev_recall_at_10": checked.recall,
                          "config": config.model_dump()}  # fmt: skip
            save_bundle(model, tokenizer, out_dir / BUNDLE_DIR, provenance)
        train_loss = state.loss_sum / max(1, state.pairs_in_epoch)
        metrics.epoch(
            epoch=state.epoch, step=state.step, train_loss=train_loss, val_loss=checked.loss,
            dev_r10=checked.mean_recall, lr=stage.lr,
            pairs_per_s=state.pairs_in_epoch / max(state.train_seconds, 1e-9),
            seconds=state.train_seconds,
            **{f"dev_r10_{name}": value for name, value in checked.recall.items()},
        )  # fmt: skip
        recalls = " ".join(f"{n} {r:.3f}" for n, r in checked.recall.items())
        log.info("stage 1 epoch %d: train %.4f val %.4f dev R@10 %s", state.epoch, train_loss,
                 checked.loss, recalls or "-")  # fmt: skip
        state.batch_in_epoch, state.loss_sum, state.pairs_in_epoch = 0, 0.0, 0
        state.train_seconds = 0.0
        save_checkpoint(checkpoint, trained, optimizer, scheduler, state, identity)
    return state


def heads_epoch(
    config: TrainConfig,
    stage: HeadsStage,
    data: HeadsData,
    trained: torch.nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    max_steps: int | None = None,
) -> bool:
    """The rest of the current epoch; True when max_steps stopped it part-way."""
    dataset, views = data.train_set, data.images.shape[1]
    sampler = EpochSampler(len(dataset), config.batch_size, state.epoch, config.seed,
                           start_batch=state.batch_in_epoch)  # fmt: skip
    rows = torch.tensor([row for _, row in sampler], dtype=torch.long)
    view_draw = torch.Generator().manual_seed(config.seed * 1_000_003 + state.epoch)
    chosen_views = torch.randint(views, (len(dataset),), generator=view_draw)
    trained.train()
    started = time.perf_counter()
    for start in range(0, len(rows), config.batch_size):
        batch = rows[start : start + config.batch_size]
        h_v = data.images[batch, chosen_views[batch]]
        sentences = [draw_sentence(dataset, state.epoch, int(r)) for r in batch]
        h_u = data.sentences[[data.sentence_index[s] for s in sentences]]
        groups = batch_groups(dataset.table, batch) if config.false_negatives == "mask" else None
        v, u = trained["image_head"](h_v), trained["text_head"](h_u)
        loss = convirt_loss(v, u, config.temperature, config.image_weight, groups)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step += 1
        state.batch_in_epoch += 1
        state.loss_sum += loss.item() * len(batch)
        state.pairs_in_epoch += len(batch)
        state.train_seconds += time.perf_counter() - started
        started = time.perf_counter()
        if max_steps is not None and state.step >= max_steps:
            return True
    return False


@torch.no_grad()
def heads_validation(
    config: TrainConfig, data: HeadsData, trained: torch.nn.ModuleDict
) -> Validation:
    """validate()'s figures from cached features: loss on fixed batches, text->image R@10."""
    trained.eval()
    total, count, recall = 0.0, 0, {}
    for split in data.dev:
        v = trained["image_head"](split.images)
        u = trained["text_head"](split.pair_texts)
        for start in range(0, len(v), config.batch_size):
            if len(v[start : start + config.batch_size]) >= 2:
                batch_v, batch_u = v[start : start + config.batch_size], u[start : start + config.batch_size]  # fmt: skip
                total += convirt_loss(batch_v, batch_u, config.temperature, config.image_weight).item() * len(batch_v)  # fmt: skip
                count += len(batch_v)
        reports = trained["text_head"](split.reports)
        recall[split.name] = text_to_image_recall(reports, v, split.text_ids)
    return Validation(total / count if count else float("nan"), recall)


def load_heads(model: ConVIRT, bundle_dir: Path) -> None:
    """Copy the projection heads of a (stage-1) bundle into model; the towers stay as they are."""
    state = load_file(str(Path(bundle_dir) / WEIGHTS_NAME))
    picked = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    missing = model.load_state_dict(picked, strict=False)
    if not picked or any(k.startswith(HEAD_PREFIXES) for k in missing.missing_keys):
        raise ValueError(f"{bundle_dir} holds no projection heads for this model")
