import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from convirt.config import ModelConfig
from convirt.transforms import PAPER_AUGMENTATION, eval_transform, pil_to_tensor, train_transform

CONFIG = ModelConfig(image_size=64)


def steps(transform):
    return {type(t): t for t in transform.transforms}


def test_train_transform_has_paper_ranges_in_paper_order():
    t = steps(train_transform(CONFIG))
    order = [type(x).__name__ for x in train_transform(CONFIG).transforms]
    assert order.index("RandomResizedCrop") < order.index("RandomHorizontalFlip")
    assert order.index("RandomHorizontalFlip") < order.index("RandomAffine")
    assert order.index("RandomAffine") < order.index("ColorJitter") < order.index("GaussianBlur")
    assert t[v2.RandomResizedCrop].scale == (0.6, 1.0)
    assert t[v2.RandomHorizontalFlip].p == 0.5
    affine = t[v2.RandomAffine]
    assert list(affine.degrees) == [-20.0, 20.0]
    assert tuple(affine.translate) == (0.1, 0.1) and tuple(affine.scale) == (0.95, 1.05)
    jitter = t[v2.ColorJitter]
    assert tuple(jitter.brightness) == (0.6, 1.4) and tuple(jitter.contrast) == (0.6, 1.4)
    assert jitter.saturation is None and jitter.hue is None  # monochrome images
    assert tuple(t[v2.GaussianBlur].sigma) == (0.1, 3.0)


def test_brightness_stays_within_range_and_uses_all_of_it():
    """On a flat grey image contrast changes nothing, so the output is brightness * value."""
    value = 100
    flat = pil_to_tensor(Image.new("L", (80, 80), value))
    jitter = steps(train_transform(CONFIG))[v2.ColorJitter]
    ratios = []
    for seed in range(200):
        torch.manual_seed(seed)
        ratios.append(jitter(flat)[0, 40, 40].item() / value)
    ratios = np.array(ratios)
    lo, hi = PAPER_AUGMENTATION.brightness
    assert ratios.min() >= lo - 0.01 and ratios.max() <= hi + 0.01
    assert ratios.min() < lo + 0.1 and ratios.max() > hi - 0.1  # the whole range is reached


def test_crop_areas_within_scale_range():
    crop = v2.RandomResizedCrop(64, scale=PAPER_AUGMENTATION.crop_scale)
    image = torch.zeros(1, 100, 120)
    areas = []
    for seed in range(200):
        torch.manual_seed(seed)
        params = crop.make_params([image])
        areas.append(params["height"] * params["width"] / (100 * 120))
    assert min(areas) >= 0.6 - 0.02 and max(areas) <= 1.0
    assert min(areas) < 0.7 and max(areas) > 0.9


def test_flip_happens_about_half_the_time():
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255  # bright left half
    image = pil_to_tensor(Image.fromarray(half))
    flip = v2.RandomHorizontalFlip(PAPER_AUGMENTATION.flip_p)
    flipped = 0
    for seed in range(400):
        torch.manual_seed(seed)
        flipped += int(flip(image)[0, 32, 0] == 0)
    assert 0.4 < flipped / 400 < 0.6


@pytest.mark.parametrize("size", [(300, 200), (90, 500)])
def test_outputs_are_three_identical_channels_at_crop_size(size):
    image = pil_to_tensor(Image.effect_noise(size, 40))
    for transform in (train_transform(CONFIG), eval_transform(CONFIG)):
        out = transform(image)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_eval_transform_is_deterministic():
    image = pil_to_tensor(Image.effect_noise((120, 100), 40))
    assert torch.equal(eval_transform(CONFIG)(image), eval_transform(CONFIG)(image))
