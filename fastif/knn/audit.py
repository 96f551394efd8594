"""Recall audit of the kNN prefilter (FastIF's recall study).

For each audited test point the caller computes full-scan influence scores over all
N training points (``fastif.influence_scores(..., candidates=None)``) and the kNN
candidate list (positions into the training pool, nearest first). For a candidate
budget k the candidate set is the first k neighbours; recall@m is the fraction of
the m most influential training points that fall inside it, for three rankings:

- ``helpful``: the m most negative scores (upweighting them lowers the test loss),
- ``harmful``: the m most positive scores,
- ``abs``: the m largest |score|.

A random k-subset of the pool has expected recall k/N (``random_baseline``).
``recall_std`` is the standard deviation over test points (ddof=0).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fastif.errors import InputError
from fastif.runs import atomic_write_bytes

RANKINGS = ("helpful", "harmful", "abs")
COLUMNS = ["k", "k_fraction", "m", "ranking", "recall", "recall_std", "random_baseline"]


def resolve_ks(specs: Sequence, n: int) -> list[int]:
    """Candidate budgets as counts: integers stay, 'p%' becomes round(p/100 * n);
    each clamped to [1, n]; sorted, duplicates dropped."""
    counts = set()
    for spec in specs:
        if isinstance(spec, str) and spec.endswith("%"):
            count = round(n * float(spec[:-1]) / 100.0)
        elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            count = int(spec)
        else:
            raise InputError(f"Candidate budget '{spec}' is neither an integer nor a percentage. Fix: use e.g. knn.audit.ks=[1%,5%,100].")
        counts.add(min(n, max(1, count)))
    return sorted(counts)


def recall_audit(scores, candidates, ks: Sequence[int], ms: Sequence[int] = (10, 100)) -> pd.DataFrame:
    """Recall of the first-k kNN candidates for the top-m training points by influence.

    scores: (n_test, N) full-scan influence; candidates: (n_test, k_max) positions in
    [0, N) in kNN rank order (-1 = padding, never counted); ks: budgets <= k_max;
    ms: sizes of the top sets (<= N). Returns one row per (ranking, m, k) with the
    columns ``COLUMNS``.
    """
    scores = _as_numpy(scores).astype(np.float64, copy=False)
    candidates = _as_numpy(candidates).astype(np.int64, copy=False)
    if scores.ndim != 2 or candidates.ndim != 2 or scores.shape[0] != candidates.shape[0]:
        raise InputError(f"Need scores (n_test, N) and candidates (n_test, k_max) for the same test points, got shapes {scores.shape} and {candidates.shape}. Fix: pass one row per audited test point in both.")
    n_test, n_train = scores.shape
    k_max = candidates.shape[1]
    if n_test == 0:
        raise InputError("No test points to audit. Fix: set knn.audit.n_test >= 1.")
    if not np.isfinite(scores).all():
        raise InputError("Influence scores contain NaN or infinite values. Fix: check the inverse-HVP solve (damping, LiSSA scale) of the full scan.")
    if candidates.min() < -1 or candidates.max() >= n_train:
        raise InputError(f"Candidate ids must lie in [0, {n_train}) (or -1 for padding). Fix: pass positions into the training pool, not dataset ids.")
    ks = [int(k) for k in ks]
    ms = [int(m) for m in ms]
    if not ks or min(ks) < 1 or max(ks) > k_max:
        raise InputError(f"Every k must lie in [1, {k_max}] (the number of candidates per test point), got {ks}. Fix: search at least max(k) neighbours.")
    if not ms or min(ms) < 1 or max(ms) > n_train:
        raise InputError(f"Every m must lie in [1, {n_train}] (the training pool size), got {ms}. Fix: use smaller m, e.g. knn.audit.ms=[10].")

    k_array = np.asarray(ks)
    no_rank = np.iinfo(np.int64).max
    # hits[ranking][m] -> (n_test, len(ks)) recall per test point
    recalls = {(r, m): np.empty((n_test, len(ks))) for r in RANKINGS for m in ms}
    for t in range(n_test):
        rank = np.full(n_train, no_rank, dtype=np.int64)
        row = candidates[t]
        valid = np.flatnonzero(row >= 0)[::-1]  # reversed: the first occurrence of a duplicate wins
        rank[row[valid]] = valid
        orders = {
            "helpful": np.argsort(scores[t], kind="stable"),
            "harmful": np.argsort(-scores[t], kind="stable"),
            "abs": np.argsort(-np.abs(scores[t]), kind="stable"),
        }
        for ranking, order in orders.items():
            for m in ms:
                top_ranks = rank[order[:m]]
                recalls[(ranking, m)][t] = (top_ranks[:, None] < k_array[None, :]).mean(axis=0)
    rows = []
    for (ranking, m), values in recalls.items():
        for j, k in enumerate(ks):
            rows.append(
                {
                    "k": k,
                    "k_fraction": k / n_train,
                    "m": m,
                    "ranking": ranking,
                    "recall": float(values[:, j].mean()),
                    "recall_std": float(values[:, j].std()),
                    "random_baseline": k / n_train,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def recall_summary(table: pd.DataFrame, m: int = 10) -> pd.DataFrame:
    """recall@m per k (rows) and ranking (columns), next to the random baseline --
    the table to print."""
    part = table[table["m"] == m]
    if part.empty:
        raise InputError(f"The audit has no rows for m={m} (has m in {sorted(table['m'].unique())}). Fix: include {m} in knn.audit.ms.")
    summary = part.pivot(index=["k", "k_fraction"], columns="ranking", values="recall")
    summary = summary[[r for r in RANKINGS if r in summary.columns]]
    summary["random"] = part.groupby(["k", "k_fraction"])["random_baseline"].first()
    summary.columns.name = None
    return summary.reset_index()


def plot_recall(table: pd.DataFrame, path) -> Path:
    """Write a PNG of recall vs k (% of N), one panel per m, one line per ranking,
    with the random baseline dashed. Written atomically; returns the path."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or GUI state

    ms = sorted(table["m"].unique())
    fig = Figure(figsize=(5.0 * len(ms), 4.0), dpi=100)
    axes = fig.subplots(1, len(ms), squeeze=False)[0]
    for ax, m in zip(axes, ms):
        part = table[table["m"] == m].sort_values("k")
        for ranking in RANKINGS:
            line = part[part["ranking"] == ranking]
            if not line.empty:
                percent = 100 * line["k_fraction"]
                ax.plot(percent, line["recall"], marker="o", label=ranking)
                ax.fill_between(percent, (line["recall"] - line["recall_std"]).clip(0, 1), (line["recall"] + line["recall_std"]).clip(0, 1), alpha=0.12)
        base = part.drop_duplicates("k")
        ax.plot(100 * base["k_fraction"], base["random_baseline"], linestyle="--", color="black", label="random k/N")
        if base["k_fraction"].max() / base["k_fraction"].min() > 20:
            ax.set_xscale("log")
        ticks = (100 * base["k_fraction"]).tolist()
        ax.set_xticks(ticks, [f"{t:.3g}%" for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k (% of training pool)")
        ax.set_ylabel(f"recall@{m}")
        ax.set_title(f"top-{m} influential points found among k nearest")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def _as_numpy(value) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)
