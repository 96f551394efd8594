"""Correcting a model's errors by fine-tuning on influential training examples (FastIF, section 6).

The procedure (what ``fastif finetune-correct`` runs):

1. Split the challenge set (e.g. HANS) into an *anchor part* and a *held-out part*, stratified by
   group (e.g. HANS heuristic), seeded: :func:`split_anchor_part`.
2. Per replica, sample ``anchors_per_group`` anchors of each group from the anchor part:
   :func:`sample_anchors`.
3. Per arm, starting from the same model, run ``rounds`` cumulative rounds of one plain SGD step
   on the arm's batch:

   - ``helpful``: for each anchor group, the ``m`` pool examples with the most negative influence
     on the group's mean loss (influence recomputed with the current model every round);
   - ``harmful``: the ``m`` most positive per group (the sign check);
   - ``random``: as many random pool examples (the control);
   - ``anchors``: the anchors themselves.

   Influence is narrowed by kNN: a group's candidates are the union of its anchors' k nearest
   pool examples in the starting model's feature space (or the whole pool).
4. After every round, evaluate on the held-out part (overall and per group) and on the
   in-distribution eval set: :func:`evaluate_rows`.
5. Summarise accuracy changes vs the starting model with t-intervals over replicas
   (:func:`summarize`) and plot the curves (:func:`plot_curves`).

Influence sign convention (fastif.engine.scoring): negative = helpful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from fastif.errors import ConfigError, InputError

ARMS = ("helpful", "harmful", "random", "anchors")
ALL_GROUPS = "all"
CHALLENGE = "challenge_heldout"
IN_DISTRIBUTION = "in_distribution"
RESULT_COLUMNS = ("arm", "replica", "round", "eval_split", "group", "accuracy", "loss", "n")


# --------------------------------------------------------------------------------------------------
# Anchors and held-out part
# --------------------------------------------------------------------------------------------------


def group_labels(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """One group name per row: the values of ``columns`` joined by '/' (e.g. 'lexical_overlap')."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"The challenge split has no column {missing[0]!r} to group anchors by (columns: {', '.join(map(str, frame.columns))}). "
                         f"Fix: set correct.group_by to existing columns, e.g. correct.group_by=[heuristic] or [label_name].")
    labels = frame[list(columns)].astype(str).agg("/".join, axis=1)
    return labels.reset_index(drop=True)


def split_anchor_part(groups: pd.Series, anchor_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (anchor part, held-out part): ``anchor_fraction`` of every group goes to the anchor part.

    Stratified and seeded, so every group is represented on both sides.
    """
    if not 0.0 < anchor_fraction < 1.0:
        raise ConfigError(f"Invalid config value for 'correct.anchor_fraction': got {anchor_fraction}, need 0 < x < 1. Fix: e.g. correct.anchor_fraction=0.5.")
    rng = np.random.default_rng(seed)
    anchor, heldout = [], []
    for _, positions in sorted(_positions_by_group(groups).items()):
        positions = rng.permutation(positions)
        cut = int(round(len(positions) * anchor_fraction))
        cut = min(max(cut, 1), len(positions) - 1) if len(positions) > 1 else len(positions)
        anchor.extend(positions[:cut].tolist())
        heldout.extend(positions[cut:].tolist())
    return np.sort(np.asarray(anchor, dtype=np.int64)), np.sort(np.asarray(heldout, dtype=np.int64))


def sample_anchors(groups: pd.Series, anchor_part: np.ndarray, per_group: int, seed: int) -> Dict[str, np.ndarray]:
    """``per_group`` positions of each group, drawn without replacement from ``anchor_part``."""
    if per_group < 1:
        raise ConfigError(f"Invalid config value for 'correct.anchors_per_group': got {per_group}, need >= 1. Fix: e.g. correct.anchors_per_group=10.")
    rng = np.random.default_rng(seed)
    in_part = groups.iloc[anchor_part]
    chosen: Dict[str, np.ndarray] = {}
    for name, positions in sorted(_positions_by_group(in_part, anchor_part).items()):
        if len(positions) < per_group:
            raise InputError(f"Group {name!r} has only {len(positions)} examples in the anchor part, fewer than correct.anchors_per_group={per_group}. "
                             f"Fix: lower correct.anchors_per_group or raise correct.anchor_fraction.")
        chosen[name] = np.sort(rng.choice(positions, size=per_group, replace=False))
    return chosen


def _positions_by_group(groups: pd.Series, positions: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    positions = np.arange(len(groups)) if positions is None else np.asarray(positions)
    values = groups.to_numpy()
    return {str(g): positions[values == g] for g in pd.unique(values)}


# --------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------


def top_candidates(scores: torch.Tensor, candidates: torch.Tensor, m: int, arm: str) -> torch.Tensor:
    """The ``m`` candidates of an influence arm: most negative scores (helpful) or most positive (harmful).

    scores and candidates are 1-D and aligned; ties break by position (stable).
    """
    if arm not in ("helpful", "harmful"):
        raise ValueError(f"top_candidates ranks the influence arms helpful/harmful, not {arm!r}")
    if scores.shape != candidates.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and candidates {tuple(candidates.shape)} must be aligned 1-D tensors")
    key = scores.double() if arm == "helpful" else -scores.double()
    order = torch.sort(key, stable=True).indices[: min(m, len(scores))]
    return candidates[order.to(candidates.device)]


def random_arm(pool_size: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` distinct random pool positions (the control arm)."""
    if size > pool_size:
        raise InputError(f"The random arm needs {size} pool examples but the pool has {pool_size}. Fix: lower correct.m or use a larger pool.")
    return np.sort(rng.choice(pool_size, size=size, replace=False))


def anchor_row_blocks(anchors: Dict[str, np.ndarray]) -> List[List[int]]:
    """Rows of each group's anchors when the groups are concatenated in sorted order."""
    rows, start = [], 0
    for g in sorted(anchors):
        rows.append(list(range(start, start + len(anchors[g]))))
        start += len(anchors[g])
    return rows


def candidate_sets(neighbours: torch.Tensor, anchors: Dict[str, np.ndarray], anchor_rows: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    """Per group, the union of its anchors' nearest pool examples.

    neighbours: (A, k) pool positions of the k nearest neighbours of every anchor (rows in the
    order of the concatenated anchors); anchor_rows[g] are the rows of group g's anchors.
    """
    return {g: torch.unique(neighbours[torch.as_tensor(anchor_rows[g], dtype=torch.long)].flatten()) for g in anchors}


@dataclass
class InfluenceSetup:
    """What computing the anchor groups' influence needs, besides the model."""

    loss_fn: Callable
    pool: object  # EncodedDataset of the candidate pool
    hessian_data: object  # dataset H is the mean over (the model's training data)
    selection: object  # ParameterSelection
    solver: object  # a fastif.engine.solvers Solver
    damping: float
    batch_size: int = 64


def group_influence(model: torch.nn.Module, setup: InfluenceSetup, anchors_data, groups: List[List[int]], candidates: List[torch.Tensor]) -> List[torch.Tensor]:
    """Influence of each group's candidates on that anchor group's mean loss (negative = helpful).

    One inverse-HVP solve for all groups; each pool example's gradient is computed once.
    Returns one 1-D score tensor per group, aligned with ``candidates[g]``.
    """
    from fastif.engine.hessian import HessianOperator
    from fastif.engine.scoring import query_gradients, score_candidates

    grads = query_gradients(model, setup.loss_fn, anchors_data, setup.selection, batch_size=setup.batch_size, groups=groups)
    operator = HessianOperator(model, setup.loss_fn, setup.hessian_data, setup.selection, batch_size=setup.batch_size)
    s_test = setup.solver.solve(operator, grads, setup.damping).vectors
    union = torch.unique(torch.cat([c.cpu() for c in candidates]))
    table = score_candidates(model, setup.loss_fn, setup.pool, s_test, setup.selection,
                             candidates=union.unsqueeze(0).expand(len(groups), -1), batch_size=setup.batch_size)
    columns = {int(p): i for i, p in enumerate(union.tolist())}
    return [table[g, torch.as_tensor([columns[int(p)] for p in c.tolist()], dtype=torch.long, device=table.device)].detach().cpu()
            for g, c in enumerate(candidates)]


# --------------------------------------------------------------------------------------------------
# Fine-tuning steps and evaluation
# --------------------------------------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the parameters that train (to restore the starting model between arms)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_state(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    for name, value in state.items():
        named[name].copy_(value)


def sgd_step(model: torch.nn.Module, loss_fn: Callable, batch: dict, learning_rate: float) -> float:
    """One plain SGD step on the mean loss of ``batch`` over the parameters that require grad.

    The model stays in eval mode (no dropout), so the step is deterministic. Returns the loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("No parameter is trainable, so fine-tuning cannot change the model. Fix: set model.trainable, e.g. model.trainable='[*]'.")
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch).mean()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g, alpha=-learning_rate)
    return float(loss.detach())


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate_rows(model: torch.nn.Module, data, groups: Optional[pd.Series], eval_split: str, batch_size: int, device) -> List[dict]:
    """Accuracy and mean loss on ``data``: one row for all examples (group 'all') and one per group."""
    from fastif.training import predict

    probs, losses = predict(model, data, batch_size, device)
    labels = data.tensors["labels"].numpy()
    correct = probs.argmax(axis=1) == labels
    rows = [dict(eval_split=eval_split, group=ALL_GROUPS, accuracy=float(correct.mean()), loss=float(losses.mean()), n=int(len(labels)))]
    if groups is not None:
        values = groups.to_numpy()
        for name in sorted(pd.unique(values)):
            mask = values == name
            rows.append(dict(eval_split=eval_split, group=str(name), accuracy=float(correct[mask].mean()), loss=float(losses[mask].mean()), n=int(mask.sum())))
    return rows


# --------------------------------------------------------------------------------------------------
# One replica
# --------------------------------------------------------------------------------------------------


@dataclass
class ReplicaPlan:
    """Everything one replica runs on: anchors, held-out part, candidate sets and knobs."""

    replica: int
    anchors: Dict[str, np.ndarray]  # group -> challenge positions
    heldout_data: object  # EncodedDataset of the held-out part
    heldout_groups: pd.Series
    eval_data: object  # in-distribution eval EncodedDataset
    anchors_data: object  # EncodedDataset of the anchors, groups concatenated in sorted order
    candidates: Dict[str, torch.Tensor]  # group -> pool positions
    m: int
    rounds: int
    learning_rate: float
    seed: int
    arms: Sequence[str] = ARMS
    eval_batch_size: int = 128
    log: Optional[Callable[[str], None]] = None
    selections: List[dict] = field(default_factory=list)  # filled: which pool examples each round used

    def anchor_rows(self) -> List[List[int]]:
        return anchor_row_blocks(self.anchors)


def run_replica(model: torch.nn.Module, setup: InfluenceSetup, plan: ReplicaPlan, device) -> pd.DataFrame:
    """All arms of one replica; rows as :data:`RESULT_COLUMNS` (round 0 = the starting model, every arm)."""
    start = trainable_state(model)
    base = evaluate_rows(model, plan.heldout_data, plan.heldout_groups, CHALLENGE, plan.eval_batch_size, device)
    base += evaluate_rows(model, plan.eval_data, None, IN_DISTRIBUTION, plan.eval_batch_size, device)
    rows: List[dict] = []
    group_names = sorted(plan.anchors)
    anchor_rows = plan.anchor_rows()
    candidates = [plan.candidates[g] for g in group_names]
    batch_size = plan.m * len(group_names)
    for arm in plan.arms:
        restore_state(model, start)
        rows += [dict(arm=arm, replica=plan.replica, round=0, **row) for row in base]
        rng = np.random.default_rng([plan.seed, plan.replica, ARMS.index(arm)])
        for round_ in range(1, plan.rounds + 1):
            if arm in ("helpful", "harmful"):
                scores = group_influence(model, setup, plan.anchors_data, anchor_rows, candidates)
                chosen = torch.unique(torch.cat([top_candidates(s, c, plan.m, arm) for s, c in zip(scores, candidates)])).numpy()
                batch = to_device(setup.pool.batch(chosen.tolist()), device)
            elif arm == "random":
                chosen = random_arm(len(setup.pool), batch_size, rng)
                batch = to_device(setup.pool.batch(chosen.tolist()), device)
            elif arm == "anchors":
                chosen = np.arange(len(plan.anchors_data))
                batch = to_device(plan.anchors_data.batch(chosen.tolist()), device)
            else:
                raise ConfigError(f"Unknown arm {arm!r}. Fix: choose correct.arms from {', '.join(ARMS)}.")
            loss = sgd_step(model, setup.loss_fn, batch, plan.learning_rate)
            plan.selections.append(dict(arm=arm, replica=plan.replica, round=round_, positions=[int(i) for i in chosen]))
            new = evaluate_rows(model, plan.heldout_data, plan.heldout_groups, CHALLENGE, plan.eval_batch_size, device)
            new += evaluate_rows(model, plan.eval_data, None, IN_DISTRIBUTION, plan.eval_batch_size, device)
            rows += [dict(arm=arm, replica=plan.replica, round=round_, **row) for row in new]
            if plan.log is not None:
                plan.log(f"replica {plan.replica} arm {arm} round {round_}: batch {len(chosen)}, loss {loss:.4f}, "
                         f"held-out challenge acc {new[0]['accuracy']:.4f}, in-distribution acc {new[-1]['accuracy']:.4f}")
    restore_state(model, start)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


# --------------------------------------------------------------------------------------------------
# Statistics, summary, plot
# --------------------------------------------------------------------------------------------------


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean and two-sided Student-t confidence interval of the mean (n - 1 degrees of freedom).

    With one value the interval is undefined (low/high None).
    """
    from scipy import stats

    x = np.asarray(list(values), dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1, "sem": None}
    sem = float(x.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * sem
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(n), "sem": sem}


def accuracy_changes(results: pd.DataFrame, round_: Optional[int] = None) -> pd.DataFrame:
    """Per (arm, replica, eval_split, group): accuracy at ``round_`` (default: the last) minus round 0."""
    last = int(results["round"].max()) if round_ is None else round_
    keys = ["arm", "replica", "eval_split", "group"]
    start = results[results["round"] == 0].set_index(keys)["accuracy"]
    end = results[results["round"] == last].set_index(keys)["accuracy"]
    return (end - start).rename("change").reset_index()


def summarize(results: pd.DataFrame, confidence: float = 0.95, control: str = "random") -> dict:
    """Per arm: mean accuracy change vs the starting model (last round), with t-intervals over
    replicas, on the held-out challenge part (overall and per group) and in distribution; and
    each arm minus the control arm (paired by replica), with its interval."""
    changes = accuracy_changes(results)
    last = int(results["round"].max())
    summary: dict = {"rounds": last, "replicas": int(results["replica"].nunique()), "confidence": confidence, "arms": {}, "vs_" + control: {}}
    start = results[(results["round"] == 0) & (results["group"] == ALL_GROUPS)].groupby("eval_split")["accuracy"].mean()
    summary["start_accuracy"] = {split: float(v) for split, v in start.items()}
    for arm, part in changes.groupby("arm", sort=False):
        entry = {}
        for (split, group), cell in part.groupby(["eval_split", "group"]):
            key = split if group == ALL_GROUPS else f"{split}/{group}"
            entry[key] = t_interval(cell.sort_values("replica")["change"], confidence)
        summary["arms"][arm] = entry
    if control in set(changes["arm"]):
        wide = changes.pivot_table(index=["eval_split", "group", "replica"], columns="arm", values="change")
        for arm in wide.columns:
            if arm == control:
                continue
            diff = (wide[arm] - wide[control]).dropna()
            entry = {}
            for (split, group), cell in diff.groupby(level=["eval_split", "group"]):
                key = split if group == ALL_GROUPS else f"{split}/{group}"
                entry[key] = t_interval(cell.to_numpy(), confidence)
            summary["vs_" + control][arm] = entry
    return summary


def plot_curves(results: pd.DataFrame, path, confidence: float = 0.95) -> None:
    """Accuracy vs round per arm: one panel per held-out group (and overall) plus in distribution;
    lines are means over replicas, bands their t-intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(CHALLENGE, g) for g in [ALL_GROUPS] + sorted(set(results.loc[(results["eval_split"] == CHALLENGE) & (results["group"] != ALL_GROUPS), "group"]))]
    panels.append((IN_DISTRIBUTION, ALL_GROUPS))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (split, group) in zip(axes.flat, panels):
        cell = results[(results["eval_split"] == split) & (results["group"] == group)]
        for arm, part in cell.groupby("arm", sort=False):
            stats_ = part.groupby("round")["accuracy"].apply(lambda s: pd.Series(t_interval(s.to_numpy(), confidence))).unstack()
            x = stats_.index.to_numpy()
            ax.plot(x, stats_["mean"].astype(float), marker="o", ms=3, label=arm)
            if stats_["low"].notna().all():
                ax.fill_between(x, stats_["low"].astype(float), stats_["high"].astype(float), alpha=0.2)
        title = "in-distribution eval" if split == IN_DISTRIBUTION else f"held-out challenge: {group}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
