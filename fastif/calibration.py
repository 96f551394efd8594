"""Calibration of the inverse-HVP solver: which damping, scale, depth, batch size and chains?

The answer is measured on the user's own model (``fastif hvp-calibrate``):

1. **Spectrum.** The top Hessian eigenvalue by power iteration (the LiSSA scale must exceed it)
   and the bottom one (exact when the dense Hessian is affordable, else Lanczos): a negative bottom eigenvalue means H + lambda I is indefinite unless
   lambda > -bottom, and then LiSSA diverges or drifts whatever its depth.
2. **Reference.** The best affordable s_test = (H + lambda_ref I)^-1 grad L(z_test) for a sample
   of test points (exact dense solve, else tight CG, else a long many-chain LiSSA) and the
   influence scores it gives on each test point's candidates.
3. **Grid.** Every :class:`HvpSetting` is solved, timed and compared with the reference:
   relative error and cosine of s_test, Pearson / Spearman of the candidates' scores, overlap of
   the top-m most helpful and most harmful candidates. A setting that diverges is a row with
   status ``diverged``, not a crash.
4. **Choice.** Per-setting medians, the Pareto front of time vs error, and the fastest setting
   that meets the quality target, written as ``recommended.yaml`` (an ``hvp`` section with the
   resolved scale, plus provenance) which :func:`resolve_hvp` hands to other commands
   (``hvp=calibrated``).

Damping convention (see :mod:`fastif.engine.solvers`): ``damping`` is the effective lambda for
every solver; LiSSA's per-step d is lambda / scale and is reported next to it.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from fastif.config import HvpConfig
from fastif.engine.hessian import HessianOperator, smallest_eigenvalue, top_eigenvalue
from fastif.engine.solvers import CGSolver, ExactSolver, LissaSolver, Solver, SolveResult
from fastif.errors import ConfigError, InputError, RunError, SolverDivergenceError
from fastif.runs import atomic_write_bytes, atomic_write_text, latest_complete

log = logging.getLogger("fastif.run.calibration")

CALIBRATION_FILE = "calibration.parquet"
SUMMARY_FILE = "summary.parquet"
SUMMARY_CSV = "summary.csv"
AGGREGATE_FILE = "aggregate.parquet"
AGGREGATE_CSV = "aggregate.csv"
SPECTRUM_FILE = "spectrum.json"
TRADEOFF_PLOT = "tradeoff.png"
RECOMMENDED_FILE = "recommended.yaml"
COMMAND = "hvp-calibrate"

STATUS_OK = "ok"
STATUS_DIVERGED = "diverged"
STATUS_INVALID = "invalid"  # the solver refused the setting (e.g. LiSSA with damping >= scale)
QUALITY_METRICS = ("spearman", "pearson", "top_overlap", "cosine")
STATISTICS = ("median", "min")
SETTING_COLUMNS = ["setting", "solver", "damping_spec", "damping", "scale_spec", "scale", "d", "depth", "batch_size", "chains",
                   "tol", "seed", "tail_average", "max_iter"]
METRIC_COLUMNS = ["rel_error", "cosine", "pearson", "spearman", "top_overlap"]


# ----------------------------------------------------------------------------- settings


def resolve_relative(value: Any, base: float, what: str, fix: str) -> float:
    """A grid value: a number (absolute) or '<f>x' (f times ``base``); 'auto' means '2x'."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            text = "2x"
        if text.endswith("x"):
            try:
                factor = float(text[:-1])
            except ValueError:
                factor = float("nan")
            if math.isfinite(factor) and factor >= 0:
                return factor * base
        else:
            try:
                number = float(text)
            except ValueError:
                number = float("nan")
            if math.isfinite(number) and number >= 0:
                return number
        raise ConfigError(f"Invalid {what} value '{value}'. Fix: {fix}.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"Invalid {what} value '{value}'. Fix: {fix}.")
    return float(value)


@dataclass(frozen=True)
class HvpSetting:
    """One inverse-HVP configuration, with every number resolved (scale 0 only for exact/cg).

    ``damping`` is lambda (the effective damping for every solver); ``damping_spec`` and
    ``scale_spec`` keep what the grid said ('1x', '2x', a number) for display.
    """

    solver: str
    damping: float
    scale: float = 0.0
    depth: int = 0
    batch_size: int = 0
    chains: int = 1
    tol: float = 0.0
    seed: int = 0
    tail_average: float = 0.5
    max_iter: int = 200
    damping_spec: str = ""
    scale_spec: str = ""

    @property
    def d(self) -> float:
        """LiSSA's per-step damping lambda / scale (nan for other solvers)."""
        return self.damping / self.scale if self.solver == "lissa" and self.scale > 0 else float("nan")

    @property
    def name(self) -> str:
        if self.solver == "lissa":
            return (f"lissa lambda={self.damping:.3g} s={self.scale:.3g} depth={self.depth} "
                    f"bs={self.batch_size} chains={self.chains}")
        if self.solver == "cg":
            return f"cg lambda={self.damping:.3g} tol={self.tol:g}"
        return f"exact lambda={self.damping:.3g}"

    def make_solver(self) -> Solver:
        if self.solver == "exact":
            return ExactSolver()
        if self.solver == "cg":
            return CGSolver(tol=self.tol, max_iter=self.max_iter)
        return LissaSolver(scale=self.scale, depth=self.depth, batch_size=self.batch_size, chains=self.chains,
                           tol=self.tol, seed=self.seed, tail_average=self.tail_average)

    def hvp_section(self) -> Dict[str, Any]:
        """The setting as a complete ``hvp`` config section (HvpConfig fields)."""
        return {
            "solver": self.solver,
            "damping": float(self.damping),
            "scale": float(self.scale),
            "depth": int(self.depth or HvpConfig.depth),
            "batch_size": int(self.batch_size or HvpConfig.batch_size),
            "chains": int(self.chains),
            "tol": float(self.tol),
            "max_iter": int(self.max_iter),
            "seed": int(self.seed),
            "tail_average": float(self.tail_average),
        }

    def columns(self) -> Dict[str, Any]:
        return {
            "setting": self.name, "solver": self.solver, "damping_spec": self.damping_spec, "damping": self.damping,
            "scale_spec": self.scale_spec, "scale": self.scale, "d": self.d, "depth": self.depth,
            "batch_size": self.batch_size, "chains": self.chains, "tol": self.tol, "seed": self.seed,
            "tail_average": self.tail_average, "max_iter": self.max_iter,
        }


@dataclass
class Grid:
    """Lists crossed into settings. Damping entries: a number or '<f>x' of the reference damping;
    scale entries: a number, 'auto' (= '2x') or '<f>x' of the top-eigenvalue estimate."""

    solver: Sequence[str] = ("lissa",)
    damping: Sequence[Any] = ("1x",)
    scale: Sequence[Any] = ("2x", "0.25x")
    depth: Sequence[int] = (100, 300, 1000)
    batch_size: Sequence[int] = (1, 8, 32)
    chains: Sequence[int] = (1, 4)


def expand_grid(grid: Grid, *, reference_damping: float, top_eigenvalue: float, hvp: HvpConfig) -> List[HvpSetting]:
    """Every combination of the grid lists (exact and CG ignore the LiSSA-only lists); tol, seed,
    tail_average and max_iter come from ``hvp``."""
    fixed = dict(tol=hvp.tol, seed=hvp.seed, tail_average=hvp.tail_average, max_iter=hvp.max_iter)
    settings: List[HvpSetting] = []
    for solver in grid.solver:
        if solver not in ("exact", "cg", "lissa"):
            raise ConfigError(f"Unknown solver '{solver}' in calibrate.grid.solver. Fix: use exact, cg or lissa.")
        for damping_spec in grid.damping:
            damping = resolve_relative(damping_spec, reference_damping, "calibrate.grid.damping",
                                       "use numbers (absolute lambda) or '<f>x' multiples of the reference damping, e.g. [1x, 3x]")
            if solver != "lissa":
                settings.append(HvpSetting(solver=solver, damping=damping, damping_spec=str(damping_spec), **fixed))
                continue
            for scale_spec, depth, batch_size, chains in itertools.product(grid.scale, grid.depth, grid.batch_size, grid.chains):
                scale = resolve_relative(scale_spec, abs(top_eigenvalue), "calibrate.grid.scale",
                                         "use numbers, 'auto' or '<f>x' multiples of the top Hessian eigenvalue, e.g. [2x, 0.25x]")
                scale = max(scale, 1e-8)
                for key, value in (("depth", depth), ("batch_size", batch_size), ("chains", chains)):
                    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                        raise ConfigError(f"calibrate.grid.{key} holds '{value}'. Fix: use positive integers, e.g. calibrate.grid.{key}=[1,8].")
                settings.append(HvpSetting(solver="lissa", damping=damping, scale=scale, depth=depth, batch_size=batch_size,
                                           chains=chains, damping_spec=str(damping_spec), scale_spec=str(scale_spec), **fixed))
    unique = list(dict.fromkeys(settings))
    if not unique:
        raise ConfigError("The calibration grid is empty. Fix: give at least one value in each calibrate.grid list.")
    return unique


def setting_from_hvp(hvp: HvpConfig, top_eigenvalue: float) -> HvpSetting:
    """The single setting an ``hvp`` section describes (scale 0 = 2x the top-eigenvalue estimate,
    the rule LissaSolver applies itself)."""
    scale = 0.0
    scale_spec = ""
    if hvp.solver == "lissa":
        scale = float(hvp.scale) if hvp.scale > 0 else max(2.0 * abs(top_eigenvalue), 2.0 * hvp.damping, 1e-8)
        scale_spec = str(hvp.scale) if hvp.scale > 0 else "auto"
    return HvpSetting(solver=hvp.solver, damping=hvp.damping, scale=scale,
                      depth=hvp.depth if hvp.solver == "lissa" else 0,
                      batch_size=hvp.batch_size if hvp.solver == "lissa" else 0,
                      chains=hvp.chains if hvp.solver == "lissa" else 1,
                      tol=hvp.tol, seed=hvp.seed, tail_average=hvp.tail_average, max_iter=hvp.max_iter,
                      damping_spec=str(hvp.damping), scale_spec=scale_spec)


# ----------------------------------------------------------------------------- spectrum


@dataclass
class Spectrum:
    """Extreme eigenvalues of H (the mean training-loss Hessian over the selection).

    top_estimate: power-iteration estimate (what LiSSA's automatic scale uses, and what '<f>x'
        scales multiply); top / bottom: the best values known (exact when ``method`` is exact).
    """

    top_estimate: float
    top: float
    bottom: float
    method: str
    seconds: float
    negative_eigenvalues: Optional[int] = None
    dense_seconds: float = 0.0

    @property
    def min_safe_scale(self) -> float:
        """LiSSA contracts only for scale > top eigenvalue (of every minibatch Hessian, strictly)."""
        return max(abs(self.top), abs(self.top_estimate))

    @property
    def min_damping(self) -> float:
        """H + lambda I is positive definite only for lambda > -bottom."""
        return max(0.0, -self.bottom)

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "min_safe_scale": self.min_safe_scale, "min_damping": self.min_damping}


def estimate_spectrum(operator: HessianOperator, *, seed: int = 0, exact: Optional[ExactSolver] = None) -> Spectrum:
    """Top eigenvalue by power iteration (what '<f>x' scales multiply) and the bottom one by Lanczos,
    both on a 512-example subset; both exactly over all data when ``exact`` is given (its
    eigendecomposition is then cached in ``exact`` for the reference solve; ``dense_seconds``)."""
    started = time.perf_counter()
    top_estimate = float(top_eigenvalue(operator, seed=seed))
    if exact is not None:
        dense_started = time.perf_counter()
        evals, _ = exact.eigendecomposition(operator)
        # Round-off leaves many eigenvalues at about -1e-9 x top: count only clearly negative ones.
        negative = int((evals < -1e-6 * float(evals.abs().max())).sum())
        return Spectrum(top_estimate=top_estimate, top=float(evals.max()), bottom=float(evals.min()), method="exact",
                        seconds=time.perf_counter() - started, negative_eigenvalues=negative,
                        dense_seconds=time.perf_counter() - dense_started)
    bottom = smallest_eigenvalue(operator, seed=seed)
    if not math.isfinite(bottom):  # Lanczos did not converge: assume no negative curvature (the reference retries)
        log.warning("the smallest Hessian eigenvalue could not be estimated (Lanczos did not converge); assuming >= 0")
        bottom = 0.0
    return Spectrum(top_estimate=top_estimate, top=top_estimate, bottom=bottom, method="lanczos",
                    seconds=time.perf_counter() - started)


def auto_reference_damping(spectrum: Spectrum, damping: float, margin: float = 1.5) -> float:
    """lambda_ref: the configured damping, raised to ``margin`` x (-bottom eigenvalue) when H is
    indefinite, so that the reference solves a positive-definite system."""
    return max(float(damping), margin * spectrum.min_damping)


# ----------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """The reference s_test (T, P) at ``damping`` and its scores on the candidates (T, k)."""

    method: str
    damping: float
    vectors: torch.Tensor
    scores: torch.Tensor
    seconds: float
    details: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        return {"method": self.method, "damping": self.damping, "seconds": self.seconds, **self.details}


def reference_method(requested: str, dim: int, exact_limit: int = ExactSolver.max_params) -> str:
    """'auto' -> exact when the dense Hessian fits, else cg."""
    if requested not in ("auto", "exact", "cg", "lissa"):
        raise ConfigError(f"Unknown reference '{requested}'. Fix: use calibrate.reference=auto, exact, cg or lissa.")
    if requested == "auto":
        return "exact" if dim <= exact_limit else "cg"
    return requested


def reference_solver(method: str, *, exact: Optional[ExactSolver], tol: float, max_iter: int, scale: float,
                     depth: int, batch_size: int, chains: int, seed: int) -> Solver:
    if method == "exact":
        return exact if exact is not None else ExactSolver()
    if method == "cg":
        return CGSolver(tol=tol, max_iter=max_iter)
    # A long many-chain LiSSA on seeds no grid setting uses.
    return LissaSolver(scale=scale, depth=depth, batch_size=batch_size, chains=chains, seed=seed + 10_000, tail_average=0.5)


def solve_reference(operator: HessianOperator, grads: torch.Tensor, damping: float, scorer: Callable[[torch.Tensor], torch.Tensor],
                    method: str, solver: Solver, *, raise_damping: int = 0) -> Reference:
    """Solve the reference system at ``damping``.

    A spectrum estimated on a subset can miss how negative H's bottom eigenvalue is; with
    ``raise_damping`` > 0 (an automatic reference damping), a solve that meets negative curvature or
    diverges is retried with twice the damping, at most that many times.
    """
    for attempt in range(raise_damping + 1):
        try:
            result = solver.solve(operator, grads, damping)
            break
        except SolverDivergenceError as error:
            if attempt == raise_damping:
                raise ConfigError(f"The {method} reference solve failed at damping {damping:g}: {error} "
                                  f"Fix: raise calibrate.reference_damping (H + lambda I must be positive definite).") from None
            log.warning("reference %s failed at lambda %.4g (%s); retrying at lambda %.4g", method, damping, error, 2 * damping)
            damping = 2 * damping if damping > 0 else 1e-3
    if method == "cg" and not result.details.get("converged", True):
        log.warning("reference CG stopped at the iteration cap with relative residual %.2e; raise calibrate.reference_max_iter", result.relative_change)
    vectors = result.vectors.detach()
    details = {k: v for k, v in result.details.items() if isinstance(v, (int, float, str, bool))}
    details.update(steps=result.steps, relative_change=result.relative_change)
    return Reference(method=method, damping=damping, vectors=vectors, scores=scorer(vectors).detach().cpu(),
                     seconds=result.seconds, details=details)


# ----------------------------------------------------------------------------- scoring


class CandidateScorer:
    """s_test (T, P) -> influence scores (T, k) on fixed candidates, -grad L(z_j) . s_test[t].

    The candidates' gradients are computed once and kept when they fit in ``max_cache_bytes``
    (every setting is then scored by one matrix product); otherwise each call runs
    :func:`fastif.engine.scoring.score_candidates`.
    """

    def __init__(self, model, loss_fn, train, selection, candidates: Optional[torch.Tensor], *,
                 batch_size: int = 64, max_cache_bytes: int = 1 << 30):
        from fastif.engine.data import as_dataset

        self.model, self.loss_fn, self.selection = model, loss_fn, selection
        self.train = as_dataset(train)
        self.candidates = None if candidates is None else torch.as_tensor(candidates, dtype=torch.long)
        self.batch_size = batch_size
        rows = len(self.train) if self.candidates is None else int(torch.unique(self.candidates).numel())
        self._gradients: Optional[torch.Tensor] = None
        self._inverse: Optional[torch.Tensor] = None
        if rows * selection.numel * 4 <= max_cache_bytes:
            self._cache_gradients()

    def _cache_gradients(self) -> None:
        from fastif.engine.data import iterate_batches, model_device
        from fastif.engine.gradients import per_example_gradients

        if self.candidates is None:
            order, inverse = None, None
        else:
            order, inverse = torch.unique(self.candidates, return_inverse=True)
        chunks = []
        try:
            for _, batch in iterate_batches(self.train, self.batch_size, model_device(self.model), None if order is None else order.tolist()):
                chunks.append(per_example_gradients(self.model, self.loss_fn, batch, self.selection).detach())
        except RuntimeError as error:  # neither hooks nor vmap apply: score by forward-mode products
            log.info("per-example gradients unavailable (%s); scoring each setting with score_candidates", error)
            return
        self._gradients = torch.cat(chunks)
        self._inverse = inverse

    def __call__(self, s_test: torch.Tensor) -> torch.Tensor:
        if self._gradients is None:
            from fastif.engine.scoring import score_candidates

            return score_candidates(self.model, self.loss_fn, self.train, s_test, self.selection,
                                    candidates=self.candidates, batch_size=self.batch_size).detach().cpu()
        s = s_test.to(self._gradients.device, self._gradients.dtype)
        table = -(s @ self._gradients.T)  # (T, rows)
        if self._inverse is None:
            return table.cpu()
        return torch.gather(table, 1, self._inverse.to(table.device)).cpu()


# ----------------------------------------------------------------------------- metrics


def _ranks(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank(method="average").to_numpy()


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(a)), _ranks(np.asarray(b)))


def top_overlap(approx: np.ndarray, reference: np.ndarray, m: int) -> float:
    """Mean of the overlaps of the m most helpful (most negative) and the m most harmful
    (most positive) candidates, as fractions of m."""
    m = max(1, min(m, len(reference)))
    helpful = len(set(np.argsort(approx)[:m]) & set(np.argsort(reference)[:m])) / m
    harmful = len(set(np.argsort(-approx)[:m]) & set(np.argsort(-reference)[:m])) / m
    return 0.5 * (helpful + harmful)


def compare(vectors: torch.Tensor, scores: torch.Tensor, reference: Reference, top_m: int) -> List[Dict[str, float]]:
    """Per test point: rel_error, cosine of s_test, pearson / spearman / top_overlap of scores."""
    v = vectors.detach().double().cpu()
    r = reference.vectors.double().cpu()
    rows = []
    for t in range(r.shape[0]):
        diff = float((v[t] - r[t]).norm())
        rn, vn = float(r[t].norm()), float(v[t].norm())
        a, b = scores[t].double().numpy(), reference.scores[t].double().numpy()
        rows.append({
            "rel_error": diff / rn if rn > 0 else float("nan"),
            "cosine": float((v[t] * r[t]).sum()) / (rn * vn) if rn > 0 and vn > 0 else float("nan"),
            "pearson": pearson(a, b),
            "spearman": spearman(a, b),
            "top_overlap": top_overlap(a, b, top_m),
        })
    return rows


# ----------------------------------------------------------------------------- the grid run


def evaluate_settings(settings: Sequence[HvpSetting], operator: HessianOperator, grads: torch.Tensor, reference: Reference,
                      scorer: Callable[[torch.Tensor], torch.Tensor], *, test_ids: Sequence[str], top_m: int = 10) -> pd.DataFrame:
    """One row per (setting, test point): seconds, status, metrics against ``reference``."""
    rows = []
    t = grads.shape[0]
    for number, setting in enumerate(settings, 1):
        started = time.perf_counter()
        base = {**setting.columns(), "reference_damping": reference.damping}
        try:
            result: SolveResult = setting.make_solver().solve(operator, grads, setting.damping)
        except (SolverDivergenceError, ConfigError) as error:
            seconds = time.perf_counter() - started
            status = STATUS_DIVERGED if isinstance(error, SolverDivergenceError) else STATUS_INVALID
            log.info("[%d/%d] %s: %s after %.2f s", number, len(settings), setting.name, status, seconds)
            for j in range(t):
                rows.append({**base, "test_index": j, "test_id": str(test_ids[j]), "status": status,
                             "seconds": seconds, "seconds_per_test": seconds / t, "steps": 0,
                             **{m: float("nan") for m in METRIC_COLUMNS}, "message": str(error)})
            continue
        seconds = result.seconds
        metrics = compare(result.vectors, scorer(result.vectors), reference, top_m)
        finite = bool(torch.isfinite(result.vectors).all())
        status = STATUS_OK if finite else STATUS_DIVERGED
        log.info("[%d/%d] %s: %.2f s, median spearman %.4f, median rel. error %.3g", number, len(settings), setting.name,
                 seconds, float(np.nanmedian([m["spearman"] for m in metrics])), float(np.nanmedian([m["rel_error"] for m in metrics])))
        for j in range(t):
            rows.append({**base, "test_index": j, "test_id": str(test_ids[j]), "status": status, "seconds": seconds,
                         "seconds_per_test": seconds / t, "steps": result.steps, **metrics[j],
                         "message": "" if finite else "non-finite s_test"})
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, *, quality_metric: str = "spearman", quality_target: float = 0.99,
              statistic: str = "median") -> pd.DataFrame:
    """One row per setting: medians (and minima) over test points, status, meets_target, pareto.

    The setting's quality is ``statistic`` (median or min over test points) of ``quality_metric``.
    """
    check_quality(quality_metric, statistic)
    keys = [c for c in SETTING_COLUMNS if c in table.columns]
    extra = [c for c in ("job", "reference_damping") if c in table.columns]
    rows = []
    for _, group in table.groupby(keys + extra, sort=False, dropna=False):
        first = group.iloc[0]
        diverged = int((group["status"] != STATUS_OK).sum())
        row = {c: first[c] for c in keys + extra}
        status = STATUS_OK if diverged == 0 else (STATUS_INVALID if (group["status"] == STATUS_INVALID).all() else STATUS_DIVERGED)
        row.update(status=status, n_test=len(group), n_diverged=diverged,
                   seconds=float(group["seconds"].iloc[0]), seconds_per_test=float(group["seconds_per_test"].iloc[0]))
        ok = group[group["status"] == STATUS_OK]
        for metric in METRIC_COLUMNS:
            row[metric] = float(ok[metric].median()) if len(ok) and diverged == 0 else float("nan")
        for metric in ("spearman", "pearson", "top_overlap", "cosine"):
            row[f"min_{metric}"] = float(ok[metric].min()) if len(ok) and diverged == 0 else float("nan")
        row["max_rel_error"] = float(ok["rel_error"].max()) if len(ok) and diverged == 0 else float("nan")
        rows.append(row)
    summary = pd.DataFrame(rows)
    quality = quality_column(quality_metric, statistic)
    summary["quality"] = summary[quality]
    summary["meets_target"] = (summary["status"] == STATUS_OK) & (summary["quality"] >= quality_target)
    summary["pareto"] = pareto_front(summary)
    summary["recommended"] = False
    choice = recommend(summary)
    if choice is not None:
        summary.loc[choice, "recommended"] = True
    return summary


def check_quality(metric: str, statistic: str) -> None:
    if metric not in QUALITY_METRICS:
        raise ConfigError(f"Unknown quality metric '{metric}'. Fix: use calibrate.quality_metric={' or '.join(QUALITY_METRICS)}.")
    if statistic not in STATISTICS:
        raise ConfigError(f"Unknown quality statistic '{statistic}'. Fix: use calibrate.quality_statistic=median or min.")


def quality_column(metric: str, statistic: str) -> str:
    return metric if statistic == "median" else f"min_{metric}"


def pareto_front(summary: pd.DataFrame, time_column: str = "seconds", error_column: str = "rel_error") -> pd.Series:
    """True for settings that no other (non-diverged) setting beats on both time and error."""
    ok = (summary["status"] == STATUS_OK) & summary[error_column].notna()
    times = summary[time_column].to_numpy(dtype=float)
    errors = summary[error_column].to_numpy(dtype=float)
    front = np.zeros(len(summary), dtype=bool)
    ok_positions = np.flatnonzero(ok.to_numpy())
    for i in ok_positions:
        dominated = any(
            times[j] <= times[i] and errors[j] <= errors[i] and (times[j] < times[i] or errors[j] < errors[i])
            for j in ok_positions if j != i
        )
        front[i] = not dominated
    return pd.Series(front, index=summary.index)


def recommend(summary: pd.DataFrame) -> Optional[Any]:
    """Index label of the fastest setting that meets the target (None when none does)."""
    meeting = summary[summary["meets_target"]]
    if meeting.empty:
        return None
    return meeting.sort_values(["seconds", "rel_error"]).index[0]


# ----------------------------------------------------------------------------- outputs


def recommended_document(summary: pd.DataFrame, *, provenance: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The recommended.yaml content (``hvp`` section + provenance), None when no setting qualifies."""
    chosen = summary[summary["recommended"]]
    if chosen.empty:
        return None
    row = chosen.iloc[0]
    setting = setting_from_row(row)
    metrics = {k: _plain(row[k]) for k in ("seconds", "seconds_per_test", "rel_error", "max_rel_error", "cosine", "pearson",
                                           "spearman", "min_spearman", "top_overlap", "min_top_overlap") if k in row}
    return {"hvp": setting.hvp_section(), "provenance": {**provenance, "setting": setting.name, "d": _plain(setting.d), "metrics": metrics}}


def write_recommended(path: Path, document: Dict[str, Any]) -> Path:
    from omegaconf import OmegaConf

    header = ("# Written by `fastif hvp-calibrate`: the fastest measured inverse-HVP setting meeting the quality target.\n"
              "# Use it with `hvp=calibrated` (the latest calibration) or `hvp.from_calibration=<this file>`.\n")
    return atomic_write_text(path, header + OmegaConf.to_yaml(OmegaConf.create(document)))


def read_recommended(path: Path) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        document = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # malformed YAML of any kind
        raise InputError(f"Cannot read the calibration file {path} ({error}). Fix: rerun `fastif hvp-calibrate` or point "
                         f"hvp.from_calibration to a valid recommended.yaml.") from None
    if not isinstance(document, dict) or not isinstance(document.get("hvp"), dict):
        raise InputError(f"{path} has no 'hvp' section. Fix: point hvp.from_calibration to a recommended.yaml written by "
                         f"`fastif hvp-calibrate`.")
    return document


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def plot_tradeoff(summary: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Time vs error, one curve per LiSSA batch size (colour) and chain count (line style), depth
    growing along each curve; Pareto front and the
    recommended setting marked. Two panels: relative error of s_test, and 1 - Spearman."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or GUI state

    ok = summary[summary["status"] == STATUS_OK].copy()
    fig = Figure(figsize=(11.0, 4.3), dpi=100)
    axes = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    chains = sorted(int(c) for c in ok["chains"].unique()) if len(ok) else []
    batch_sizes = sorted(int(b) for b in ok["batch_size"].unique()) if len(ok) else []
    palette = [f"C{i}" for i in range(10)]
    for ax, column, label in ((axes[0], "rel_error", "relative error of s_test (median)"),
                              (axes[1], "spearman", "1 - Spearman of scores (median)")):
        values = ok[column] if column == "rel_error" else 1.0 - ok[column]
        ok = ok.assign(_y=values.clip(lower=1e-6))
        # One curve per (batch size, chains), depth increasing along it.
        for (solver, batch_size, chain), part in ok.groupby(["solver", "batch_size", "chains"], sort=True):
            part = part.sort_values(["depth", "seconds"])
            style = chains.index(int(chain)) % len(styles)
            color = palette[batch_sizes.index(int(batch_size)) % len(palette)] if solver == "lissa" else "gray"
            ax.plot(part["seconds"], part["_y"], linestyle=styles[style], marker=markers[style], color=color, alpha=0.8)
        front = ok[ok["pareto"]].sort_values("seconds")
        ax.plot(front["seconds"], front["_y"], color="black", linestyle="--", linewidth=1)
        best = ok[ok["recommended"]]
        if len(best):
            ax.scatter(best["seconds"], best["_y"], marker="*", s=250, color="gold", edgecolor="black", zorder=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("solve seconds (all test points)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    for i, batch_size in enumerate(batch_sizes):
        axes[1].plot([], [], color=palette[i % len(palette)], label=f"batch {batch_size}")
    for i, chain in enumerate(chains):
        axes[1].plot([], [], color="gray", linestyle=styles[i % len(styles)], marker=markers[i % len(markers)], label=f"{chain} chain(s)")
    axes[1].plot([], [], color="black", linestyle="--", linewidth=1, label="Pareto front (time vs s_test error)")
    axes[1].scatter([], [], marker="*", s=150, color="gold", edgecolor="black", label="recommended")
    axes[1].legend(fontsize=8, title="depth grows along each curve", title_fontsize=8)
    n_div = int((summary["status"] != STATUS_OK).sum())
    fig.suptitle((title + "  " if title else "") + (f"({n_div} diverged or invalid setting(s) not shown)" if n_div else ""))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def summary_markdown(summary: pd.DataFrame) -> str:
    """The summary as a markdown table (for logs and the README)."""
    columns = [("solver", "solver"), ("damping", "lambda"), ("scale", "scale"), ("d", "d"), ("depth", "depth"),
               ("batch_size", "batch"), ("chains", "chains"), ("status", "status"), ("seconds", "seconds"),
               ("rel_error", "rel. error"), ("cosine", "cosine"), ("spearman", "Spearman"), ("min_spearman", "min Spearman"),
               ("top_overlap", "top-m overlap"), ("pareto", "Pareto"), ("recommended", "recommended")]
    if "job" in summary.columns:
        columns.insert(0, ("job", "job"))
    columns = [(c, h) for c, h in columns if c in summary.columns]
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in summary.iterrows():
        cells = []
        for c, _ in columns:
            value = row[c]
            if isinstance(value, (bool, np.bool_)):
                cells.append("yes" if value else "")
            elif isinstance(value, (float, np.floating)):
                cells.append("" if not math.isfinite(float(value)) else f"{float(value):.4g}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- test points


def sample_test_points(labels: np.ndarray, predictions: np.ndarray, n: int, *, seed: int = 0,
                       misclassified_fraction: float = 0.5) -> List[int]:
    """Positions of n test points: ``misclassified_fraction`` of them misclassified, the rest
    correct (topped up from the other kind when one runs short), in ascending order."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if len(labels) == 0:
        raise InputError("The calibration split is empty. Fix: choose another split with calibrate.split=eval or challenge.")
    rng = np.random.default_rng(seed)
    wrong = rng.permutation(np.flatnonzero(labels != predictions)).tolist()
    right = rng.permutation(np.flatnonzero(labels == predictions)).tolist()
    n = min(n, len(labels))
    n_wrong = min(len(wrong), int(round(n * misclassified_fraction)))
    n_right = min(len(right), n - n_wrong)
    n_wrong = min(len(wrong), n - n_right)
    return sorted(int(i) for i in wrong[:n_wrong] + right[:n_right])


# ----------------------------------------------------------------------------- aggregation


def job_folders(multirun_dir: Path) -> List[Path]:
    """The job folders of a Hydra multirun folder (numbered subfolders), in job order."""
    root = Path(multirun_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"Multirun folder {root} does not exist. Fix: pass aggregate=<outputs>/hvp-calibrate/<experiment>/multirun/<timestamp>.")
    jobs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not jobs:
        raise InputError(f"{root} holds no job folders (0/, 1/, ...). Fix: pass the folder a `fastif hvp-calibrate -m ...` sweep wrote.")
    return jobs


def aggregate_jobs(multirun_dir: Path, *, quality_metric: str = "spearman", quality_target: float = 0.99,
                   statistic: str = "median") -> Tuple[pd.DataFrame, pd.DataFrame, List[str]]:
    """(per-test-point table, summary with pareto/meets_target/recommended recomputed across
    jobs, skipped-job messages) from the complete jobs of a multirun folder."""
    from fastif.runs import read_manifest

    tables, skipped = [], []
    for job in job_folders(multirun_dir):
        try:
            manifest = read_manifest(job)
        except RunError:
            skipped.append(f"{job.name}: no manifest")
            continue
        if manifest.get("status") != "complete" or not (job / CALIBRATION_FILE).is_file():
            skipped.append(f"{job.name}: status {manifest.get('status')}")
            continue
        table = pd.read_parquet(job / CALIBRATION_FILE)
        table.insert(0, "job", int(job.name))
        table["overrides"] = " ".join(manifest.get("overrides") or [])
        tables.append(table)
    if not tables:
        raise RunError(f"No complete calibration job in {multirun_dir} ({'; '.join(skipped)}). Fix: rerun the sweep.")
    table = pd.concat(tables, ignore_index=True)
    summary = summarize(table, quality_metric=quality_metric, quality_target=quality_target, statistic=statistic)
    overrides = table.groupby("job")["overrides"].first()
    summary.insert(1, "overrides", summary["job"].map(overrides))
    return table, summary, skipped


def setting_from_row(row: pd.Series) -> HvpSetting:
    """The HvpSetting of a calibration or summary row (every setting field is a column)."""
    return HvpSetting(
        solver=str(row["solver"]), damping=float(row["damping"]), scale=float(row["scale"]), depth=int(row["depth"]),
        batch_size=int(row["batch_size"]), chains=int(row["chains"]), tol=float(row["tol"]), seed=int(row["seed"]),
        tail_average=float(row["tail_average"]), max_iter=int(row["max_iter"]),
        damping_spec=str(row["damping_spec"]), scale_spec=str(row["scale_spec"]))


# ----------------------------------------------------------------------------- hvp=calibrated


def locate_calibration(spec: str, outputs: Path, experiment: str) -> Path:
    """The recommended.yaml that ``hvp.from_calibration`` names ('latest', a run folder, or a file)."""
    if spec == "latest":
        run_dir = latest_complete(outputs, COMMAND, experiment)
        if run_dir is None:
            raise RunError(f"hvp=calibrated needs a complete `fastif hvp-calibrate` run of experiment '{experiment}' under "
                           f"{Path(outputs).expanduser().absolute()}, and there is none. Fix: run `fastif hvp-calibrate "
                           f"experiment={experiment}` first, or pick another hvp option (hvp=lissa).")
        path = run_dir / RECOMMENDED_FILE
        if not path.is_file():
            raise RunError(f"The latest calibration run {run_dir} recommended no setting (none met its quality target, or it was "
                           f"one job of a sweep). Fix: rerun `fastif hvp-calibrate` with a larger grid (deeper calibrate.grid.depth, "
                           f"more chains) or a lower calibrate.quality_target, aggregate the sweep with `fastif hvp-calibrate "
                           f"aggregate=<multirun folder>`, or set hvp.from_calibration=<recommended.yaml>.")
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / RECOMMENDED_FILE
    if not path.is_file():
        raise InputError(f"hvp.from_calibration={spec}: {path} does not exist. Fix: use 'latest', a calibration run folder "
                         f"holding {RECOMMENDED_FILE}, or the path of such a file.")
    return path.absolute()


def resolve_hvp(settings_hvp: HvpConfig, outputs: str | Path, experiment: str, run=None) -> Tuple[HvpConfig, Optional[Path]]:
    """The hvp section to use and the recommended.yaml it came from (None: ``settings_hvp`` as is).

    With ``hvp.from_calibration`` set, every field comes from the calibration (the fields next to it
    are ignored, with a warning when they differ from the defaults). With ``run``, the file is
    recorded as an input (role ``hvp_calibration``) and the manifest gets ``hvp_source`` (the file)
    and ``hvp_calibration_run`` (its run folder).
    """
    if settings_hvp.from_calibration is None:
        return settings_hvp, None
    path = locate_calibration(settings_hvp.from_calibration, Path(outputs), experiment)
    document = read_recommended(path)
    try:
        hvp = HvpConfig(**{**document["hvp"], "from_calibration": None})
    except (TypeError, ConfigError) as error:
        raise InputError(f"The hvp section of {path} is invalid ({error}). Fix: rerun `fastif hvp-calibrate`.") from None
    defaults = HvpConfig()
    ignored = [f"{name}={getattr(settings_hvp, name)}" for name in HvpConfig.__dataclass_fields__
               if name != "from_calibration" and getattr(settings_hvp, name) != getattr(defaults, name)]
    if ignored:
        log.warning("hvp.from_calibration=%s replaces the whole hvp section; ignored: %s", settings_hvp.from_calibration, ", ".join(ignored))
    provenance = document.get("provenance") or {}
    calibration_run = provenance.get("calibration_run") or str(path.parent)
    log.info("inverse HVP from the calibration %s: %s", path, hvp)
    if run is not None:
        run.record_input(path, "hvp_calibration")
        run.annotate(hvp_source=str(path), hvp_calibration_run=calibration_run)
    return hvp, path
