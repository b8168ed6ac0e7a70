"""What only a GPU can check: bf16 autocast, channels_last and pinned loader workers on CUDA.

Skipped without CUDA (every CI run); bench/gpu_check.sh runs them on a lent GPU machine, where
CONVIRT_TEST_TEXT_ENCODER / CONVIRT_TEST_IMAGE_WEIGHTS point at the carried encoders.
"""

import csv
import os

import numpy as np
import pytest
import torch

from convirt.bundle import load_bundle
from convirt.config import ModelConfig
from convirt.imageio import load_image
from convirt.inference import Embedder
from convirt.manifest import read_manifest_items
from training.config import TrainConfig
from training.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_config() -> ModelConfig:
    return ModelConfig(
        image_size=96,
        max_text_tokens=32,
        text_encoder=os.environ.get("CONVIRT_TEST_TEXT_ENCODER", "packaged"),
        image_weights=os.environ.get("CONVIRT_TEST_IMAGE_WEIGHTS", "packaged"),
    )


@pytest.fixture(scope="module")
def cuda_run(medpix_subset, tmp_path_factory):
    config = TrainConfig(
        model=model_config(), batch_size=8, epochs=3, device="cuda", precision="bf16",
        channels_last=True, num_workers=2, sentence_filter="imaging",
    )  # fmt: skip
    out = tmp_path_factory.mktemp("cuda-run")
    return train(config, [medpix_subset], out, progress=False)


def test_bf16_channels_last_training_runs_and_learns(cuda_run):
    with open(cuda_run.out_dir / "metrics.csv") as f:
        epochs = list(csv.DictReader(f))
    losses = [float(row["train_loss"]) for row in epochs]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], f"training loss did not fall under bf16: {losses}"


def test_a_cuda_trained_bundle_embeds_alike_on_gpu_and_cpu(cuda_run, medpix_subset):
    items, _ = read_manifest_items(medpix_subset, "dev")
    images = [load_image(item.path) for item in items[:8]]
    texts = [item.text for item in items[:8]]
    vectors = {}
    for device in ("cpu", "cuda"):
        embedder = Embedder(load_bundle(cuda_run.bundle_dir, device=device), device)
        pixels = torch.stack([embedder.preprocess(image) for image in images])
        vectors[device] = (embedder.embed_pixels(pixels)[1], embedder.embed_texts(texts).vectors)
    for on_cpu, on_gpu in zip(vectors["cpu"], vectors["cuda"], strict=True):
        # cuDNN convolutions may run in TF32: alike in direction, not to the last bit
        assert (on_cpu * on_gpu).sum(axis=1).min() > 0.999
