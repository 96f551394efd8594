"""Influence scores: I(z, z_test) = - grad L(z) . s_test, s_test = (H + lambda I)^-1 grad L(z_test).

Sign convention (Koh & Liang, FastIF): I is the predicted change of the test loss when
z is up-weighted, so **negative = helpful** (up-weighting z lowers the test loss) and
positive = harmful. Removing z from a training set of n points changes the test loss
by about -I / n.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from fastif.engine.data import DatasetLike, LossFn, as_dataset, iterate_batches, model_device
from fastif.engine.gradients import directional_derivatives, per_example_gradients, resolve_strategy
from fastif.engine.hessian import HessianOperator
from fastif.engine.params import ParameterSelection, select_parameters
from fastif.engine.solvers import Solver, SolveResult, make_solver


def query_gradients(
    model: torch.nn.Module,
    loss_fn: LossFn,
    test: DatasetLike,
    selection: ParameterSelection,
    *,
    batch_size: int = 64,
    collate_fn: Optional[Callable] = None,
    groups: Optional[Sequence[Sequence[int]]] = None,
    strategy: str = "auto",
) -> torch.Tensor:
    """grad L(z_test) for every test point, (T, P); with ``groups`` the gradient of each
    group's mean loss (FastIF's anchor groups), (G, P)."""
    test = as_dataset(test)
    device = model_device(model)
    rows = []
    for _, batch in iterate_batches(test, batch_size, device, None, collate_fn):
        if strategy == "auto":
            strategy = resolve_strategy(model, loss_fn, batch, selection)
        if strategy == "jvp":  # no per-example rule applies: one backward per test point
            rows.append(_gradients_by_backward(model, loss_fn, batch, selection))
        else:
            rows.append(per_example_gradients(model, loss_fn, batch, selection, strategy))
    grads = torch.cat(rows)
    if groups is None:
        return grads
    return torch.stack([grads[torch.as_tensor(list(g), dtype=torch.long)].mean(0) for g in groups])


def _gradients_by_backward(model, loss_fn, batch, selection) -> torch.Tensor:
    """One backward per example: only for test points of models neither hooks nor vmap can handle."""
    from fastif.engine.gradients import batch_gradient

    with torch.no_grad():
        b = loss_fn(model, batch).shape[0]
    eye = torch.eye(b, device=model_device(model))
    return torch.stack([batch_gradient(model, loss_fn, batch, selection, eye[j]) for j in range(b)])


def score_candidates(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train: DatasetLike,
    s_test: torch.Tensor,
    selection: ParameterSelection,
    *,
    candidates: Optional[torch.Tensor] = None,
    batch_size: int = 128,
    collate_fn: Optional[Callable] = None,
    strategy: str = "auto",
) -> torch.Tensor:
    """Influence -grad L(z_j) . s_test[t] for candidates of each test point.

    Args:
        s_test: (T, P) inverse-HVP vectors.
        candidates: (T, k) training indices per test point, or None for all training
            points.
    Returns:
        (T, k) scores aligned with ``candidates``, or (T, N) for all training points.

    Each training example's gradient is computed once per call, whatever T: the union
    of all candidate sets is scored in chunks of ``batch_size`` against every s_test.
    """
    train = as_dataset(train)
    device = model_device(model)
    s_test = s_test.to(device)
    t = s_test.shape[0]
    if candidates is None:
        order = None
        n_rows = len(train)
    else:
        candidates = torch.as_tensor(candidates, dtype=torch.long)
        if candidates.dim() != 2 or candidates.shape[0] != t:
            raise ValueError(f"candidates must have shape (T={t}, k), got {tuple(candidates.shape)}")
        if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= len(train)):
            raise ValueError(f"candidate indices must lie in [0, {len(train)})")
        order, inverse = torch.unique(candidates, return_inverse=True)
        n_rows = len(order)
    if strategy == "auto":
        probe = next(iterate_batches(train, min(2, len(train)), device, None if order is None else order[:2].tolist(), collate_fn))[1]
        strategy = resolve_strategy(model, loss_fn, probe, selection)
    table = torch.empty(n_rows, t, dtype=s_test.dtype, device=device)
    position = 0
    for positions, batch in iterate_batches(train, batch_size, device, None if order is None else order.tolist(), collate_fn):
        if strategy == "jvp" and candidates is not None and t > 1:
            # Forward mode pays per direction: only score the directions that want this chunk.
            chunk = _jvp_needed_directions(model, loss_fn, batch, selection, s_test, candidates, positions)
        else:
            chunk = directional_derivatives(model, loss_fn, batch, selection, s_test, strategy)
        table[position : position + len(positions)] = chunk.to(table.dtype)
        position += len(positions)
    scores = -table.T  # (T, rows)
    if candidates is None:
        return scores
    return torch.gather(scores, 1, inverse.to(device))


def _jvp_needed_directions(model, loss_fn, batch, selection, s_test, candidates, positions) -> torch.Tensor:
    wanted = torch.isin(candidates, positions).any(1).nonzero().flatten()
    out = torch.zeros(len(positions), s_test.shape[0], dtype=s_test.dtype, device=s_test.device)
    if len(wanted):
        out[:, wanted] = directional_derivatives(model, loss_fn, batch, selection, s_test[wanted], "jvp").to(out.dtype)
    return out


def influence_scores(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train: DatasetLike,
    test: DatasetLike,
    *,
    params: Union[None, Sequence[str], ParameterSelection] = None,
    solver: Union[str, Solver] = "exact",
    damping: float = 0.0,
    candidates: Optional[torch.Tensor] = None,
    batch_size: int = 64,
    collate_fn: Optional[Callable] = None,
    hessian_data: Optional[DatasetLike] = None,
    strategy: str = "auto",
    **solver_options,
) -> torch.Tensor:
    """Influence of training points on test points, shape (n_test, n_train) or (n_test, k).

    I(z, z_test) = -grad L(z) . (H + damping I)^-1 grad L(z_test); negative = helpful.

    Args:
        model: any torch.nn.Module (put it in eval mode: dropout makes gradients random).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
        train, test: map-style datasets or tuples of tensors (default collate or ``collate_fn``).
        params: name patterns (or a ParameterSelection) of the parameters H and the
            gradients are taken over; None = all parameters that require grad.
        solver: "exact", "cg", "lissa" or a solver object; options (scale, depth,
            chains, tol, seed, max_iter, ...) go in ``solver_options``. LiSSA's own
            minibatch size needs a solver object: ``LissaSolver(batch_size=...)``.
        damping: lambda; include an L2 training penalty's coefficient here.
        candidates: (n_test, k) training indices to score per test point (kNN);
            None scores every training point.
        batch_size: batch size of the gradient and HVP passes.
        hessian_data: data H is the mean over (default: ``train``).
        strategy: per-example gradient strategy, see ``fastif.engine.gradients``.
    """
    selection = params if isinstance(params, ParameterSelection) else select_parameters(model, params)
    operator = HessianOperator(model, loss_fn, hessian_data if hessian_data is not None else train, selection, batch_size=batch_size, collate_fn=collate_fn)
    grads = query_gradients(model, loss_fn, test, selection, batch_size=batch_size, collate_fn=collate_fn, strategy=strategy)
    result: SolveResult = make_solver(solver, **solver_options).solve(operator, grads, damping)
    return score_candidates(model, loss_fn, train, result.vectors, selection, candidates=candidates, batch_size=batch_size, collate_fn=collate_fn, strategy=strategy)
