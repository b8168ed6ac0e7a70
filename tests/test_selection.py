"""Which epoch becomes the bundle, and the training options tried for retrieval quality: the
per-epoch dev retrieval, the cosine schedule, the weight average, a learnt temperature, whole
short captions."""

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from conftest import epoch_rows, small_train_config

from convirt.bundle import load_bundle
from convirt.config import ModelConfig
from training.config import TrainConfig
from training.evaluate import evaluate
from training.run import build_scheduler
from training.train import train
from training.validation import text_to_image_recall


@pytest.mark.slow
def test_retrieval_selection_exports_the_epoch_with_the_best_dev_recall(
    medpix_subset, small_model_config, tmp_path
):
    config = small_train_config(
        small_model_config, num_workers=0, batch_size=8, epochs=4, lr=5e-4, select_by="retrieval",
        early_stopping_patience=4,
    )  # fmt: skip
    result = train(config, [medpix_subset], tmp_path, progress=False)
    rows = epoch_rows(tmp_path)
    split_column = next(c for c in rows[0] if c.startswith("dev_r10_"))
    recalls = [float(r["dev_r10"]) for r in rows]
    assert recalls == [float(r[split_column]) for r in rows]  # one dev split: mean = itself
    best = int(np.argmax(recalls))  # the first of equal bests, as training keeps it
    assert result.state.best_epoch == best + 1
    provenance = json.loads((result.bundle_dir / "bundle.json").read_text())["provenance"]
    assert provenance["selected_by"] == "retrieval"
    assert provenance["epochs_completed"] == best + 1
    assert provenance["val_loss"] == pytest.approx(float(rows[best]["val_loss"]), rel=1e-4)
    # what training measured is what `convirt eval` measures on the exported bundle
    scored = evaluate(load_bundle(result.bundle_dir), medpix_subset, "dev", progress=False)
    assert scored["text_to_image/recall@10"] == pytest.approx(recalls[best], abs=1e-6)


def test_text_to_image_recall_counts_any_image_of_the_report():
    reports = torch.eye(3)  # report j points along axis j
    images = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0.1], [1, 0, 0]])
    text_ids = np.array([0, 2, 1, 2])  # image 0 shows report 0, images 1 and 3 report 2...
    assert text_to_image_recall(reports, images, text_ids) == pytest.approx(1.0)  # k=10 > 4 images
    many = torch.cat([images, torch.full((20, 3), 0.9)])  # 20 distractors close to every report
    ids = np.concatenate([text_ids, np.full(20, 99)])
    recall = text_to_image_recall(reports, many, ids)
    # report 0 finds image 0 (cos 1.0) first; report 2 (axis 2) has its images far below the
    # distractors (cos 0.58 for every distractor vs 0.1 and 0.0); report 1 finds image 1 second.
    assert recall == pytest.approx(2 / 3)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    config = TrainConfig(lr_schedule="cosine", warmup_steps=4, epochs=2, lr=1.0)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx(
        [0.25 * 0.5 * (1 + np.cos(np.pi * s / 20)) * (s + 1) for s in range(4)]
    )
    assert max(lrs) == pytest.approx(lrs[3])  # the peak at the end of warm-up
    assert all(a >= b for a, b in pairwise(lrs[3:]))  # then only down
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # zero after the last


@pytest.mark.slow
def test_resume_with_average_learnt_temperature_and_cosine_equals_an_uninterrupted_run(
    medpix_subset, small_model_config, tmp_path
):
    config = small_train_config(
        small_model_config, num_workers=0, ema_decay=0.9, learn_temperature=True, lr_schedule="cosine",
        warmup_steps=2, lr=1e-3,
    )  # fmt: skip
    train(config, [medpix_subset], tmp_path / "straight", progress=False)
    train(config.model_copy(update={"max_steps": 3}), [medpix_subset], tmp_path / "split",
          progress=False)  # fmt: skip
    train(config, [medpix_subset], tmp_path / "split", resume=True, progress=False)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    temperature = straight["extras"]["log_temperature"].exp().item()
    assert temperature != pytest.approx(0.1, abs=1e-6), "the temperature learnt nothing"
    assert torch.equal(straight["extras"]["log_temperature"], resumed["extras"]["log_temperature"])
    for name, tensor in straight["extras"]["ema"].items():
        assert torch.equal(tensor, resumed["extras"]["ema"][name]), name
    # the bundle holds the average, not the last weights
    bundle = load_bundle(tmp_path / "straight" / "bundle")
    exported = bundle.model.state_dict()
    key = "image_head.net.0.weight"
    assert not torch.equal(exported[key], straight["model"][key])
    assert torch.allclose(exported[key], straight["extras"]["ema"][f"module.{key}"])


def test_short_reports_are_used_whole(medpix_subset):
    from convirt.imagecache import ImageCache
    from training.data import PairDataset, load_pairs

    config = ModelConfig(image_size=64)
    cache = ImageCache()
    table, _ = load_pairs([medpix_subset], "train", cache, config.resize, progress=False)
    lengths = [len(t.split()) for t in table.texts]
    limit = sorted(lengths)[len(lengths) // 2]
    whole = PairDataset(
        table, cache.reader(config.resize), config, train=True, full_text_words=limit
    )
    split = PairDataset(table, cache.reader(config.resize), config, train=True)
    for row in range(len(table)):
        text = table.text(row)
        if len(text.split()) <= limit:
            assert whole.sentences(row) == [text.strip()]
        else:
            assert whole.sentences(row) == split.sentences(row)
    assert any(whole.sentences(r) != split.sentences(r) for r in range(len(table)))
    cache.close()


@pytest.mark.slow
def test_a_text_pretraining_stage_runs_first_once_and_feeds_the_model(
    medpix_subset, small_model_config, tmp_path
):
    from training.pretrain_text import PretrainTextConfig, read_pretrain_info

    stage = PretrainTextConfig(minutes=5, max_steps=3, batch_size=4, max_tokens=32, heldout=4,
                               iu_reports=False)  # fmt: skip
    config = small_train_config(small_model_config, num_workers=0, max_steps=2, pretrain_text=stage)
    train(config, [medpix_subset], tmp_path, progress=False)
    folder = tmp_path / "text-pretrained"
    assert read_pretrain_info(folder)["steps"] == 3
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.config.text_encoder == str(folder.resolve())
    # ConVIRT started from the adapted tower: its frozen lower layers hold the MLM-trained weights
    from safetensors.torch import load_file

    adapted = load_file(folder / "model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(bundle.model.text_encoder.bert.state_dict()[key], adapted[key])
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    train(config.model_copy(update={"max_steps": 3}), [medpix_subset], tmp_path, resume=True,
          progress=False)  # fmt: skip
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not redone
