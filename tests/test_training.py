"""Short real training runs on a medpix subset (64 px, tiny batches) through the real loop."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import epoch_rows, small_train_config

from convirt.imagecache import ImageCache, pixel_file
from training.config import load_config
from training.run_identity import refuse_changed_config, run_identity
from training.train import train


@pytest.mark.slow
def test_training_lowers_the_loss(medpix_subset, small_model_config, tmp_path):
    config = small_train_config(
        small_model_config, batch_size=8, epochs=6, lr=5e-4, val_split="train",
        early_stopping_patience=6, num_workers=0,
    )  # fmt: skip
    result = train(config, [medpix_subset], tmp_path, progress=False)
    rows = epoch_rows(tmp_path)
    train_losses = [float(r["train_loss"]) for r in rows]
    assert len(rows) == 6
    assert train_losses[0] > 0.95 * math.log(8), "an untrained model starts near chance"
    assert train_losses[-1] < 0.85 * train_losses[0], train_losses
    val_losses = [float(r["val_loss"]) for r in rows]
    assert result.bundle_dir and (result.bundle_dir / "bundle.json").is_file()
    provenance = json.loads((result.bundle_dir / "bundle.json").read_text())["provenance"]
    assert provenance["train_pairs"] == 24
    assert provenance["best_val_loss"] == pytest.approx(min(val_losses), abs=1e-4)


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(medpix_subset, small_model_config, tmp_path):
    config = small_train_config(small_model_config)
    train(config, [medpix_subset], tmp_path / "straight", progress=False)
    # stop part-way through the first epoch (6 batches of 4), then continue
    train(config.model_copy(update={"max_steps": 4}), [medpix_subset], tmp_path / "split",
          progress=False)  # fmt: skip
    interrupted = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert interrupted["state"]["step"] == 4 and interrupted["state"]["batch_in_epoch"] == 4
    train(config, [medpix_subset], tmp_path / "split", resume=True, progress=False)

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert straight["state"]["step"] == resumed["state"]["step"] == 12
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert [r["val_loss"] for r in epoch_rows(tmp_path / "straight")] == [
        r["val_loss"] for r in epoch_rows(tmp_path / "split")
    ]


def test_resume_refuses_other_settings_and_fresh_run_refuses_old_dir(
    medpix_subset, small_model_config, tmp_path
):
    config = small_train_config(small_model_config, max_steps=1, num_workers=0)
    train(config, [medpix_subset], tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, [medpix_subset], tmp_path, progress=False)
    bundle_mtime = (tmp_path / "bundle" / "weights.safetensors").stat().st_mtime_ns
    reused = train(config, [medpix_subset], tmp_path, resume=True, progress=False)
    assert reused.state.step == 1  # a finished run is reused, not trained further
    assert (tmp_path / "bundle" / "weights.safetensors").stat().st_mtime_ns == bundle_mtime
    with pytest.raises(ValueError, match=r"lr: 0.0001 -> 0.001"):
        train(config.model_copy(update={"lr": 1e-3, "max_steps": 2}), [medpix_subset], tmp_path,
              resume=True, progress=False)  # fmt: skip


def test_run_saved_before_a_setting_existed_is_still_reused(tmp_path):
    """A finished `make demo` run from before `lock_text`/`false_negatives` existed: its identity
    lacks them; at their defaults that changes nothing, set otherwise it does."""
    current = run_identity(load_config("cpu"), [])
    saved = {k: v for k, v in current.items() if k not in ("lock_text", "false_negatives")}
    refuse_changed_config(saved, current, tmp_path)  # no error: the new settings are at defaults
    with pytest.raises(ValueError, match=r"lock_text: None -> True"):
        refuse_changed_config(saved, {**current, "lock_text": True}, tmp_path)


def test_named_configs_validate():
    locked = load_config("locked")
    assert (
        locked.model.text_encoder == "mpnet" and locked.epochs == 0 and locked.stage1.epochs == 10
    )
    assert load_config("paper").batch_size == 32 and load_config("paper").temperature == 0.1
    cpu = load_config("cpu", {"model.image_size": 96, "epochs": 1})
    assert cpu.model.image_size == 96 and cpu.epochs == 1
    with pytest.raises(ValueError, match="no config 'nope'"):
        load_config("nope")
    with pytest.raises(ValueError, match="extra"):
        load_config("cpu", {"model.imag_size": 3})


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "convirt.cli", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_train_and_eval_cli_on_real_data(medpix_subset, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "train", "--config", "cpu", "--manifest", str(medpix_subset), "--out", str(out),
        "--max-steps", "2", "--batch-size", "4", "--image-size", "64", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 2
    queries = tmp_path / "queries.csv"
    queries.write_text(
        "label,text\nHead,CT of the brain shows a lesion.\nThorax,Consolidation in the lung.\n"
    )
    evaluated = run_cli(
        "eval", "--model", str(out / "bundle"), "--manifest", str(medpix_subset),
        "--split", "dev", "--label-column", "location_category", "--baseline", "imagenet",
        "--queries", str(queries), "--no-progress",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["n_images"] == 12
    for key in (
        "text_to_image/recall@1", "text_to_image/recall@10", "image_to_text/recall@5",
        "image_to_image/encoder/precision@10", "image_to_image/projection/precision@5",
        "imagenet/image_to_image/encoder/precision@10", "random/text_to_image/recall@10",
        "label_text_to_image/precision@5", "random/label_text_to_image/precision@5",
    ):  # fmt: skip
        assert 0.0 <= result[key] <= 1.0, key
    for direction in ("text_to_image", "image_to_text"):
        recalls = [result[f"{direction}/recall@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls), recalls  # a hit in the top 1 is a hit in the top 5


def test_cli_errors_are_clear(tmp_path, medpix_subset):
    missing = run_cli(
        "train", "--out", str(tmp_path / "r"), env={"CONVIRT_DATA_ROOT": str(tmp_path)}
    )
    assert missing.returncode == 2 and "manifest not found" in missing.stderr
    assert "CONVIRT_DATA_ROOT" in missing.stderr
    bad = run_cli("eval", "--model", str(tmp_path), "--manifest", str(medpix_subset))
    assert bad.returncode == 2 and "not a model bundle" in bad.stderr
    help_text = run_cli("train", "--help")
    assert help_text.returncode == 0 and "--resume" in help_text.stdout
    assert run_cli("nonsense").returncode == 2


def test_training_decodes_into_the_image_cache_once(medpix_subset, small_model_config, tmp_path):
    cache = tmp_path / "cache"
    config = small_train_config(
        small_model_config, max_steps=1, num_workers=0, cache_dir=str(cache)
    )
    train(config, [medpix_subset], tmp_path / "a", progress=False)
    side = small_model_config.resize
    pixels = pixel_file(ImageCache(cache).root, side)
    first = (ImageCache(cache).info()["sides"][side]["images"], pixels.stat().st_mtime_ns)
    assert first[0] == 36  # the 24 train and 12 dev images of the subset
    train(config, [medpix_subset], tmp_path / "b", progress=False)  # a second run, a resume...
    assert (ImageCache(cache).info()["sides"][side]["images"], pixels.stat().st_mtime_ns) == first
