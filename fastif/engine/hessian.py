"""Hessian-vector products of the training objective over a parameter selection.

R(theta) = (1/n) sum_i L(z_i; theta). ``HessianOperator`` applies H = d^2 R / d theta^2
(or the Hessian of one minibatch's mean loss) to many vectors at once: one forward,
one backward with ``create_graph=True`` and one *batched* double backward
(``is_grads_batched``) serve all T right-hand sides. Every call builds its graph and
drops it before returning, so no graph survives between calls (the classic OOM of
influence code). An L2 penalty on the parameters is not part of H here: pass it as
damping to the solvers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from fastif.engine.data import DatasetLike, LossFn, as_dataset, iterate_batches, make_batch, model_device
from fastif.engine.params import ParameterSelection, requires_grad_only


class HessianOperator:
    """H of the mean training loss over ``selection``, applied as ``matvec`` (full data) or ``minibatch_matvec``.

    Args:
        model: the model, in the state whose Hessian is wanted (use ``model.eval()``
            so dropout does not make H random).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
        data: the training set R is the mean over.
        selection: the parameters H is taken over.
        batch_size: batch size of the passes over ``data`` in ``matvec``.
        collate_fn: batch collation (default collate if None).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        data: DatasetLike,
        selection: ParameterSelection,
        *,
        batch_size: int = 64,
        collate_fn: Optional[Callable] = None,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.data: Dataset = as_dataset(data)
        self.selection = selection
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.device = model_device(model)
        self.hvp_calls = 0

    @property
    def n(self) -> int:
        return len(self.data)

    @property
    def dim(self) -> int:
        return self.selection.numel

    def _batch_hvp(self, batch: Any, vectors: torch.Tensor, weight: float) -> torch.Tensor:
        """weight * (Hessian of the batch's summed loss) @ vectors.T, returned as (T, P)."""
        self.hvp_calls += 1
        params = self.selection.tensors(self.model)
        with requires_grad_only(self.model, self.selection), torch.enable_grad():
            losses = self.loss_fn(self.model, batch)
            grads = torch.autograd.grad(losses.sum() * weight, params, create_graph=True)
            flat_grad = self.selection.flatten(list(grads))
            if not flat_grad.requires_grad:  # loss is linear in the selection: H = 0
                return torch.zeros_like(vectors)
            hv = torch.autograd.grad(
                flat_grad,
                params,
                grad_outputs=vectors.to(flat_grad.dtype),
                is_grads_batched=True,
                allow_unused=True,
            )
        t = vectors.shape[0]
        pieces = [torch.zeros(t, *s, dtype=vectors.dtype, device=vectors.device) if h is None else h for h, s in zip(hv, self.selection.shapes)]
        return self.selection.flatten(pieces).to(vectors.dtype)

    def _as_matrix(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (T, {self.dim}), got {tuple(vectors.shape)}")
        return vectors

    def matvec(self, vectors: torch.Tensor, indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """H @ v for each row v of ``vectors`` (T, P); H over ``indices`` (default: all data)."""
        vectors = self._as_matrix(vectors)
        count = self.n if indices is None else len(indices)
        out = torch.zeros_like(vectors)
        for _, batch in iterate_batches(self.data, self.batch_size, self.device, indices, self.collate_fn):
            out += self._batch_hvp(batch, vectors, 1.0 / count)
        return out

    def minibatch_matvec(self, vectors: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """H_B @ v with H_B the Hessian of the mean loss over the examples ``indices`` (one pass)."""
        vectors = self._as_matrix(vectors)
        batch = make_batch(self.data, indices, self.device, self.collate_fn)
        return self._batch_hvp(batch, vectors, 1.0 / len(indices))

    def dense(self, chunk: int = 64) -> torch.Tensor:
        """The full P x P Hessian in float64.

        Each data batch builds its gradient graph once; ``chunk`` basis vectors at a time
        are then pushed through the batched double backward of that same graph.
        """
        p = self.dim
        dtype = self.selection_dtype()
        params = self.selection.tensors(self.model)
        h = torch.zeros(p, p, dtype=torch.float64, device=self.device)
        for _, batch in iterate_batches(self.data, self.batch_size, self.device, None, self.collate_fn):
            self.hvp_calls += 1
            with requires_grad_only(self.model, self.selection), torch.enable_grad():
                losses = self.loss_fn(self.model, batch)
                grads = torch.autograd.grad(losses.sum() / self.n, params, create_graph=True)
                flat_grad = self.selection.flatten(list(grads))
                if not flat_grad.requires_grad:
                    continue
                for start in range(0, p, chunk):
                    stop = min(p, start + chunk)
                    basis = torch.zeros(stop - start, p, dtype=dtype, device=self.device)
                    basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                    rows = torch.autograd.grad(flat_grad, params, grad_outputs=basis, is_grads_batched=True,
                                               retain_graph=True, allow_unused=True)
                    pieces = [torch.zeros(stop - start, *s, dtype=dtype, device=self.device) if r is None else r
                              for r, s in zip(rows, self.selection.shapes)]
                    h[start:stop] += self.selection.flatten(pieces).to(torch.float64)
        return 0.5 * (h + h.T)  # symmetrise away round-off

    def selection_dtype(self) -> torch.dtype:
        return self.selection.tensors(self.model)[0].dtype


def top_eigenvalue(
    operator: HessianOperator,
    *,
    iters: int = 30,
    tol: float = 1e-2,
    sample_size: Optional[int] = 512,
    seed: int = 0,
) -> float:
    """Largest-magnitude eigenvalue of H by power iteration on HVPs.

    H is taken over a fixed random subset of ``sample_size`` training examples (all of
    them if None or if the set is smaller), which is what the LiSSA scale must exceed.
    Stops when the estimate changes by less than ``tol`` (relative).
    """
    return _power_iteration(operator, 0.0, iters=iters, tol=tol, sample_size=sample_size, seed=seed)


def smallest_eigenvalue(
    operator: HessianOperator,
    *,
    iters: int = 8,
    tol: float = 1e-2,
    sample_size: Optional[int] = 512,
    seed: int = 0,
) -> float:
    """Smallest (most negative) eigenvalue of H, by Lanczos (scipy's ``eigsh``) on HVPs.

    Negative curvature (a model away from a minimum) is what makes LiSSA and CG fail
    even with a large scale: H + lambda I needs lambda > -smallest eigenvalue. Power
    iteration on a shifted H converges too slowly for this; Lanczos needs a few dozen HVPs
    (``iters`` restarts of at most 20). NaN when it does not converge.
    """
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    gen = torch.Generator().manual_seed(seed)
    indices = None
    if sample_size is not None and sample_size < operator.n:
        indices = torch.randperm(operator.n, generator=gen)[:sample_size].tolist()
    dtype = operator.selection_dtype()

    def matvec(x):
        v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(1, -1), dtype=dtype, device=operator.device)
        return operator.matvec(v, indices)[0].double().cpu().numpy()

    linear = LinearOperator((operator.dim, operator.dim), matvec=matvec, dtype=np.float64)
    start = torch.randn(operator.dim, generator=gen, dtype=torch.float64).numpy()
    try:
        values = eigsh(linear, k=1, which="SA", maxiter=iters, tol=tol, v0=start, return_eigenvectors=False)
    except ArpackNoConvergence as partial:
        values = partial.eigenvalues if len(partial.eigenvalues) else np.array([float("nan")])
    return float(values.min())


def _power_iteration(operator: HessianOperator, shift: float, *, iters: int, tol: float, sample_size: Optional[int], seed: int) -> float:
    """Dominant eigenvalue of (shift I - H) if shift else of H, Rayleigh quotient of the last vector."""
    gen = torch.Generator().manual_seed(seed)
    indices = None
    if sample_size is not None and sample_size < operator.n:
        indices = torch.randperm(operator.n, generator=gen)[:sample_size].tolist()
    v = torch.randn(1, operator.dim, generator=gen, dtype=torch.float64).to(operator.device, operator.selection_dtype())
    v = v / v.norm()
    estimate = 0.0
    for _ in range(iters):
        hv = operator.matvec(v, indices)
        if shift:
            hv = shift * v - hv
        new = float((v * hv).sum())
        norm = float(hv.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return new
        v = hv / norm
        if estimate != 0.0 and abs(new - estimate) <= tol * abs(new):
            return new
        estimate = new
    return estimate
