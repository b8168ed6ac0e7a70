import math

import pytest
import torch

from convirt.loss import convirt_loss


def hand_loss(v, u, tau, lam):
    """The paper's formula written out with Python loops."""

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / (
            math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        )

    n = len(v)
    total = 0.0
    for i in range(n):
        v_to_u = -math.log(
            math.exp(cos(v[i], u[i]) / tau) / sum(math.exp(cos(v[i], u[k]) / tau) for k in range(n))
        )
        u_to_v = -math.log(
            math.exp(cos(u[i], v[i]) / tau) / sum(math.exp(cos(u[i], v[k]) / tau) for k in range(n))
        )
        total += lam * v_to_u + (1 - lam) * u_to_v
    return total / n


@pytest.mark.parametrize(("tau", "lam"), [(0.1, 0.75), (0.5, 0.3), (1.0, 1.0)])
def test_loss_matches_hand_computation(tau, lam):
    v = [[1.0, 2.0, 0.5], [-1.0, 0.3, 2.0], [0.2, -0.7, 1.1]]
    u = [[0.9, 1.5, 0.0], [0.1, 0.2, 1.8], [-2.0, 0.4, 0.3]]
    got = convirt_loss(torch.tensor(v), torch.tensor(u), temperature=tau, image_weight=lam)
    assert got.item() == pytest.approx(hand_loss(v, u, tau, lam), rel=1e-5)


def test_loss_is_asymmetric_in_lambda():
    torch.manual_seed(0)
    v, u = torch.randn(5, 8), torch.randn(5, 8)
    # lambda weights v->u: swapping the modalities must equal using 1 - lambda
    assert convirt_loss(v, u, 0.1, 0.75).item() == pytest.approx(
        convirt_loss(u, v, 0.1, 0.25).item(), rel=1e-5
    )
    assert convirt_loss(v, u, 0.1, 0.75).item() != pytest.approx(
        convirt_loss(v, u, 0.1, 0.25).item(), rel=1e-3
    )


def test_loss_is_low_for_aligned_pairs_and_high_for_shuffled():
    torch.manual_seed(0)
    v = torch.randn(8, 16)
    aligned = convirt_loss(v, v.clone())
    shuffled = convirt_loss(v, v.roll(1, dims=0))
    assert aligned.item() < 0.1
    assert shuffled.item() > math.log(8)


def test_loss_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="differ"):
        convirt_loss(torch.randn(4, 8), torch.randn(3, 8))
