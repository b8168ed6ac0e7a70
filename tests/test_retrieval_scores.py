import numpy as np
import pytest

from training import retrieval_scores


def test_recall_and_precision_by_hand():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    relevant = np.array([[False, False, True], [True, False, False]])
    # query 0 ranks [0, 2, 1]: relevant item 2 is second; query 1 ranks [1, 2, 0]: third
    assert retrieval_scores.recall_at_k(scores, relevant, 1) == 0.0
    assert retrieval_scores.recall_at_k(scores, relevant, 2) == 0.5
    assert retrieval_scores.recall_at_k(scores, relevant, 3) == 1.0
    assert retrieval_scores.precision_at_k(scores, relevant, 2) == pytest.approx(0.25)


def test_random_baselines_match_simulation():
    rng = np.random.default_rng(0)
    relevant = np.zeros((50, 40), bool)
    for i in range(50):
        relevant[i, rng.choice(40, size=1 + i % 3, replace=False)] = True
    simulated = np.mean(
        [retrieval_scores.recall_at_k(rng.random(relevant.shape), relevant, 5) for _ in range(300)]
    )
    assert retrieval_scores.random_recall_at_k(relevant, 5) == pytest.approx(simulated, abs=0.02)
    simulated_p = np.mean(
        [
            retrieval_scores.precision_at_k(rng.random(relevant.shape), relevant, 5)
            for _ in range(300)
        ]
    )
    assert retrieval_scores.random_precision_at_k(relevant, 5) == pytest.approx(
        simulated_p, abs=0.01
    )


def test_exclude_self_removes_the_query_from_its_ranking():
    vectors = np.eye(3)
    scores = retrieval_scores.exclude_self(vectors @ vectors.T)
    assert (retrieval_scores.top_k(scores, 1)[:, 0] != np.arange(3)).all()
