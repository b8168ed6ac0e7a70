"""False negatives (issue 22): pairs of a batch that share a report or a case are not negatives.

Several medpix images belong to one case and share its caption; the plain ConVIRT loss pushes each
image away from its sibling's identical report. With `groups` such pairs leave the denominators.
"""

import math

import numpy as np
import pytest
import torch
from conftest import small_train_config

from convirt.imagecache import ImageCache
from convirt.loss import convirt_loss, same_group_mask
from training.data import batch_groups, load_pairs
from training.train import train


def masked_hand_loss(v, u, groups, tau, lam):
    """The paper's formula with loops, negatives k of the same group as i left out."""

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    n, total = len(v), 0.0
    for i in range(n):
        others = [k for k in range(n) if k == i or groups[k] != groups[i]]
        v_to_u = -math.log(
            math.exp(cos(v[i], u[i]) / tau) / sum(math.exp(cos(v[i], u[k]) / tau) for k in others)
        )
        u_to_v = -math.log(
            math.exp(cos(u[i], v[i]) / tau) / sum(math.exp(cos(u[i], v[k]) / tau) for k in others)
        )
        total += lam * v_to_u + (1 - lam) * u_to_v
    return total / n


def test_masked_loss_matches_hand_computation_on_a_batch_with_a_shared_report():
    torch.manual_seed(0)
    v = torch.randn(5, 8)
    u = torch.randn(5, 8)
    u[1] = u[0]  # rows 0 and 1: two images of one case, one report
    groups = torch.tensor([7, 7, 1, 2, 3])
    got = convirt_loss(v, u, 0.1, 0.75, groups).item()
    assert got == pytest.approx(masked_hand_loss(v, u, groups.tolist(), 0.1, 0.75), rel=1e-5)
    assert got < convirt_loss(v, u, 0.1, 0.75).item()  # the sibling was an impossible negative
    # no shared group: the mask changes nothing
    distinct = torch.arange(5)
    assert convirt_loss(v, u, 0.1, 0.75, distinct).item() == pytest.approx(
        convirt_loss(v, u, 0.1, 0.75).item(), rel=1e-6
    )


def test_two_groupings_mask_a_pair_that_shares_either():
    groups = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 7]])  # reports; cases
    mask = same_group_mask(groups)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = True  # one report
    expected[2, 3] = expected[3, 2] = True  # one case
    assert torch.equal(mask, expected)


def test_batch_groups_of_real_medpix_rows_name_shared_reports_and_cases(
    medpix_subset, small_model_config
):
    table, _ = load_pairs([medpix_subset], "train", ImageCache(), small_model_config.resize)
    rows = np.arange(len(table))
    groups = batch_groups(table, rows)
    assert groups.shape == (2, len(table))
    assert torch.equal(groups[0], torch.from_numpy(table.text_ids.astype(np.int64)))
    # the subset's first 24 medpix train rows come from a few cases of several images each
    assert len(set(groups[1].tolist())) < len(table)
    mask = same_group_mask(groups)
    assert mask.any() and not mask.diagonal().any()


def test_training_with_masked_false_negatives_runs(medpix_subset, small_model_config, tmp_path):
    config = small_train_config(
        small_model_config, max_steps=2, num_workers=0, false_negatives="mask", batch_size=8
    )
    result = train(config, [medpix_subset], tmp_path, progress=False)
    assert result.state.step == 2 and (tmp_path / "bundle" / "bundle.json").is_file()
