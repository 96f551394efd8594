"""Recall audit math on hand-made influence scores with known answers."""

import numpy as np
import pytest
import torch

from fastif.errors import InputError
from fastif.knn import plot_recall, recall_audit, recall_summary, resolve_ks
from fastif.knn.audit import COLUMNS

# Test point 0 over N = 10 training points.
#   helpful top-2 (most negative): 7 (-6), 0 (-3)
#   harmful top-2 (most positive): 1 (5), 4 (4)
#   |influence| top-2:             7 (6), 1 (5)
SCORES_0 = [-3.0, 5.0, -1.0, 0.5, 4.0, -2.0, 0.1, -6.0, 2.0, 1.0]
CANDIDATES = [7, 1, 3, 0, 9, 4, 2, 5]  # kNN order
KS = [1, 2, 4, 6]


def _row(table, ranking, m):
    part = table[(table.ranking == ranking) & (table.m == m)].sort_values("k")
    return part.recall.tolist(), part.recall_std.tolist()


def test_recall_on_one_hand_made_test_point():
    table = recall_audit(np.array([SCORES_0]), np.array([CANDIDATES]), KS, ms=[1, 2])
    assert list(table.columns) == COLUMNS and len(table) == 3 * 2 * 4
    assert _row(table, "helpful", 2)[0] == [0.5, 0.5, 1.0, 1.0]  # 7 at rank 0, 0 at rank 3
    assert _row(table, "harmful", 2)[0] == [0.0, 0.5, 0.5, 1.0]  # 1 at rank 1, 4 at rank 5
    assert _row(table, "abs", 2)[0] == [0.5, 1.0, 1.0, 1.0]  # 7 at rank 0, 1 at rank 1
    assert _row(table, "helpful", 1)[0] == [1.0, 1.0, 1.0, 1.0]
    assert _row(table, "harmful", 1)[0] == [0.0, 1.0, 1.0, 1.0]
    base = table[(table.ranking == "abs") & (table.m == 2)].sort_values("k")
    assert base.random_baseline.tolist() == pytest.approx([0.1, 0.2, 0.4, 0.6])
    assert base.k_fraction.tolist() == pytest.approx([0.1, 0.2, 0.4, 0.6])


def test_recall_is_averaged_over_test_points_with_std():
    # test point 1 has the opposite scores: helpful and harmful swap
    scores = torch.tensor([SCORES_0, [-s for s in SCORES_0]])
    candidates = torch.tensor([CANDIDATES, CANDIDATES])
    table = recall_audit(scores, candidates, KS, ms=[2])
    mean, std = _row(table, "helpful", 2)
    assert mean == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert std == pytest.approx([0.25, 0.0, 0.25, 0.0])
    assert _row(table, "harmful", 2)[0] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert _row(table, "abs", 2) == ([0.5, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])


def test_padding_is_never_counted():
    candidates = [7, -1, -1, 1, 0, -1, 4, 2]
    table = recall_audit([SCORES_0], [candidates], [1, 3, 4, 7], ms=[2])
    assert _row(table, "abs", 2)[0] == [0.5, 0.5, 1.0, 1.0]
    assert _row(table, "harmful", 2)[0] == [0.0, 0.0, 0.5, 1.0]


def test_oracle_and_random_candidates():
    rng = np.random.default_rng(0)
    n_test, n = 400, 200
    scores = rng.standard_normal((n_test, n))
    oracle = np.argsort(-np.abs(scores), axis=1)  # candidates ranked by |influence| itself
    table = recall_audit(scores, oracle, [10, 50], ms=[10])
    assert _row(table, "abs", 10)[0] == [1.0, 1.0]
    random_candidates = np.stack([rng.permutation(n) for _ in range(n_test)])
    table = recall_audit(scores, random_candidates, [50, 100], ms=[10])
    for ranking in ("helpful", "harmful", "abs"):
        recall = _row(table, ranking, 10)[0]
        assert recall == pytest.approx([0.25, 0.5], abs=0.03)  # = random baseline k/N


def test_resolve_ks_and_summary():
    assert resolve_ks(["1%", "5%", 10, "10%", 5000], 1000) == [10, 50, 100, 1000]
    assert resolve_ks(["0.01%"], 1000) == [1]
    with pytest.raises(InputError, match="neither an integer nor a percentage"):
        resolve_ks(["abc"], 10)
    table = recall_audit([SCORES_0], [CANDIDATES], KS, ms=[2, 10])
    summary = recall_summary(table, m=2)
    assert list(summary.columns) == ["k", "k_fraction", "helpful", "harmful", "abs", "random"]
    assert summary.harmful.tolist() == [0.0, 0.5, 0.5, 1.0] and summary.random.tolist() == pytest.approx([0.1, 0.2, 0.4, 0.6])
    # m = N: every point is in the top set, so recall = k/N exactly
    assert recall_summary(table, m=10)["abs"].tolist() == pytest.approx([0.1, 0.2, 0.4, 0.6])
    with pytest.raises(InputError, match="no rows for m=100"):
        recall_summary(table, m=100)


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="same test points"):
        recall_audit([SCORES_0, SCORES_0], [CANDIDATES], KS)
    with pytest.raises(InputError, match=r"\[1, 8\]"):
        recall_audit([SCORES_0], [CANDIDATES], [9], ms=[2])
    with pytest.raises(InputError, match=r"\[1, 10\]"):
        recall_audit([SCORES_0], [CANDIDATES], KS, ms=[100])
    with pytest.raises(InputError, match="NaN"):
        recall_audit([[float("nan")] * 10], [CANDIDATES], KS, ms=[2])
    with pytest.raises(InputError, match="positions into the training pool"):
        recall_audit([SCORES_0], [[10] + CANDIDATES[1:]], KS, ms=[2])


def test_plot_recall_writes_a_png(tmp_path):
    table = recall_audit([SCORES_0], [CANDIDATES], KS, ms=[2, 5])
    path = plot_recall(table, tmp_path / "audit" / "recall.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["recall.png"]
