"""Simulatability: do the influential training points explain the task model's prediction?

FastIF's protocol (after Hase & Bansal): a *simulator* model (a copy of the task model, or a
model trained to imitate its predictions) takes one SGD step on a set of training points; if
those points explain the task model, the step brings the simulator closer to the task model's
prediction on the test input, i.e. lowers the simulator's loss on the test input labelled with
the task model's prediction. Three sets per test point are compared: the top-m helpful, the top-m
harmful and m random training points, over a grid of learning rates.

Batch contract: ``loss_fn(model, batch) -> (B,)`` per-example losses, dict batches with
``labels`` (as everywhere in fastif). Training points step with their own (gold) labels, the
labels their influence was computed with. Influence is taken on the test point's gold label,
so for a test point the task model gets wrong the "helpful" set pushes towards the gold label,
away from the prediction the simulator should imitate: there the harmful set is the one that
explains the (wrong) prediction, which is why correct and incorrect points are reported apart.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from fastif.errors import InputError

log = logging.getLogger(__name__)

ARMS = ("helpful", "random", "harmful")
SIMULATE_COLUMNS = ["test_id", "test_group", "correct", "arm", "n_points", "lr", "loss_before", "loss_after", "delta"]
ARM_COLOURS = {"helpful": "#1b7837", "random": "#777777", "harmful": "#b2182b"}

LossFn = Callable[[torch.nn.Module, Dict[str, torch.Tensor]], torch.Tensor]


def learning_rates(lr_min: float, lr_max: float, count: int) -> np.ndarray:
    """``count`` learning rates log-spaced in [lr_min, lr_max] (the paper: 50 in [1e-5, 10^-2.5])."""
    if not (0 < lr_min <= lr_max) or count < 1:
        raise ValueError(f"need 0 < lr_min <= lr_max and count >= 1, got {lr_min}, {lr_max}, {count}")
    return np.logspace(math.log10(lr_min), math.log10(lr_max), count)


def one_step_losses(
    model: torch.nn.Module,
    loss_fn: LossFn,
    step_batch: Mapping[str, torch.Tensor],
    probe_batch: Mapping[str, torch.Tensor],
    lrs: Sequence[float],
    params: Sequence[str],
) -> Tuple[np.ndarray, np.ndarray]:
    """Probe losses before and after one SGD step on ``step_batch``, for each learning rate.

    The step is ``theta - lr * grad mean(loss_fn(model, step_batch))`` over the parameters named
    in ``params``; the model's weights are restored exactly after every learning rate (the
    originals are kept once, not deep copies of the model). Returns ``before`` (B,) and
    ``after`` (len(lrs), B) for the B examples of ``probe_batch``, as float64 arrays.
    """
    named = dict(model.named_parameters())
    missing = [n for n in params if n not in named]
    if missing or not params:
        raise ValueError(f"params must name parameters of the model; unknown: {missing[:5]}")
    weights = [named[n] for n in params]
    loss = loss_fn(model, dict(step_batch)).mean()
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    originals = [w.detach().clone() for w in weights]
    after = np.empty((len(lrs), _batch_size(probe_batch)), dtype=np.float64)
    with torch.no_grad():
        before = loss_fn(model, dict(probe_batch)).double().cpu().numpy()
        try:
            for i, lr in enumerate(lrs):
                for weight, grad in zip(weights, grads):
                    if grad is not None:
                        weight.add_(grad, alpha=-float(lr))
                after[i] = loss_fn(model, dict(probe_batch)).double().cpu().numpy()
                for weight, original in zip(weights, originals):
                    weight.copy_(original)
        finally:
            for weight, original in zip(weights, originals):
                weight.copy_(original)
    return before, after


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    return int(batch["labels"].shape[0])


@dataclass
class SimulationPoint:
    """One test point: its row in the test split, the task model's prediction, and the training sets."""

    test_id: str
    row: int
    target: int  # the task model's predicted label: what the simulator should imitate
    correct: bool  # the task model's prediction equals the gold label
    group: str = "all"
    sets: Dict[str, List[int]] = field(default_factory=dict)  # arm -> training positions


def candidate_sets(influence: pd.DataFrame, test_ids: Sequence[str], n_train: int, m: int, seed: int) -> Dict[str, Dict[str, List[int]]]:
    """Per test id: the top-m helpful and top-m harmful training positions of an influence table, and m random ones.

    ``influence`` has the columns of ``influence.parquet`` (test_id, train_index, rank, direction).
    A direction with fewer than m rows (only negative scores count as helpful) gives a shorter set;
    an empty one is left out. The random set is drawn without replacement, seeded per test point.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    sets: Dict[str, Dict[str, List[int]]] = {}
    by_test = {key: part for key, part in influence.groupby("test_id", sort=False)}
    for i, test_id in enumerate(test_ids):
        part = by_test.get(test_id)
        arms: Dict[str, List[int]] = {}
        for direction in ("helpful", "harmful"):
            if part is None:
                continue
            chosen = part[part["direction"] == direction].sort_values("rank").head(m)
            if len(chosen):
                arms[direction] = [int(x) for x in chosen["train_index"]]
        rng = np.random.default_rng([seed, i])
        arms["random"] = sorted(int(x) for x in rng.choice(n_train, size=min(m, n_train), replace=False))
        sets[test_id] = arms
    return sets


def simulate(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train,
    test,
    points: Sequence[SimulationPoint],
    lrs: Sequence[float],
    params: Sequence[str],
    device,
) -> pd.DataFrame:
    """The simulation table: one row per (test point, arm, learning rate), columns SIMULATE_COLUMNS.

    ``train`` and ``test`` are EncodedDatasets (``.batch(indices)``); each point's probe is its
    test row labelled with ``point.target``. ``delta = loss_after - loss_before`` (negative: the
    step moved the simulator towards the task model's prediction).
    """
    device = torch.device(device)
    model.eval()  # deterministic steps (no dropout)
    rows = []
    for point in points:
        probe = test.batch([point.row])
        probe["labels"] = torch.tensor([point.target], dtype=torch.long)
        probe = {k: v.to(device) for k, v in probe.items()}
        for arm in ARMS:
            members = point.sets.get(arm)
            if not members:
                continue
            step = {k: v.to(device) for k, v in train.batch(members).items()}
            before, after = one_step_losses(model, loss_fn, step, probe, lrs, params)
            for lr, loss_after in zip(lrs, after[:, 0]):
                rows.append((point.test_id, point.group, point.correct, arm, len(members), float(lr),
                             float(before[0]), float(loss_after), float(loss_after - before[0])))
    return pd.DataFrame(rows, columns=SIMULATE_COLUMNS)


def relabelled(data, labels) -> object:
    """A copy of an EncodedDataset whose labels are ``labels`` (e.g. the task model's predictions)."""
    from fastif.data.encoding import EncodedDataset

    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if labels.shape[0] != len(data):
        raise ValueError(f"{labels.shape[0]} labels for {len(data)} examples")
    return EncodedDataset({**data.tensors, "labels": labels}, data.ids)


def train_simulator(model: torch.nn.Module, train, task_predictions, train_cfg, device, seed: int, progress: bool = False) -> dict:
    """Train ``model`` in place on the training split labelled with the task model's predictions (the paper's simulator)."""
    from fastif.training import train_classifier

    return train_classifier(model, relabelled(train, task_predictions), train_cfg, device, seed, progress)


def summarize(frame: pd.DataFrame) -> dict:
    """Per kind of test point (correct / incorrect) and arm: mean loss change over test points and learning rates.

    Also per kind: the mean change at the largest learning rate, and the fraction of test points
    whose helpful set lowers the loss more (mean over learning rates) than their random and
    harmful sets.
    """
    summary: dict = {}
    for correct, kind in ((True, "correct"), (False, "incorrect")):
        part = frame[frame["correct"] == correct]
        entry: dict = {"n_tests": int(part["test_id"].nunique()), "arms": {}}
        if len(part):
            top_lr = part["lr"].max()
            for arm in ARMS:
                rows = part[part["arm"] == arm]
                if not len(rows):
                    continue
                entry["arms"][arm] = {
                    "n_tests": int(rows["test_id"].nunique()),
                    "mean_points": float(rows.groupby("test_id")["n_points"].first().mean()),
                    "mean_delta": float(rows["delta"].mean()),
                    "mean_delta_at_max_lr": float(rows.loc[np.isclose(rows["lr"], top_lr), "delta"].mean()),
                }
            per_test = part.groupby(["test_id", "arm"])["delta"].mean().unstack()
            for other in ("random", "harmful"):
                if "helpful" in per_test and other in per_test:
                    both = per_test[["helpful", other]].dropna()
                    if len(both):
                        entry[f"helpful_beats_{other}"] = float((both["helpful"] < both[other]).mean())
        summary[kind] = entry
    return summary


def summary_lines(summary: dict) -> List[str]:
    """The summary as log lines."""
    lines = []
    for kind, entry in summary.items():
        if not entry["n_tests"]:
            lines.append(f"{kind}: no test points")
            continue
        arms = ", ".join(f"{arm} {values['mean_delta']:+.4g}" for arm, values in entry["arms"].items())
        wins = ", ".join(f"helpful beats {o} for {entry[f'helpful_beats_{o}']:.0%}"
                         for o in ("random", "harmful") if f"helpful_beats_{o}" in entry)
        lines.append(f"{kind} ({entry['n_tests']} test points): mean loss change {arms}" + (f"; {wins}" if wins else ""))
    return lines


def plot_simulation(frame: pd.DataFrame, title: str = "Simulatability"):
    """Loss change vs learning rate per arm (mean with a band of one standard error over test points).

    Two panels: test points the task model predicts correctly, and incorrectly. Returns a
    matplotlib Figure (no pyplot state).
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    axes = figure.subplots(1, 2, sharey=False)
    for ax, (correct, kind) in zip(axes, ((True, "correct"), (False, "incorrect"))):
        part = frame[frame["correct"] == correct]
        n_tests = part["test_id"].nunique()
        ax.set_title(f"task model {kind} ({n_tests} test points)")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-3)  # small helpful/random changes next to large harmful ones
        ax.axhline(0.0, color="black", linewidth=0.7)
        ax.set_xlabel("learning rate of the one SGD step")
        ax.set_ylabel("simulator loss change (after - before)")
        ax.grid(True, which="both", alpha=0.25)
        if not len(part):
            ax.text(0.5, 0.5, "no test points", transform=ax.transAxes, ha="center", va="center")
            continue
        for arm in ARMS:
            rows = part[part["arm"] == arm]
            if not len(rows):
                continue
            stats = rows.groupby("lr")["delta"].agg(["mean", "std", "count"]).sort_index()
            se = (stats["std"].fillna(0.0) / np.sqrt(stats["count"])).to_numpy()
            lr, mean = stats.index.to_numpy(), stats["mean"].to_numpy()
            ax.plot(lr, mean, color=ARM_COLOURS[arm], label=f"{arm} ({rows['test_id'].nunique()})", linewidth=1.8)
            ax.fill_between(lr, mean - se, mean + se, color=ARM_COLOURS[arm], alpha=0.2, linewidth=0)
        ax.legend(title="training set (test points)", fontsize=8, title_fontsize=8, loc="lower left")
    figure.suptitle(title)
    return figure


def points_from_tests(tests: pd.DataFrame, frame: pd.DataFrame, predictions: np.ndarray) -> Tuple[List[SimulationPoint], int]:
    """SimulationPoints for the single-example rows of an influence run's ``tests.parquet``.

    ``frame`` is the test split (column ``id``) in the row order of ``predictions`` (the task
    model's predicted labels now). Returns the points and how many of them the influence run
    recorded a different prediction for (a sign that it used another model).
    """
    single = tests[tests["n_examples"] == 1]
    position = {str(v): i for i, v in enumerate(frame["id"].astype(str))}
    missing = [t for t in single["test_id"].astype(str) if t not in position]
    if missing:
        raise InputError(f"The influence run's test ids {missing[:3]} are not in the test split (its {len(frame)} rows). "
                         f"Fix: use an influence run of this experiment and data (simulate.source.run=new computes one).")
    labels = frame["label"].to_numpy()
    points, disagreements = [], 0
    for _, test in single.iterrows():
        row = position[str(test["test_id"])]
        pred = int(predictions[row])
        disagreements += int(pred != int(test["test_pred"]))
        points.append(SimulationPoint(test_id=str(test["test_id"]), row=row, target=pred, correct=bool(pred == int(labels[row])),
                                      group=str(test["test_group"])))
    return points, disagreements


def check_train_positions(influence: pd.DataFrame, train_ids: Sequence[str]) -> None:
    """InputError unless every (train_index, train_id) of an influence table matches the training split."""
    ids = np.asarray([str(x) for x in train_ids])
    index = influence["train_index"].to_numpy()
    out_of_range = (index < 0) | (index >= len(ids))
    wrong = out_of_range.copy()
    wrong[~out_of_range] = ids[index[~out_of_range]] != influence["train_id"].astype(str).to_numpy()[~out_of_range]
    if wrong.any():
        raise InputError(f"{int(wrong.sum())} training rows of the influence run do not match this experiment's training split "
                         f"(e.g. train_index {int(index[wrong][0])}). "
                         f"Fix: use an influence run made with the same data config (simulate.source.run=new computes one).")
