"""The FastIF pipeline for a batch of test queries: kNN candidates -> s_test -> scores -> top-m tables.

A *query* is what one row of ``tests.parquet`` describes: a single test example, or an
anchor group (FastIF's HANS setting), whose influence is that on the group's mean loss.
The pipeline runs the same way in one process or under ``torchrun``: with W ranks, each
rank runs its share of the LiSSA chains (averaged by all-gather, FastIF's parallel
s_test) and scores 1/W of the candidates; rank 0 assembles the tables.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from fastif.engine.hessian import HessianOperator
from fastif.engine.params import ParameterSelection
from fastif.engine.scoring import query_gradients, score_candidates
from fastif.engine.solvers import LissaSolver, Solver

SIGN_CONVENTION = (
    "influence = -grad L(train) . (H + lambda I)^-1 grad L(test): the predicted change of the test loss "
    "when the training point is up-weighted; negative = helpful, positive = harmful."
)

INFLUENCE_COLUMNS = [
    "test_id", "train_id", "train_index", "influence", "influence_se", "rank", "direction", "knn_rank",
    "knn_distance", "train_label", "test_label", "test_pred", "test_group", "train_text",
]
TESTS_COLUMNS = [
    "test_id", "split", "test_group", "n_examples", "text", "test_label", "test_pred", "loss", "accuracy",
    "s_test_norm", "solver", "solver_steps", "relative_change", "candidates", "seconds", "chunk",
]


@dataclass
class Query:
    """One test query: rows of the test split (one row, or an anchor group's rows)."""

    query_id: str
    rows: List[int]
    group: str


@dataclass
class Distributed:
    """Rank and world size, with the few collectives the pipeline needs (no-ops for one process)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls, device: torch.device) -> "Distributed":
        """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_rows(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's tensor (same trailing shape, any number of rows), in rank order."""
        if self.world_size == 1:
            return [tensor]
        import torch.distributed as dist

        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]]))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, *tensor.shape[1:], dtype=tensor.dtype)
        padded[: tensor.shape[0]] = tensor.cpu()
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [p[: int(s.item())] for p, s in zip(parts, sizes)]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def select_queries(
    frame: pd.DataFrame,
    predictions: np.ndarray,
    *,
    mode: str,
    n: int,
    ids: Sequence[str] = (),
    seed: int = 0,
    group_column: Optional[str] = None,
    anchors_per_group: int = 10,
) -> List[Query]:
    """Test queries from a split.

    mode: "ids" (the given ids), "first" (first n), "random" (n at random),
    "misclassified" / "correct" (the first n such points in a seeded random order),
    "anchor_groups" (per value of ``group_column``, ``anchors_per_group`` random rows as
    one query). ``predictions`` are the predicted labels of the split, in row order.
    """
    rng = np.random.default_rng(seed)
    labels = frame["label"].to_numpy()
    groups = frame[group_column].astype(str).to_numpy() if group_column and group_column in frame else np.array(["all"] * len(frame))
    if mode == "ids":
        position = {v: i for i, v in enumerate(frame["id"].astype(str))}
        missing = [i for i in ids if str(i) not in position]
        if missing:
            from fastif.errors import ConfigError

            raise ConfigError(f"Test ids not found in the split: {missing[:5]}. Fix: use ids of the configured tests.split.")
        rows = [position[str(i)] for i in ids]
    elif mode == "first":
        rows = list(range(min(n, len(frame))))
    elif mode in ("random", "misclassified", "correct"):
        order = rng.permutation(len(frame))
        if mode == "misclassified":
            order = order[predictions[order] != labels[order]]
        elif mode == "correct":
            order = order[predictions[order] == labels[order]]
        rows = sorted(order[:n].tolist())
    elif mode == "anchor_groups":
        queries = []
        for group in sorted(set(groups)):
            members = np.flatnonzero(groups == group)
            chosen = sorted(rng.choice(members, size=min(anchors_per_group, len(members)), replace=False).tolist())
            queries.append(Query(query_id=f"group:{group}", rows=chosen, group=group))
        return queries
    else:
        raise ValueError(f"unknown test selection mode {mode!r}")
    ids_col = frame["id"].astype(str).to_numpy()
    return [Query(query_id=ids_col[r], rows=[int(r)], group=str(groups[r])) for r in rows]


def merge_neighbours(positions: torch.Tensor, distances: torch.Tensor, k: int, larger_is_closer: bool) -> tuple:
    """One candidate list of k from several queries' neighbour lists (an anchor group): best distance wins."""
    flat_pos = positions.flatten()
    flat_dist = distances.flatten()
    keep = flat_pos >= 0
    flat_pos, flat_dist = flat_pos[keep], flat_dist[keep]
    order = torch.argsort(flat_dist, descending=larger_is_closer, stable=True)
    seen, pos_out, dist_out = set(), [], []
    for i in order.tolist():
        p = int(flat_pos[i])
        if p not in seen:
            seen.add(p)
            pos_out.append(p)
            dist_out.append(float(flat_dist[i]))
        if len(pos_out) == k:
            break
    return torch.tensor(pos_out, dtype=torch.long), torch.tensor(dist_out)


@dataclass
class ChunkResult:
    influence: pd.DataFrame
    tests: pd.DataFrame
    seconds: float = 0.0


def score_chunk(
    *,
    model: torch.nn.Module,
    loss_fn,
    train,
    test,
    queries: List[Query],
    candidates: List[torch.Tensor],
    distances: List[Optional[torch.Tensor]],
    selection: ParameterSelection,
    operator: HessianOperator,
    solver: Solver,
    damping: float,
    top_m: int,
    train_frame: pd.DataFrame,
    test_frame: pd.DataFrame,
    test_probs: np.ndarray,
    test_losses: np.ndarray,
    split: str,
    chunk: int,
    dist: Distributed,
    batch_size: int = 128,
) -> Optional[ChunkResult]:
    """Influence of each query's candidates; the top-m helpful and harmful rows (rank 0 only).

    candidates[i] are training positions for queries[i] in kNN order (distances[i] None
    for a full scan). Returns None on ranks other than 0.
    """
    start = time.perf_counter()
    # Gradients of just this chunk's test rows, then each query's mean over its rows.
    needed = sorted({r for q in queries for r in q.rows})
    local = {r: i for i, r in enumerate(needed)}
    grads = query_gradients(model, loss_fn, torch.utils.data.Subset(test, needed), selection,
                            groups=[[local[r] for r in q.rows] for q in queries], batch_size=batch_size)
    solve = solver.solve(operator, grads, damping)
    chain_vectors = solve.chain_vectors if solve.chain_vectors is not None else solve.vectors[None]
    if isinstance(solver, LissaSolver):
        # Each rank ran its own chains (own seeds): pool them, FastIF's parallel s_test.
        gathered = dist.gather_rows(chain_vectors.reshape(chain_vectors.shape[0], -1).cpu())
        chains = torch.cat(gathered).reshape(-1, *grads.shape).to(grads.device)  # (C, T, P)
    else:
        chains = chain_vectors  # deterministic: every rank solved the same system
    s_test = chains.mean(0)
    n_chains, t = chains.shape[0], chains.shape[1]

    union = torch.unique(torch.cat(candidates))
    mine = union[dist.rank :: dist.world_size]
    directions = chains.reshape(n_chains * t, -1)
    if len(mine):
        part = score_candidates(model, loss_fn, train, directions, selection,
                                candidates=mine[None].expand(directions.shape[0], -1), batch_size=batch_size)
    else:
        part = torch.zeros(directions.shape[0], 0, dtype=directions.dtype)
    parts = dist.gather_rows(part.T.contiguous().cpu())
    if not dist.is_main:
        return None
    order = torch.cat([union[r :: dist.world_size] for r in range(dist.world_size)])
    table = torch.empty(len(union), directions.shape[0], dtype=torch.float64)
    table[torch.searchsorted(union, order)] = torch.cat(parts).to(torch.float64)
    per_chain = table.T.reshape(n_chains, t, -1)  # (C, T, |union|)
    mean_scores = per_chain.mean(0)
    se = per_chain.std(0, unbiased=True) / math.sqrt(n_chains) if n_chains > 1 else torch.full_like(mean_scores, float("nan"))

    rows, tests = [], []
    seconds = time.perf_counter() - start
    for qi, query in enumerate(queries):
        cand = candidates[qi]
        cols = torch.searchsorted(union, cand)
        scores = mean_scores[qi, cols].numpy()
        errors = se[qi, cols].numpy()
        dists = distances[qi].numpy() if distances[qi] is not None else np.full(len(cand), np.nan)
        knn_rank = np.arange(1, len(cand) + 1) if distances[qi] is not None else np.full(len(cand), -1)
        label, pred = _query_label_pred(query, test_frame, test_probs)
        m = len(cand) if top_m <= 0 else min(top_m, len(cand))
        # Only negative scores help and only positive ones harm: a short list beats a mislabelled one.
        helpful = [j for j in np.argsort(scores, kind="stable")[:m] if scores[j] < 0]
        harmful = [j for j in np.argsort(-scores, kind="stable")[:m] if scores[j] > 0]
        for direction, picked in (("helpful", helpful), ("harmful", harmful)):
            for rank, j in enumerate(picked, start=1):
                train_pos = int(cand[j])
                rows.append({
                    "test_id": query.query_id,
                    "train_id": str(train_frame["id"].iat[train_pos]),
                    "train_index": train_pos,
                    "influence": float(scores[j]),
                    "influence_se": float(errors[j]),
                    "rank": rank,
                    "direction": direction,
                    "knn_rank": int(knn_rank[j]),
                    "knn_distance": float(dists[j]),
                    "train_label": int(train_frame["label"].iat[train_pos]),
                    "test_label": label,
                    "test_pred": pred,
                    "test_group": query.group,
                    "train_text": _text(train_frame, train_pos),
                })
        member_preds = test_probs[query.rows].argmax(1)
        tests.append({
            "test_id": query.query_id,
            "split": split,
            "test_group": query.group,
            "n_examples": len(query.rows),
            "text": _text(test_frame, query.rows[0]) if len(query.rows) == 1 else f"{len(query.rows)} anchors of group {query.group}",
            "test_label": label,
            "test_pred": pred,
            "loss": float(np.mean(test_losses[query.rows])),
            "accuracy": float(np.mean(member_preds == test_frame["label"].to_numpy()[query.rows])),
            "s_test_norm": float(s_test[qi].norm()),
            "solver": getattr(solver, "name", type(solver).__name__),
            "solver_steps": int(solve.steps),
            "relative_change": float(solve.relative_change),
            "candidates": int(len(cand)),
            "seconds": seconds / len(queries),
            "chunk": chunk,
        })
    influence = pd.DataFrame(rows, columns=INFLUENCE_COLUMNS)
    return ChunkResult(influence=influence, tests=pd.DataFrame(tests, columns=TESTS_COLUMNS), seconds=seconds)


def _query_label_pred(query: Query, frame: pd.DataFrame, probs: np.ndarray) -> tuple:
    if len(query.rows) != 1:
        return -1, -1  # an anchor group has no single label or prediction
    r = query.rows[0]
    return int(frame["label"].iat[r]), int(probs[r].argmax())


def _text(frame: pd.DataFrame, row: int) -> str:
    return f"{frame['premise'].iat[row]} => {frame['hypothesis'].iat[row]}"


def markdown_report(influence: pd.DataFrame, tests: pd.DataFrame, label_names: Sequence[str], top: int = 5) -> str:
    """A human-readable report: each query's text, label and prediction with its top helpful and harmful training texts."""

    def name(i: int) -> str:
        return label_names[i] if 0 <= i < len(label_names) else "-"

    lines = ["# Influence report", "", SIGN_CONVENTION, ""]
    for _, test in tests.iterrows():
        lines += [f"## {test.test_id} ({test.test_group})", "", f"> {test.text}", "",
                  f"label **{name(int(test.test_label))}**, predicted **{name(int(test.test_pred))}**, loss {test.loss:.3f}, "
                  f"{int(test.candidates)} candidates scored", ""]
        part = influence[influence["test_id"] == test.test_id]
        for direction in ("helpful", "harmful"):
            rows = part[part["direction"] == direction].sort_values("rank").head(top)
            lines += [f"**Most {direction}**", "", "| rank | influence | label | training example |", "|---:|---:|---|---|"]
            for _, r in rows.iterrows():
                text = str(r.train_text).replace("|", "\\|")
                lines.append(f"| {int(r['rank'])} | {r.influence:.4g} | {name(int(r.train_label))} | {text} |")
            lines.append("")
    return "\n".join(lines)
