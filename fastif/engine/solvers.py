"""Inverse-HVP solvers: s_test = (H + lambda I)^-1 v for many right-hand sides at once.

All solvers take the right-hand sides as rows of a (T, P) matrix and return a
``SolveResult`` whose ``vectors`` are (T, P).

* ``ExactSolver``: dense H in float64, eigendecomposition cached per operator. For
  selections up to ~10-20k parameters; the ground truth for the others.
* ``CGSolver``: conjugate gradient on (H + lambda I) with full-data HVPs, each RHS
  with its own step sizes, stopping at a relative residual ``tol``.
* ``LissaSolver``: the stochastic recursion of Agarwal et al. used by Koh & Liang and
  FastIF, h <- v + (1 - d) h - H_B h / s with H_B a fresh minibatch Hessian each
  step. Its fixed point is h = s (H + d s I)^-1 v, so s_test = h / s solves the
  damped system with **effective damping lambda = d * s**. fastif's knob is lambda
  (``damping``); d = lambda / s is derived, so changing ``scale`` does not silently
  change the problem being solved. The recursion contracts iff every eigenvalue mu
  of H_B satisfies 0 < (mu + lambda) / s < 2 - d; the safe rule is s > top
  eigenvalue (``top_eigenvalue``). Divergence (non-finite values, or a norm past the
  bound ||h|| <= s ||v|| / lambda that holds for every contracting iteration) raises
  ``SolverDivergenceError`` saying how far to raise ``scale``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch

from fastif.engine.hessian import HessianOperator, smallest_eigenvalue, top_eigenvalue
from fastif.errors import ConfigError, SolverDivergenceError


@dataclass
class SolveResult:
    """Output of an inverse-HVP solve.

    vectors: s_test, shape (T, P).
    chain_vectors: LiSSA's per-chain solutions (C, T, P) when chains > 1, for standard
        errors; None for deterministic solvers and single chains.
    effective_damping: lambda actually used.
    steps: iterations taken (LiSSA: per chain, max over chains; CG: iterations; exact: 0).
    relative_change: last relative update (LiSSA) or relative residual (CG); 0 for exact.
    seconds: wall time of the solve.
    details: solver-specific facts (scale, depth, eigenvalues, ...), JSON-serialisable.
    """

    vectors: torch.Tensor
    effective_damping: float
    steps: int
    relative_change: float
    seconds: float
    chain_vectors: Optional[torch.Tensor] = None
    details: Dict[str, object] = field(default_factory=dict)


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return x.double().norm(dim=1)


@dataclass
class ExactSolver:
    """Dense solve via the eigendecomposition of H (float64); cached per operator."""

    max_params: int = 20_000
    name = "exact"

    def __post_init__(self) -> None:
        self._cache_key = None
        self._eig = None

    def eigendecomposition(self, operator: HessianOperator):
        key = (id(operator), operator.n, operator.dim)
        if self._cache_key != key:
            if operator.dim > self.max_params:
                raise ConfigError(
                    f"The exact solver forms a dense {operator.dim} x {operator.dim} Hessian, above its limit of "
                    f"{self.max_params} parameters. Select fewer parameters (model.influence_params), or use hvp.solver=cg or lissa."
                )
            self._eig = torch.linalg.eigh(operator.dense())
            self._cache_key = key
        return self._eig

    def solve(self, operator: HessianOperator, rhs: torch.Tensor, damping: float = 0.0) -> SolveResult:
        start = time.perf_counter()
        evals, evecs = self.eigendecomposition(operator)
        shifted = evals + damping
        floor = 1e-12 * float(evals.abs().max().clamp_min(1e-300))
        if bool((shifted.abs() <= floor).any()):
            raise SolverDivergenceError(
                f"H + {damping:g} I is singular (smallest |eigenvalue + damping| = {float(shifted.abs().min()):.3g}). "
                f"Raise the damping (e.g. hvp.damping={max(damping * 10, 1e-3):g})."
            )
        coeffs = (rhs.to(torch.float64) @ evecs) / shifted
        solution = (coeffs @ evecs.T).to(rhs.dtype)
        return SolveResult(
            vectors=solution,
            effective_damping=damping,
            steps=0,
            relative_change=0.0,
            seconds=time.perf_counter() - start,
            details={
                "min_eigenvalue": float(evals.min()),
                "max_eigenvalue": float(evals.max()),
                "negative_eigenvalues": int((shifted < 0).sum()),
            },
        )


@dataclass
class CGSolver:
    """Conjugate gradient on (H + damping I) with full-data HVPs, one independent CG per RHS."""

    tol: float = 1e-6
    max_iter: int = 200
    name = "cg"

    def solve(self, operator: HessianOperator, rhs: torch.Tensor, damping: float = 0.0) -> SolveResult:
        start = time.perf_counter()
        work = rhs.to(torch.float64) if rhs.dtype == torch.float64 else rhs
        x = torch.zeros_like(work)
        r = work.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        target = self.tol * _row_norms(work).to(work.dtype)
        active = torch.sqrt(rs) > target
        it = 0
        while bool(active.any()) and it < self.max_iter:
            it += 1
            ap = operator.matvec(p).to(work.dtype) + damping * p
            curvature = (p * ap).sum(1)
            if bool((curvature[active] <= 0).any()) or not bool(torch.isfinite(curvature).all()):
                raise SolverDivergenceError(
                    f"CG met non-positive curvature at iteration {it}: H + {damping:g} I is not positive definite here. "
                    f"Raise hvp.damping (e.g. to {max(damping * 10, 1e-3):g}) or use hvp.solver=exact to inspect the spectrum."
                )
            alpha = torch.where(active, rs / curvature, torch.zeros_like(rs))
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            rs_new = (r * r).sum(1)
            beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
            p = torch.where(active[:, None], r + beta[:, None] * p, p)
            rs = torch.where(active, rs_new, rs)
            active = torch.sqrt(rs) > target
        rel = float((torch.sqrt(rs) / _row_norms(work).clamp_min(1e-300).to(rs.dtype)).max())
        return SolveResult(
            vectors=x.to(rhs.dtype),
            effective_damping=damping,
            steps=it,
            relative_change=rel,
            seconds=time.perf_counter() - start,
            details={"converged": not bool(active.any()), "tol": self.tol, "max_iter": self.max_iter},
        )


@dataclass
class LissaSolver:
    """Stochastic LiSSA recursion, many RHS per step with shared minibatches.

    Args:
        scale: s, must exceed the top eigenvalue of the minibatch Hessians; None =
            ``scale_safety`` x the power-iteration estimate of the top eigenvalue.
        depth: recursion steps per chain.
        batch_size: examples per minibatch Hessian.
        chains: independent repeats (different minibatch streams) averaged.
        tol: stop a chain when max_T ||h_j - h_{j-1}|| / ||h_j|| < tol (0: never).
        seed: seed of the minibatch sampling (chain c uses seed + c).
        scale_safety: factor over the estimated top eigenvalue when scale is None.
        tail_average: fraction of the last steps whose iterates are averaged
            (Polyak-Ruppert). The last LiSSA iterate carries the noise of the last
            ~1/d minibatches; averaging the converged tail cancels much of it at no
            extra HVP. 0 returns the last iterate, as the original LiSSA does.
    """

    scale: Optional[float] = None
    depth: int = 500
    batch_size: int = 8
    chains: int = 1
    tol: float = 0.0
    seed: int = 0
    scale_safety: float = 2.0
    tail_average: float = 0.5
    name = "lissa"

    def __post_init__(self) -> None:
        if self.scale is not None and self.scale <= 0:
            raise ConfigError(f"LiSSA scale must be > 0 (got {self.scale}); use a value above the Hessian's top eigenvalue, or leave it unset to estimate one.")
        if not 0.0 <= self.tail_average < 1.0:
            raise ConfigError(f"LiSSA tail_average must be in [0, 1) (got {self.tail_average}).")
        for key in ("depth", "batch_size", "chains"):
            if getattr(self, key) < 1:
                raise ConfigError(f"LiSSA {key} must be >= 1 (got {getattr(self, key)}).")

    def resolve_scale(self, operator: HessianOperator, damping: float) -> float:
        if self.scale is not None:
            return float(self.scale)
        top = top_eigenvalue(operator, seed=self.seed)
        return max(self.scale_safety * abs(top), 2.0 * damping, 1e-8)

    def _divergence(self, operator: HessianOperator, scale: float, damping: float, step: int, norm_ratio: float) -> SolverDivergenceError:
        """Name the cause: a scale below the top eigenvalue, or negative curvature the damping does not cover."""
        top = abs(top_eigenvalue(operator, seed=self.seed))
        where = f"LiSSA diverged at step {step} (||h|| / ||v|| = {norm_ratio:.3g}) with scale={scale:g}, damping={damping:g}"
        if scale < 1.05 * top:
            needed = 1.1 * top
            return SolverDivergenceError(
                f"{where}: the scale must exceed the Hessian's top eigenvalue, estimated at {top:.4g} by power iteration. "
                f"Raise hvp.scale to at least {needed:.4g} ({needed / scale:.1f}x the current value), or leave hvp.scale=0 to choose it automatically."
            )
        bottom = smallest_eigenvalue(operator, seed=self.seed)
        if bottom + damping <= 0:
            needed = max(-bottom * 1.5, 2 * damping, 1e-4)
            return SolverDivergenceError(
                f"{where}: the Hessian has negative curvature (smallest eigenvalue about {bottom:.3g}; the model is not at a "
                f"minimum of the training loss over the selected parameters), so H + damping I is not positive definite. "
                f"Raise hvp.damping to at least {needed:.3g}, or train the model further."
            )
        return SolverDivergenceError(
            f"{where}, although scale exceeds the top eigenvalue ({top:.4g}) and damping covers the smallest ({bottom:.3g}) "
            f"on a sample of the data: minibatch Hessians of size {self.batch_size} are noisier. Raise hvp.batch_size or hvp.scale (e.g. 2x)."
        )

    def solve(self, operator: HessianOperator, rhs: torch.Tensor, damping: float = 0.0) -> SolveResult:
        start = time.perf_counter()
        scale = self.resolve_scale(operator, damping)
        d = damping / scale
        if d >= 1.0:
            raise ConfigError(f"LiSSA needs damping < scale (got damping={damping:g}, scale={scale:g}); raise hvp.scale or lower hvp.damping.")
        v_norm = _row_norms(rhs).clamp_min(1e-300)
        bound = 10.0 * (1.0 / d if d > 0 else 1e8)
        chains = []
        steps_taken = 0
        rel = float("inf")
        for chain in range(self.chains):
            gen = torch.Generator().manual_seed(self.seed + chain)
            h = rhs.clone()
            rel = float("inf")
            tail_start = int(self.depth * (1.0 - self.tail_average)) + 1
            tail_sum, tail_count = torch.zeros_like(rhs), 0
            for step in range(1, self.depth + 1):
                idx = torch.randint(operator.n, (min(self.batch_size, operator.n),), generator=gen).tolist()
                hv = operator.minibatch_matvec(h, idx)
                h_new = rhs + (1.0 - d) * h - hv / scale
                ratio = float((_row_norms(h_new) / v_norm).max())
                if not math.isfinite(ratio) or ratio > bound:
                    raise self._divergence(operator, scale, damping, step, ratio)
                rel = float((_row_norms(h_new - h) / _row_norms(h_new).clamp_min(1e-300)).max())
                h = h_new
                if step >= tail_start:
                    tail_sum += h
                    tail_count += 1
                if rel < self.tol:
                    break
            steps_taken = max(steps_taken, step)
            chains.append((tail_sum / tail_count if tail_count else h) / scale)
        stacked = torch.stack(chains)
        return SolveResult(
            vectors=stacked.mean(0),
            effective_damping=damping,
            steps=steps_taken,
            relative_change=rel,
            seconds=time.perf_counter() - start,
            chain_vectors=stacked if self.chains > 1 else None,
            details={"scale": scale, "d": d, "depth": self.depth, "batch_size": self.batch_size, "chains": self.chains, "tail_average": self.tail_average},
        )


Solver = Union[ExactSolver, CGSolver, LissaSolver]
_SOLVERS = {"exact": ExactSolver, "cg": CGSolver, "lissa": LissaSolver}


def make_solver(solver: Union[str, Solver], **options) -> Solver:
    """A solver object from its name and options (an object is returned as is)."""
    if not isinstance(solver, str):
        if options:
            raise TypeError("solver options are only accepted with a solver name, not a solver object")
        return solver
    if solver not in _SOLVERS:
        raise ConfigError(f"Unknown inverse-HVP solver '{solver}'. Use one of: {', '.join(_SOLVERS)}.")
    try:
        return _SOLVERS[solver](**options)
    except TypeError as exc:
        raise ConfigError(f"Bad option for the {solver} solver: {exc}.") from None
