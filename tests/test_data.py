import json
import logging

import pytest
import torch
from conftest import read_rows, write_manifest

from training.data import EpochSampler, ManifestError, PairDataset, load_records


def test_manifest_rows_resolve_relative_to_the_manifest(medpix_subset):
    records, skipped = load_records(medpix_subset, split="train", require_text=True)
    assert len(records) == 24 and not skipped
    assert all(r.image.is_absolute() and r.image.is_file() for r in records)
    assert records[0].meta["location_category"]


def test_missing_files_and_empty_text_are_counted_skips(datasets, tmp_path):
    rows = read_rows(datasets / "medpix" / "manifest.csv")[:6]
    rows[1] = {**rows[1], "image": "images/does-not-exist.jpg"}
    rows[2] = {**rows[2], "text": "   "}
    manifest = write_manifest(tmp_path / "m.csv", rows, datasets / "medpix")
    records, skipped = load_records(manifest, require_text=True)
    assert len(records) == 4
    assert sorted(s.reason for s in skipped) == ["empty text", "file not found"]
    # without require_text the image-only row stays (an archive image still worth indexing)
    records, _ = load_records(manifest)
    assert len(records) == 5


def test_wrong_column_name_names_the_columns(medpix_subset):
    with pytest.raises(ManifestError, match=r"no column 'report'.*columns are: image, text"):
        load_records(medpix_subset, text_column="report", require_text=True)


def test_jsonl_manifest(datasets, tmp_path):
    rows = read_rows(datasets / "medpix" / "manifest.csv")[:3]
    path = tmp_path / "m.jsonl"
    lines = [
        json.dumps({"image": str(datasets / "medpix" / r["image"]), "text": r["text"], "n": 1})
        for r in rows
    ]
    path.write_text("\n".join(lines) + "\n\n")
    records, _ = load_records(path, require_text=True)
    assert [r.text for r in records] == [r["text"] for r in rows] and records[0].meta["n"] == "1"
    path.write_text("{broken\n")
    with pytest.raises(ManifestError, match=":1: not valid JSON"):
        load_records(path)


def test_unreadable_images_are_skipped_when_preloading(
    datasets, tmp_path, small_model_config, caplog
):
    rows = read_rows(datasets / "medpix" / "manifest.csv")[:4]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rows.append({**rows[0], "image": str(tmp_path / "broken.jpg")})
    manifest = write_manifest(tmp_path / "m.csv", rows, datasets / "medpix")
    records, _ = load_records(manifest, require_text=True)
    dataset = PairDataset(records, small_model_config, train=True, progress=False)
    assert len(dataset) == 4
    assert [s.path for s in dataset.skipped] == [str(tmp_path / "broken.jpg")]


def test_unreadable_image_without_preloading_is_skipped_in_the_worker(
    datasets, tmp_path, small_model_config, caplog
):
    rows = read_rows(datasets / "medpix" / "manifest.csv")[:3]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rows.insert(1, {**rows[0], "image": str(tmp_path / "broken.jpg"), "text": "Broken scan."})
    manifest = write_manifest(tmp_path / "m.csv", rows, datasets / "medpix")
    records, _ = load_records(manifest, require_text=True)
    dataset = PairDataset(records, small_model_config, train=True, preload=False, progress=False)
    with caplog.at_level(logging.WARNING):
        pixels, sentence = dataset[(0, 1)]
    assert pixels.shape == (3, 64, 64)
    assert sentence != "Broken scan."  # the next record stood in
    assert "broken.jpg" in caplog.text


def test_samples_are_reproducible_per_epoch_and_index(medpix_subset, small_model_config):
    records, _ = load_records(medpix_subset, split="train", require_text=True)
    dataset = PairDataset(records[:4], small_model_config, train=True, seed=1, progress=False)
    a, b, c = dataset[(0, 2)], dataset[(0, 2)], dataset[(1, 2)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])  # another epoch, another view


def test_sampler_partitions_an_epoch_across_ranks_and_resumes():
    full = list(EpochSampler(103, batch_size=10, epoch=3, seed=0))
    assert len(full) == 100 and len({i for _, i in full}) == 100
    ranks = [list(EpochSampler(103, 10, 3, 0, rank=r, world_size=2)) for r in range(2)]
    assert all(len(r) == 50 for r in ranks)
    assert not {i for _, i in ranks[0]} & {i for _, i in ranks[1]}
    resumed = list(EpochSampler(103, 10, 3, 0, start_batch=4))
    assert resumed == full[40:]
    assert full != list(EpochSampler(103, 10, 4, 0))  # a new permutation each epoch


def test_unknown_split_selects_nothing_and_missing_split_column_is_an_error(
    medpix_subset, tmp_path
):
    records, skipped = load_records(medpix_subset, split="test")
    assert records == [] and skipped == []
    no_split = tmp_path / "m.csv"
    no_split.write_text("image,text\na.png,b\n")
    with pytest.raises(ManifestError, match="no 'split' column"):
        load_records(no_split, split="train")
