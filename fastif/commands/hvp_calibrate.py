"""`fastif hvp-calibrate`: measure speed vs quality of inverse-HVP settings and recommend one.

Steps (the logic lives in :mod:`fastif.calibration`): open the experiment's workbench; sample
``calibrate.n_test`` test points of ``calibrate.split`` (half misclassified by default) and their
kNN candidates among the training points; estimate the Hessian spectrum (top and bottom
eigenvalues: the minimum safe LiSSA scale and the minimum damping); solve the reference s_test
(exact / CG / long LiSSA) at the reference damping; solve and score every setting of the grid
(or, under a Hydra sweep ``-m``, the single setting of the ``hvp`` section); write

- ``calibration.parquet``: one row per setting and test point (seconds, status, rel_error,
  cosine, pearson, spearman, top_overlap),
- ``summary.parquet`` / ``summary.csv`` / ``summary.md``: one row per setting (medians), with
  the Pareto front of time vs error and the recommended setting flagged,
- ``spectrum.json``: spectrum, reference, test points, candidates,
- ``tradeoff.png``: time vs error, one curve per batch size,
- ``recommended.yaml``: the fastest setting meeting ``calibrate.quality_target`` as an ``hvp``
  section (the resolved scale included) plus provenance; ``hvp=calibrated`` uses it.

``aggregate=<multirun folder>`` instead gathers the jobs of a sweep into one table (and a
recommendation across them) in a new run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from fastif.commands import ExperimentSettings
from fastif.config import _check
from fastif.runs import Run

MODES = ("auto", "grid", "hvp")
CANDIDATES = ("knn", "all")
REFERENCES = ("auto", "exact", "cg", "lissa")


@dataclass
class GridConfig:
    solver: List[str] = field(default_factory=lambda: ["lissa"], metadata={"help": "Solvers of the grid: lissa, cg, exact (cg and exact vary only damping; tol/max_iter come from hvp)."})
    damping: List[Any] = field(default_factory=lambda: ["1x"], metadata={"help": "Damping lambda values: numbers, or '<f>x' multiples of the reference damping (e.g. [1x, 3x])."})
    scale: List[Any] = field(default_factory=lambda: ["2x", "0.25x"], metadata={"help": "LiSSA scales: numbers, 'auto' (= 2x), or '<f>x' multiples of the top Hessian eigenvalue; below 1x diverges (0.25x shows it)."})
    depth: List[int] = field(default_factory=lambda: [100, 300, 1000], metadata={"help": "LiSSA recursion depths."})
    batch_size: List[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "LiSSA minibatch sizes."})
    chains: List[int] = field(default_factory=lambda: [1, 4], metadata={"help": "LiSSA chain counts (independent repeats averaged)."})

    def __post_init__(self) -> None:
        for key in ("solver", "damping", "scale", "depth", "batch_size", "chains"):
            _check(len(getattr(self, key)) > 0, f"calibrate.grid.{key}", "empty list", f"give at least one value, e.g. calibrate.grid.{key}=[...]")
        for solver in self.solver:
            _check(solver in ("exact", "cg", "lissa"), "calibrate.grid.solver", f"got '{solver}'", "use lissa, cg or exact")
        for key in ("depth", "batch_size", "chains"):
            for value in getattr(self, key):
                _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"calibrate.grid.{key}",
                       f"got {value!r}", "use positive integers")


@dataclass
class CalibrateConfig:
    mode: str = field(default="auto", metadata={"help": "grid (every combination of calibrate.grid), hvp (only the hvp section's setting), auto (hvp inside a Hydra sweep -m, else grid)."})
    split: str = field(default="challenge", metadata={"help": "Split the test points are sampled from: challenge or eval."})
    n_test: int = field(default=8, metadata={"help": "Number of sampled test points."})
    misclassified_fraction: float = field(default=0.5, metadata={"help": "Fraction of the test points the model gets wrong (the rest it gets right)."})
    candidates: str = field(default="knn", metadata={"help": "Training points scored per test point: knn (its knn.k nearest in feature space, as influence does) or all."})
    batch_size: int = field(default=128, metadata={"help": "Batch size of the full-data passes (test gradients, exact/CG Hessian products, candidate gradients)."})
    grid: GridConfig = field(default_factory=GridConfig, metadata={"help": "The settings compared."})
    reference: str = field(default="auto", metadata={"help": "Reference solver: auto (exact when the selection has <= 20000 parameters, else cg), exact, cg or lissa (long, many chains)."})
    reference_damping: Optional[float] = field(default=None, metadata={"help": "lambda of the reference system; null = hvp.damping, raised to 1.5 x (-bottom eigenvalue) when H is indefinite (and doubled, up to 3 times, while the reference solve meets negative curvature)."})
    reference_tol: float = field(default=1e-6, metadata={"help": "Relative residual the CG reference stops at."})
    reference_max_iter: int = field(default=1000, metadata={"help": "Iteration cap of the CG reference."})
    reference_depth: int = field(default=5000, metadata={"help": "Depth of each chain of a LiSSA reference."})
    reference_chains: int = field(default=8, metadata={"help": "Chains of a LiSSA reference."})
    quality_metric: str = field(default="spearman", metadata={"help": "Quality measure of a setting against the reference: spearman, pearson (of influence scores), top_overlap, cosine (of s_test)."})
    quality_statistic: str = field(default="median", metadata={"help": "How test points combine into a setting's quality: median or min."})
    quality_target: float = field(default=0.99, metadata={"help": "The recommended setting is the fastest whose quality reaches this."})
    top_m: int = field(default=10, metadata={"help": "top_overlap compares the m most helpful and the m most harmful candidates."})
    seed: int = field(default=0, metadata={"help": "Seed of the test-point sample."})

    def __post_init__(self) -> None:
        _check(self.mode in MODES, "calibrate.mode", f"got '{self.mode}'", "use auto, grid or hvp")
        _check(self.split in ("challenge", "eval"), "calibrate.split", f"got '{self.split}'", "use challenge or eval")
        _check(self.n_test >= 1, "calibrate.n_test", f"got {self.n_test}, need >= 1", "e.g. calibrate.n_test=8")
        _check(0.0 <= self.misclassified_fraction <= 1.0, "calibrate.misclassified_fraction", f"got {self.misclassified_fraction}", "use a value in [0, 1]")
        _check(self.candidates in CANDIDATES, "calibrate.candidates", f"got '{self.candidates}'", "use knn or all")
        _check(self.batch_size >= 1, "calibrate.batch_size", f"got {self.batch_size}", "use a positive integer, e.g. 128")
        _check(self.reference in REFERENCES, "calibrate.reference", f"got '{self.reference}'", "use auto, exact, cg or lissa")
        _check(self.reference_damping is None or self.reference_damping >= 0, "calibrate.reference_damping",
               f"got {self.reference_damping}", "use a non-negative number or null (automatic)")
        _check(self.reference_tol > 0, "calibrate.reference_tol", f"got {self.reference_tol}", "e.g. calibrate.reference_tol=1e-6")
        for key in ("reference_max_iter", "reference_depth", "reference_chains", "top_m"):
            _check(getattr(self, key) >= 1, f"calibrate.{key}", f"got {getattr(self, key)}, need >= 1", "use a positive integer")
        _check(self.quality_metric in ("spearman", "pearson", "top_overlap", "cosine"), "calibrate.quality_metric",
               f"got '{self.quality_metric}'", "use spearman, pearson, top_overlap or cosine")
        _check(self.quality_statistic in ("median", "min"), "calibrate.quality_statistic", f"got '{self.quality_statistic}'", "use median or min")
        _check(-1.0 <= self.quality_target <= 1.0, "calibrate.quality_target", f"got {self.quality_target}", "use a value in [-1, 1], e.g. 0.99")
        _check(self.seed >= 0, "calibrate.seed", f"got {self.seed}", "use a non-negative integer")


@dataclass
class HvpCalibrateSettings(ExperimentSettings):
    """Settings of `fastif hvp-calibrate`: the experiment's groups plus the calibration section."""

    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig, metadata={"help": "What to measure and how to choose."})
    aggregate: Optional[str] = field(default=None, metadata={"help": "A multirun folder of `fastif hvp-calibrate -m ...`: gather its jobs into one table and one recommendation (nothing is measured)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.aggregate is None or bool(str(self.aggregate).strip()), "aggregate", "empty string", "pass a multirun folder or null")


SCHEMA = HvpCalibrateSettings


def execute(settings: HvpCalibrateSettings, run: Run) -> None:
    if settings.aggregate is not None:
        aggregate(settings, run)
        return
    calibrate(settings, run)


def calibrate(settings: HvpCalibrateSettings, run: Run) -> None:
    import dataclasses

    import torch
    from torch.utils.data import Subset

    from fastif import calibration as C
    from fastif.engine.hessian import HessianOperator
    from fastif.engine.scoring import query_gradients
    from fastif.errors import InputError
    from fastif.training import predict
    from fastif.workbench import loss_fn, open_workbench

    cal = settings.calibrate
    torch.manual_seed(settings.seed)
    # hvp=calibrated here re-measures an earlier recommendation (with calibrate.mode=hvp).
    hvp, _ = C.resolve_hvp(settings.hvp, settings.paths.outputs, settings.experiment_name, run)
    settings = dataclasses.replace(settings, hvp=hvp)
    bench = open_workbench(settings, run, splits=("train", cal.split))
    if cal.split not in bench.data:
        raise InputError(f"The experiment has no '{cal.split}' split to sample test points from. Fix: calibrate.split=eval.")
    frame, data = bench.frames[cal.split], bench.data[cal.split]

    probs, _ = predict(bench.model, data, cal.batch_size, bench.device)
    predictions = probs.argmax(1)
    labels = frame["label"].to_numpy()
    positions = C.sample_test_points(labels, predictions, cal.n_test, seed=cal.seed, misclassified_fraction=cal.misclassified_fraction)
    test = Subset(data, positions)
    test_ids = [str(frame["id"].iloc[p]) for p in positions]
    candidates = _candidates(settings, bench, data, positions)
    k = len(bench.data["train"]) if candidates is None else int(candidates.shape[1])
    run.log.info("%d test points of %s (%d misclassified), %d candidates each (%s)", len(positions), cal.split,
                 int((labels[positions] != predictions[positions]).sum()), k, cal.candidates)

    operator = HessianOperator(bench.model, loss_fn, bench.data["train"], bench.selection, batch_size=cal.batch_size)
    grads = query_gradients(bench.model, loss_fn, test, bench.selection, batch_size=cal.batch_size).detach()
    scorer = C.CandidateScorer(bench.model, loss_fn, bench.data["train"], bench.selection, candidates, batch_size=cal.batch_size)
    key = _reference_key(settings, bench, positions)
    if key in _REFERENCES:  # an earlier job of this sweep, same model, data and reference settings
        spectrum, reference = _REFERENCES[key]
        run.log.info("reusing the spectrum and %s reference of an earlier job of this process (same model, data and settings)", reference.method)
    else:
        spectrum, reference = _spectrum_and_reference(settings, operator, grads, scorer, run)
        _REFERENCES.clear()  # keep one: a dense Hessian's reference can be large
        _REFERENCES[key] = (spectrum, reference)
    if _sweep_job(cal.mode):
        grid = [C.setting_from_hvp(settings.hvp, spectrum.top_estimate)]
    else:
        grid = C.expand_grid(_grid(cal.grid), reference_damping=reference.damping, top_eigenvalue=spectrum.top_estimate, hvp=settings.hvp)
    method = reference.method
    run.log.info("reference: %s at lambda %.4g (%.1f s); %d setting(s) to measure", method, reference.damping, reference.seconds, len(grid))

    table = C.evaluate_settings(grid, operator, grads, reference, scorer, test_ids=test_ids, top_m=cal.top_m)
    table["split"] = cal.split
    table["test_position"] = table["test_index"].map(dict(enumerate(positions)))
    table["label"] = table["test_position"].map(lambda p: int(labels[p]))
    table["prediction"] = table["test_position"].map(lambda p: int(predictions[p]))
    table["misclassified"] = table["label"] != table["prediction"]
    summary = C.summarize(table, quality_metric=cal.quality_metric, quality_target=cal.quality_target, statistic=cal.quality_statistic)
    single = _sweep_job(cal.mode)
    if single:  # one measured setting is no choice: the sweep's aggregate recommends
        summary["recommended"] = False

    facts = {
        "spectrum": spectrum.to_dict(),
        "reference": reference.describe(),
        "parameters": bench.selection.numel,
        "model_source": bench.model_source,
        "test_points": {"split": cal.split, "positions": positions, "ids": test_ids,
                        "misclassified": [bool(labels[p] != predictions[p]) for p in positions]},
        "candidates": {"kind": cal.candidates, "k": k},
        "quality": {"metric": cal.quality_metric, "statistic": cal.quality_statistic, "target": cal.quality_target},
        "mode": "hvp" if single else "grid",
    }
    run.write_json(C.SPECTRUM_FILE, facts)
    _write_outputs(run, table, summary, facts, title=f"{settings.experiment_name}: {len(positions)} test points, "
                   f"reference {method} at lambda={reference.damping:.3g}")


def aggregate(settings: HvpCalibrateSettings, run: Run) -> None:
    from fastif import calibration as C

    cal = settings.calibrate
    folder = Path(settings.aggregate).expanduser().absolute()
    table, summary, skipped = C.aggregate_jobs(folder, quality_metric=cal.quality_metric, quality_target=cal.quality_target,
                                               statistic=cal.quality_statistic)
    for message in skipped:
        run.log.warning("skipped job %s", message)
    run.record_input(folder, "multirun")
    facts = {"aggregated": str(folder), "jobs": sorted(int(j) for j in table["job"].unique()), "skipped": skipped,
             "quality": {"metric": cal.quality_metric, "statistic": cal.quality_statistic, "target": cal.quality_target}}
    _write_outputs(run, table, summary, facts, title=f"sweep {folder.name}: {len(facts['jobs'])} jobs")


def _write_outputs(run: Run, table, summary, facts: dict, title: str) -> None:
    from fastif import calibration as C

    run.write_parquet(C.CALIBRATION_FILE, table)
    run.write_parquet(C.SUMMARY_FILE, summary)
    run.write_text(C.SUMMARY_CSV, summary.to_csv(index=False))
    markdown = C.summary_markdown(summary)
    run.write_text("summary.md", markdown + "\n")
    C.plot_tradeoff(summary, run.dir / C.TRADEOFF_PLOT, title=title)
    provenance = {"calibration_run": str(run.dir), "experiment": run.experiment, **{k: v for k, v in facts.items() if k != "test_points"}}
    document = C.recommended_document(summary, provenance=provenance)
    n_ok = int((summary["status"] == C.STATUS_OK).sum())
    run.log.info("%d setting(s): %d ok, %d diverged or invalid\n%s", len(summary), n_ok, len(summary) - n_ok, markdown)
    quality = facts["quality"]
    if facts.get("mode") == "hvp":
        run.log.info("measured the hvp section's setting only (meets the target: %s); for a recommendation, aggregate the sweep: "
                     "fastif hvp-calibrate aggregate=%s", bool(summary["meets_target"].iloc[0]), run.dir.parent)
        run.annotate(calibration={"settings": len(summary), "diverged": len(summary) - n_ok, "recommended": None})
        return
    if document is None:
        best = summary[summary["status"] == C.STATUS_OK].sort_values("quality", ascending=False).head(1)
        best_text = f"; the best reached {best['quality'].iloc[0]:.4f} ({best['setting'].iloc[0]})" if len(best) else ""
        run.log.warning("no setting reached %s %s >= %g%s: no recommended.yaml. Fix: add deeper settings or more chains to "
                        "calibrate.grid, or lower calibrate.quality_target.", quality["statistic"], quality["metric"], quality["target"], best_text)
        run.annotate(calibration={"settings": len(summary), "diverged": len(summary) - n_ok, "recommended": None})
        return
    C.write_recommended(run.dir / C.RECOMMENDED_FILE, document)
    chosen = document["provenance"]
    run.log.info("recommended: %s (%.2f s, %s %s %.4f) -> %s; use it with hvp=calibrated", chosen["setting"],
                 chosen["metrics"]["seconds"], quality["statistic"], quality["metric"],
                 float(summary.loc[summary["recommended"], "quality"].iloc[0]), run.dir / C.RECOMMENDED_FILE)
    run.annotate(calibration={"settings": len(summary), "diverged": len(summary) - n_ok, "recommended": chosen["setting"],
                              "recommended_hvp": document["hvp"]})


def _candidates(settings: HvpCalibrateSettings, bench, data, positions):
    """(T, k) training positions per test point: the kNN of each test point, or None for all."""
    import torch

    from fastif.knn import FeatureSpec, build_index, extract_features
    from torch.utils.data import Subset

    n = len(bench.data["train"])
    k = settings.knn.resolve_k(n)
    if settings.calibrate.candidates == "all" or k >= n:
        return None
    spec = FeatureSpec.from_config(settings.knn)
    train_features = extract_features(bench.model, bench.data["train"], spec, device=bench.device, batch_size=settings.knn.batch_size)
    test_features = extract_features(bench.model, Subset(data, positions), spec, device=bench.device, batch_size=settings.knn.batch_size)
    index = build_index(train_features, bench.data["train"].ids, settings.knn)
    found, _ = index.search(test_features, k)
    return torch.as_tensor(found, dtype=torch.long)


def _grid(grid: GridConfig):
    from fastif.calibration import Grid

    return Grid(solver=list(grid.solver), damping=list(grid.damping), scale=list(grid.scale), depth=list(grid.depth),
                batch_size=list(grid.batch_size), chains=list(grid.chains))


def _sweep_job(mode: str) -> bool:
    """mode hvp, or auto inside a Hydra multirun job: measure only the hvp section's setting."""
    if mode != "auto":
        return mode == "hvp"
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # Hydra absent or not running: a plain call from Python
        return False


# Hydra runs the jobs of a sweep one after another in this process: they share the reference.
_REFERENCES: dict = {}


def _reference_key(settings: HvpCalibrateSettings, bench, positions) -> str:
    import dataclasses
    import json

    cal = dataclasses.asdict(settings.calibrate)
    cal.pop("grid")
    cal.pop("mode")
    parts = {"model_source": bench.model_source, "model": dataclasses.asdict(settings.model), "data": dataclasses.asdict(settings.data),
             "knn": dataclasses.asdict(settings.knn), "calibrate": cal, "damping": settings.hvp.damping, "seed": settings.hvp.seed,
             "device": str(bench.device), "positions": list(positions), "batch_sizes": list(settings.calibrate.grid.batch_size)}
    return json.dumps(parts, sort_keys=True, default=str)


def _spectrum_and_reference(settings: HvpCalibrateSettings, operator, grads, scorer, run: Run):
    """Spectrum (exact or Lanczos) and the reference solve at the (automatic) reference damping."""
    from fastif import calibration as C
    from fastif.engine.solvers import ExactSolver

    cal = settings.calibrate
    method = C.reference_method(cal.reference, operator.dim)
    exact = ExactSolver() if method == "exact" else None
    spectrum = C.estimate_spectrum(operator, seed=settings.hvp.seed, exact=exact)
    damping = cal.reference_damping if cal.reference_damping is not None else C.auto_reference_damping(spectrum, settings.hvp.damping)
    run.log.info("spectrum (%s, %.1f s): top eigenvalue %.4g (power iteration %.4g), bottom %.4g -> LiSSA scale must exceed %.4g; "
                 "lambda must exceed %.4g for a positive-definite system", spectrum.method, spectrum.seconds, spectrum.top,
                 spectrum.top_estimate, spectrum.bottom, spectrum.min_safe_scale, spectrum.min_damping)
    if damping <= spectrum.min_damping:
        run.log.warning("reference damping %.4g <= -bottom eigenvalue %.4g: H + lambda I is indefinite, LiSSA will diverge or drift. "
                        "Fix: raise calibrate.reference_damping (or leave it null).", damping, spectrum.min_damping)
    solver = C.reference_solver(method, exact=exact, tol=cal.reference_tol, max_iter=cal.reference_max_iter,
                                scale=max(2.0 * spectrum.min_safe_scale, 2.0 * damping), depth=cal.reference_depth,
                                batch_size=max(cal.grid.batch_size), chains=cal.reference_chains, seed=settings.hvp.seed)
    reference = C.solve_reference(operator, grads, damping, scorer, method, solver, raise_damping=3 if cal.reference_damping is None else 0)
    if method == "exact":  # the dense Hessian was formed for the spectrum: it is the reference's cost
        reference.seconds += spectrum.dense_seconds
    return spectrum, reference
