"""The two-stage recipe (issue 22) on small real subsets: stage 1 trains the heads on cached
features of both locked towers; stage 2 continues from it with the text tower locked and only the
top blocks of the image trunk training; holdout folds validate on train, never on dev."""

import json

import numpy as np
import pytest
import torch
from conftest import epoch_rows, read_rows, small_train_config, write_manifest
from safetensors.torch import load_file

from convirt.bundle import load_bundle
from convirt.encoders import build_image_encoder, build_text_encoder
from training.config import HeadsStage, HoldOut
from training.evaluate import evaluate
from training.folds import fold_of_rows
from training.retrieval_scores import random_recall_at_k
from training.run import build_datasets
from training.train import train


@pytest.fixture(scope="module")
def medpix_120(datasets, tmp_path_factory):
    """120 medpix train pairs and 40 dev pairs: enough for retrieval to beat chance."""
    rows = read_rows(datasets / "medpix" / "manifest.csv")
    picked = [r for r in rows if r["split"] == "train"][:120]
    picked += [r for r in rows if r["split"] == "dev"][:40]
    folder = tmp_path_factory.mktemp("medpix120")
    return write_manifest(folder / "manifest.csv", picked, datasets / "medpix")


@pytest.mark.slow
def test_stage1_lowers_the_loss_and_retrieves_above_chance(
    medpix_120, small_model_config, tmp_path
):
    config = small_train_config(
        small_model_config, batch_size=16, epochs=0, num_workers=0, select_by="retrieval",
        sentence_filter="imaging", stage1=HeadsStage(epochs=8, lr=1e-3, image_views=2),
    )  # fmt: skip
    result = train(config, [medpix_120], tmp_path, progress=False)
    rows = epoch_rows(tmp_path / "stage1")
    losses = [float(r["train_loss"]) for r in rows]
    assert len(rows) == 8 and losses[-1] < 0.5 * losses[0], losses
    _, dev = build_datasets(config, [medpix_120], progress=False)
    table = dev[0].dataset.table
    relevant = np.arange(len(table.texts))[:, None] == table.text_ids[None, :]
    chance = random_recall_at_k(relevant, 10)
    best = max(float(r["dev_r10"]) for r in rows)
    assert best > 1.5 * chance, (best, chance)
    # the run's bundle is stage 1's best epoch, and serving embeds as the cached features did
    info = json.loads((result.bundle_dir / "bundle.json").read_text())
    assert info["provenance"]["stage"] == 1
    scored = evaluate(load_bundle(result.bundle_dir), medpix_120, "dev", progress=False)
    assert scored["text_to_image/recall@10"] == pytest.approx(best, abs=0.02)


@pytest.mark.slow
def test_stage2_continues_from_stage1_with_the_text_tower_locked(
    medpix_subset, small_model_config, tmp_path
):
    config = small_train_config(
        small_model_config, max_steps=2, num_workers=0, lock_text=True,
        image_trainable_blocks=2, stage1=HeadsStage(epochs=1, image_views=1),
    )  # fmt: skip
    train(config, [medpix_subset], tmp_path, progress=False)
    stage1 = load_file(str(tmp_path / "stage1" / "bundle" / "weights.safetensors"))
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    text = build_text_encoder(small_model_config).state_dict()
    image = build_image_encoder(small_model_config).state_dict()
    for name, tensor in text.items():  # locked: never trained
        assert torch.equal(final[f"text_encoder.{name}"], tensor), name
    assert not torch.equal(final["text_head.net.0.weight"], stage1["text_head.net.0.weight"])
    lower = "image_encoder.trunk.net._blocks.0._depthwise_conv.weight"
    top = "image_encoder.trunk.net._blocks.15._depthwise_conv.weight"
    assert torch.equal(final[lower], image[lower.removeprefix("image_encoder.")])
    assert not torch.equal(final[top], image[top.removeprefix("image_encoder.")])


def test_holdout_folds_keep_cases_whole_and_leave_dev_unread(medpix_120, small_model_config):
    config = small_train_config(small_model_config, holdout=HoldOut(folds=4, fold=1))
    train_set, held = build_datasets(config, [medpix_120], progress=False)
    assert len(train_set) + len(held[0].dataset) == 120  # all from train; the 40 dev unread
    whole, _ = build_datasets(small_train_config(small_model_config), [medpix_120], False)
    folds = fold_of_rows(whole.table, held[0].name, 4, 0)
    cases = whole.table.case_ids
    for case in np.unique(cases):
        assert len(set(folds[cases == case])) == 1  # no case on both sides
    assert 0 < len(held[0].dataset) < 60
