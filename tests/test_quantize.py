"""The int8 query encoder (convirt.quantize): export, fingerprint checks, fidelity, serving.

A copy of the session's small bundle (untrained projection, the packaged MiniLM and Lite0
weights) is exported with `convirt export --int8`; queries are real dev captions of the three
datasets, searched against fp32 image vectors of their real dev images, as the served index is.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import index_of_rows, make_bundle, server_settings, serving

from convirt import cli
from convirt.bundle import load_bundle
from convirt.imageio import load_image
from convirt.inference import Embedder
from convirt.quantize import (
    INFO_NAME,
    MODEL_NAME,
    QUERY_ENCODER,
    QuantizedModelError,
    int8_dir,
    load_int8,
    release_text_tower,
)
from index.read.store import open_current
from service.model.loading import StartupError, load_resources
from service.settings import Settings

K = 10
OVERLAP_REQUIRED = 0.95


@pytest.fixture(scope="module")
def quantized_dir(bundle_dir, tmp_path_factory) -> Path:
    """A copy of the small bundle with its int8 query encoder, written by the CLI."""
    folder = tmp_path_factory.mktemp("quantized") / "bundle"
    shutil.copytree(bundle_dir, folder)
    assert cli.main(["export", "--int8", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def bundle(quantized_dir):
    return load_bundle(quantized_dir)


@pytest.fixture(scope="module")
def int8(bundle) -> Embedder:
    return Embedder(bundle, text_encoder=load_int8(bundle, threads=1))


@pytest.fixture(scope="module")
def fp32(bundle) -> Embedder:
    return Embedder(bundle)


def dev_rows(datasets: Path, name: str, count: int) -> list[dict[str, str]]:
    with open(datasets / name / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "dev" and r["text"].strip()]
    return [
        {"image": str(datasets / name / r["image"]), "text": r["text"], "collection": name}
        for r in rows[:count]
    ]


def top_k(queries: np.ndarray, images: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ images.T), axis=1, kind="stable")[:, :K]


def test_export_records_the_bundle_it_came_from(quantized_dir, bundle):
    info = json.loads((int8_dir(quantized_dir) / INFO_NAME).read_text())
    assert info["bundle_fingerprint"] == bundle.fingerprint
    assert info["query_encoder"] == QUERY_ENCODER
    assert (int8_dir(quantized_dir) / MODEL_NAME).stat().st_size > 1_000_000
    # nothing half-written is left beside it, and the bundle itself is untouched
    assert sorted(p.name for p in quantized_dir.iterdir()) == [
        "bundle.json",
        "int8",
        "text_config",
        "tokenizer",
        "weights.safetensors",
    ]


@pytest.mark.parametrize("dataset", ["medpix", "covid-cxr", "roco"])
def test_int8_top10_matches_fp32_on_real_dev_captions(datasets, fp32, int8, dataset):
    rows = dev_rows(datasets, dataset, 40)
    _, images = fp32.embed_images([load_image(r["image"]) for r in rows])
    texts = sorted({r["text"] for r in rows})
    exact, quantized = fp32.embed_texts(texts), int8.embed_texts(texts)
    assert quantized.truncated == exact.truncated
    overlap = np.mean(
        [
            len(set(a) & set(b)) / K
            for a, b in zip(
                top_k(exact.vectors, images), top_k(quantized.vectors, images), strict=True
            )
        ]
    )
    assert overlap >= OVERLAP_REQUIRED, f"{dataset}: top-{K} overlap {overlap:.3f}"
    # one text embeds the same alone or in a batch (activations are scaled per token)
    alone = np.concatenate([int8.embed_texts([t]).vectors for t in texts[:4]])
    np.testing.assert_allclose(alone, quantized.vectors[:4], atol=1e-5)


def test_an_artefact_of_another_bundle_is_refused(quantized_dir, small_model_config, tmp_path):
    other = make_bundle(small_model_config, 1, tmp_path / "other")
    shutil.copytree(int8_dir(quantized_dir), int8_dir(other))
    with pytest.raises(QuantizedModelError, match=r"convirt export --int8") as refused:
        load_int8(load_bundle(other), build_missing=True)
    assert "derived from the bundle with fingerprint" in str(refused.value)
    settings = Settings(model=other, index_root=tmp_path / "no-index", quantize="int8")
    with pytest.raises(StartupError, match=r"convirt export --int8"):
        load_resources(settings)  # refused before any weights or index load


def test_a_damaged_artefact_is_refused(quantized_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(quantized_dir, copy)
    with open(int8_dir(copy) / MODEL_NAME, "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\0" * 50)
    with pytest.raises(QuantizedModelError, match="sha256"):
        load_int8(load_bundle(copy))


def test_releasing_the_fp32_text_tower_keeps_int8_texts_and_fp32_images(
    datasets, quantized_dir, int8
):
    own = load_bundle(quantized_dir)  # a server's own bundle; the module's stays whole
    served = Embedder(own, text_encoder=load_int8(own, threads=1))
    texts = [row["text"] for row in dev_rows(datasets, "medpix", 3)]
    images = [load_image(row["image"]) for row in dev_rows(datasets, "medpix", 2)]
    expected_images = served.embed_images(images)
    tower_bytes = sum(p.numel() * p.element_size() for p in own.model.text_encoder.parameters())
    assert release_text_tower(own) == tower_bytes > 10 * 2**20
    assert release_text_tower(own) == 0  # twice is harmless
    assert not list(own.model.text_encoder.parameters())
    np.testing.assert_array_equal(
        served.embed_texts(texts).vectors, int8.embed_texts(texts).vectors
    )
    for got, expected in zip(served.embed_images(images), expected_images, strict=True):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(RuntimeError, match="CONVIRT_QUANTIZE=int8"):
        Embedder(own).embed_texts(texts)  # fp32 texts say why they cannot run


def test_the_service_serves_the_int8_path(datasets, quantized_dir, bundle, fp32, tmp_path):
    rows = dev_rows(datasets, "medpix", 12) + dev_rows(datasets, "covid-cxr", 12)
    root = index_of_rows(tmp_path, bundle, rows, ["image", "text", "collection"])
    settings = server_settings(quantized_dir, root, CONVIRT_QUANTIZE="int8")
    texts = [rows[0]["text"], rows[15]["text"], "Bilateral ground-glass opacities."]
    with serving(settings) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        ready = client.get("/readyz").json()
        assert ready["query_encoder"] == QUERY_ENCODER
        assert ready["model_fingerprint"] == bundle.fingerprint  # the bundle's, as the index's
        with open_current(root) as store:
            for text in texts:
                body = {"text": text, "k": K, "group_by": "none", "mode": "image"}  # joint space
                response = client.post("/v1/search/text", json=body)
                assert response.status_code == 200, response.text
                served = [r["id"] for r in response.json()["results"]]
                hits = store.search_text_vectors(fp32.embed_texts([text]).vectors, K)[0]
                assert len(set(served) & {str(hit.id) for hit in hits}) >= K - 1
        # explaining a text match embeds the text with the int8 copy, not the released tower
        params = {"image_id": served[0], "text": texts[0]}
        explained = client.get("/v1/explain", params=params)
        assert explained.status_code == 200, explained.text
