import json

import numpy as np
import pytest
import torch
from conftest import read_rows, write_manifest

from convirt.bundle import load_bundle
from convirt.imagecache import ImageCache
from convirt.imageio import load_image, resize_shorter
from convirt.inference import Embedder
from convirt.manifest import EMPTY_TEXT, FILE_NOT_FOUND, ManifestError, read_manifest_items
from index.sources.manifest import read_manifest
from training.data import EpochSampler, PairDataset, load_pairs


def pairs(manifest, config, split=None, cache=None):
    cache = cache or ImageCache()
    return load_pairs([manifest], split, cache, config.resize, workers=1, progress=False)


def test_manifest_rows_resolve_relative_to_the_manifest(medpix_subset):
    items, skipped = read_manifest_items(medpix_subset, "train", require_text=True)
    assert len(items) == 24 and not skipped
    assert all(i.path.is_absolute() and i.path.is_file() for i in items)
    assert items[0].meta["location_category"] and "image" not in items[0].meta


def test_missing_files_and_empty_text_are_counted_skips(datasets, tmp_path):
    rows = read_rows(datasets / "medpix" / "manifest.csv")[:6]
    rows[1] = {**rows[1], "image": "images/does-not-exist.jpg"}
    rows[2] = {**rows[2], "text": "   "}
    manifest = write_manifest(tmp_path / "m.csv", rows, datasets / "medpix")
    items, skipped = read_manifest_items(manifest, require_text=True)
    assert len(items) == 4
    assert sorted(s.reason for s in skipped) == [EMPTY_TEXT, FILE_NOT_FOUND]
    # without require_text the image-only row stays (an archive image still worth indexing)
    items, _ = read_manifest_items(manifest)
    assert len(items) == 5


def test_training_and_indexing_read_a_manifest_alike(medpix_subset):
    def key(item):
        return item.relpath, item.path, item.text, sorted(item.meta.items())

    items, _ = read_manifest_items(medpix_subset)
    assert sorted(map(key, items)) == sorted(map(key, read_manifest(medpix_subset).items))


def test_wrong_column_name_names_the_columns(medpix_subset):
    with pytest.raises(ManifestError, match=r"no column 'report'.*columns are: image, text"):
        read_manifest_items(medpix_subset, text_column="report", require_text=True)


def test_jsonl_manifest(datasets, tmp_path):
    rows = read_rows(datasets / "medpix" / "manifest.csv")[:3]
    path = tmp_path / "m.jsonl"
    lines = [
        json.dumps({"image": str(datasets / "medpix" / r["image"]), "text": r["text"], "n": 1})
        for r in rows
    ]
    path.write_text("\n".join(lines) + "\n\n")
    items, _ = read_manifest_items(path, require_text=True)
    assert [i.text for i in items] == [r["text"] for r in rows] and items[0].meta["n"] == "1"
    path.write_text("{broken\n")
    with pytest.raises(ManifestError, match=":1: not valid JSON"):
        read_manifest_items(path)


def test_unreadable_images_are_skipped_with_their_reason(datasets, tmp_path, small_model_config):
    rows = read_rows(datasets / "medpix" / "manifest.csv")[:4]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rows.insert(2, {**rows[0], "image": str(tmp_path / "broken.jpg")})
    manifest = write_manifest(tmp_path / "m.csv", rows, datasets / "medpix")
    table, skipped = pairs(manifest, small_model_config)
    assert len(table) == 4 and list(table.positions) == [0, 1, 3, 4]
    assert [s.path for s in skipped] == [str(tmp_path / "broken.jpg")]
    assert "corrupt" in skipped[0].reason or "not a recognised" in skipped[0].reason


def test_the_table_holds_each_report_once(datasets, tmp_path, small_model_config):
    rows = read_rows(datasets / "medpix" / "manifest.csv")[:3] * 4
    manifest = write_manifest(tmp_path / "m.csv", rows, datasets / "medpix")
    table, _ = pairs(manifest, small_model_config)
    assert len(table) == 12 and len(table.texts) == len({r["text"] for r in rows[:3]})
    assert [table.text(i) for i in range(12)] == [r["text"] for r in rows]


def test_samples_are_reproducible_per_epoch_and_index(medpix_subset, small_model_config):
    cache = ImageCache()
    table, _ = pairs(medpix_subset, small_model_config, "train", cache)
    reader = cache.reader(small_model_config.resize)
    dataset = PairDataset(table, reader, small_model_config, train=True, seed=1)
    a, b, c = dataset[(0, 2)], dataset[(0, 2)], dataset[(1, 2)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])  # another epoch, another view
    assert a[0].shape == (3, 64, 64)


def test_cached_image_is_the_decoded_image_shrunk(medpix_subset, small_model_config):
    cache = ImageCache()
    table, _ = pairs(medpix_subset, small_model_config, "train", cache)
    dataset = PairDataset(table, cache.reader(small_model_config.resize), small_model_config, False)
    items, _ = read_manifest_items(medpix_subset, "train", require_text=True)
    direct = resize_shorter(load_image(items[5].path), small_model_config.resize)
    assert torch.equal(dataset.image_tensor(5)[0], torch.from_numpy(np.array(direct)))


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
    items, skipped = read_manifest_items(medpix_subset, "test")
    assert items == [] and skipped == []
    no_split = tmp_path / "m.csv"
    no_split.write_text("image,text\na.png,b\n")
    with pytest.raises(ManifestError, match="no 'split' column"):
        read_manifest_items(no_split, "train")


def test_an_upload_embeds_exactly_as_its_cached_copy(medpix_subset, small_model_config, bundle_dir):
    cache = ImageCache()
    table, _ = pairs(medpix_subset, small_model_config, "train", cache)
    dataset = PairDataset(table, cache.reader(small_model_config.resize), small_model_config, False)
    items, _ = read_manifest_items(medpix_subset, "train", require_text=True)
    embedder = Embedder(load_bundle(bundle_dir))
    for row in (0, 7):
        direct = embedder.preprocess(load_image(items[row].path))
        assert torch.equal(dataset[(0, row)][0], direct)
