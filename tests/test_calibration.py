"""hvp-calibrate: spectrum, grid, metrics, recommendation, hvp=calibrated, sweeps and aggregation.

Library tests use a tiny torch model (exact Hessian available); the CLI tests run the demo with
small overrides (300 training examples, influence over the classifier only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fastif import calibration as C
from fastif.config import HvpConfig
from fastif.engine.hessian import HessianOperator
from fastif.engine.params import select_parameters
from fastif.engine.scoring import query_gradients
from fastif.engine.solvers import ExactSolver
from fastif.errors import ConfigError, InputError, RunError
from fastif.runs import Run


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and idle OpenMP workers on a busy 2-core
    machine slow them down many times over."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def _problem(n=240, d=6, hidden=0, seed=0):
    """A trained small classifier (softmax regression, or an MLP when hidden > 0) and its data."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, 3, generator=gen)
    y = (x @ w + 0.5 * torch.randn(n, 3, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 3) if hidden == 0 else torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150 if hidden == 0 else 40):
        opt.zero_grad()
        _loss(model, (x, y)).mean().backward()
        opt.step()
    model.eval()
    return model, (x[:200], y[:200]), (x[200:], y[200:])


# ----------------------------------------------------------------------------- pieces


def test_metrics_on_known_values():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert C.spearman(a, a ** 3) == pytest.approx(1.0)
    assert C.spearman(a, -a) == pytest.approx(-1.0)
    assert C.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    ref = np.array([-5.0, -4.0, 0.0, 0.1, 3.0, 6.0])
    approx = np.array([-4.0, -5.0, 0.2, 0.0, 7.0, 2.0])
    assert C.top_overlap(approx, ref, 2) == pytest.approx(1.0)  # same two at each end
    approx2 = np.array([-4.0, 0.0, -5.0, 0.1, 7.0, 2.0])
    assert C.top_overlap(approx2, ref, 2) == pytest.approx(0.75)  # helpful {0,2} vs {0,1}: 1/2; harmful 2/2


def test_resolve_relative_and_grid_expansion():
    assert C.resolve_relative("2x", 5.0, "s", "f") == pytest.approx(10.0)
    assert C.resolve_relative("auto", 5.0, "s", "f") == pytest.approx(10.0)
    assert C.resolve_relative(0.3, 5.0, "s", "f") == pytest.approx(0.3)
    assert C.resolve_relative("0.25", 5.0, "s", "f") == pytest.approx(0.25)
    for bad in ("twice", "-1x", -2.0, True):
        with pytest.raises(ConfigError):
            C.resolve_relative(bad, 5.0, "calibrate.grid.scale", "use numbers")
    grid = C.Grid(solver=["lissa", "cg"], damping=["1x", 0.5], scale=["2x", "0.25x"], depth=[10, 20], batch_size=[4], chains=[1, 2])
    settings = C.expand_grid(grid, reference_damping=0.1, top_eigenvalue=8.0, hvp=HvpConfig(tol=0.0, seed=3))
    lissa = [s for s in settings if s.solver == "lissa"]
    assert len(lissa) == 2 * 2 * 2 * 2 and len(settings) == len(lissa) + 2
    assert {s.damping for s in settings} == {0.1, 0.5}
    assert {s.scale for s in lissa} == {16.0, 2.0}
    assert all(s.seed == 3 for s in settings)
    one = lissa[0]
    assert one.d == pytest.approx(one.damping / one.scale)
    section = one.hvp_section()
    assert HvpConfig(**section).scale == pytest.approx(one.scale)


def test_sample_test_points_mixes_wrong_and_right():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    predictions = np.array([0, 0, 0, 0, 0, 1, 1, 1])  # wrong at 1, 3, 6
    picked = C.sample_test_points(labels, predictions, 4, seed=0)
    assert len(picked) == 4 and sum(labels[p] != predictions[p] for p in picked) == 2
    picked = C.sample_test_points(labels, predictions, 8, seed=0, misclassified_fraction=1.0)
    assert sorted(picked) == list(range(8))  # topped up with correct points
    assert C.sample_test_points(labels, predictions, 3, seed=1, misclassified_fraction=1.0) == [1, 3, 6]


def test_spectrum_estimate_matches_the_exact_spectrum_of_an_indefinite_hessian():
    model, train, _ = _problem(hidden=8)
    selection = select_parameters(model)
    operator = HessianOperator(model, _loss, train, selection)
    exact = C.estimate_spectrum(operator, exact=ExactSolver())
    evals, _ = ExactSolver().eigendecomposition(operator)
    assert exact.method == "exact" and exact.bottom == pytest.approx(float(evals.min())) and exact.top == pytest.approx(float(evals.max()))
    assert exact.bottom < 0 and exact.min_damping == pytest.approx(-float(evals.min()))
    estimated = C.estimate_spectrum(operator)  # power iteration + Lanczos (all 200 examples < 512)
    assert estimated.method == "lanczos"
    assert estimated.top_estimate == pytest.approx(exact.top, rel=2e-2)
    assert estimated.bottom == pytest.approx(exact.bottom, rel=0.1)
    assert C.auto_reference_damping(exact, 1e-3) == pytest.approx(1.5 * exact.min_damping)
    assert C.auto_reference_damping(exact, 10.0) == 10.0


# ----------------------------------------------------------------------------- the grid against exact


def test_grid_rows_divergence_and_recommendation_meet_the_target_against_exact():
    model, train, test = _problem()
    selection = select_parameters(model)
    operator = HessianOperator(model, _loss, train, selection)
    exact = ExactSolver()
    spectrum = C.estimate_spectrum(operator, exact=exact)
    damping = C.auto_reference_damping(spectrum, 0.1 * spectrum.top)  # convex: the damping is the configured one
    assert damping == pytest.approx(0.1 * spectrum.top)
    grads = query_gradients(model, _loss, test, selection).detach()
    candidates = torch.stack([torch.randperm(200, generator=torch.Generator().manual_seed(t))[:60] for t in range(grads.shape[0])])
    scorer = C.CandidateScorer(model, _loss, train, selection, candidates)
    reference = C.solve_reference(operator, grads, damping, scorer, "exact", exact)
    grid = C.Grid(scale=["2x", "0.25x"], depth=[10, 400], batch_size=[4, 64], chains=[1, 2])
    settings = C.expand_grid(grid, reference_damping=damping, top_eigenvalue=spectrum.top_estimate, hvp=HvpConfig(tol=0.0))
    test_ids = [f"t{i}" for i in range(grads.shape[0])]
    table = C.evaluate_settings(settings, operator, grads, reference, scorer, test_ids=test_ids, top_m=5)
    assert len(table) == len(settings) * grads.shape[0]
    diverged = table[table["status"] == C.STATUS_DIVERGED]
    assert set(diverged["scale_spec"]) == {"0.25x"} and len(diverged) == 8 * grads.shape[0]
    assert diverged["spearman"].isna().all() and diverged["message"].str.contains("diverged").all()
    ok = table[table["status"] == C.STATUS_OK]
    assert len(ok) == 8 * grads.shape[0] and ok["spearman"].notna().all()

    summary = C.summarize(table, quality_metric="spearman", quality_target=0.99, statistic="median")
    assert len(summary) == len(settings)
    # Deeper LiSSA with large batches gets close to the exact solution; the shallowest does not.
    deep = summary[(summary["depth"] == 400) & (summary["batch_size"] == 64) & (summary["chains"] == 2) & (summary["scale_spec"] == "2x")]
    shallow = summary[(summary["depth"] == 10) & (summary["batch_size"] == 4) & (summary["chains"] == 1) & (summary["scale_spec"] == "2x")]
    assert float(deep["rel_error"].iloc[0]) < 0.05 < float(shallow["rel_error"].iloc[0])
    # Pareto: no ok setting is strictly better on both axes than a front member.
    ok_summary = summary[summary["status"] == C.STATUS_OK]
    for _, row in summary[summary["pareto"]].iterrows():
        better = ok_summary[(ok_summary["seconds"] < row["seconds"]) & (ok_summary["rel_error"] < row["rel_error"])]
        assert better.empty
    assert not summary.loc[summary["status"] != C.STATUS_OK, "pareto"].any()
    assert summary["recommended"].sum() == 1
    chosen = summary[summary["recommended"]].iloc[0]
    meeting = summary[summary["meets_target"]]
    assert chosen["seconds"] == meeting["seconds"].min() and chosen["spearman"] >= 0.99

    # Independently: the recommended section, run through a fresh solver, meets the target vs exact.
    document = C.recommended_document(summary, provenance={"calibration_run": "x"})
    hvp = HvpConfig(**document["hvp"])
    from fastif.workbench import make_solver

    solution = make_solver(hvp).solve(operator, grads, hvp.damping).vectors
    approx = scorer(solution)
    rhos = [C.spearman(approx[t].numpy(), reference.scores[t].numpy()) for t in range(grads.shape[0])]
    assert np.median(rhos) >= 0.99

    unreachable = C.summarize(table, quality_target=2.0)
    assert not unreachable["recommended"].any()
    assert C.recommended_document(unreachable, provenance={}) is None


def test_candidate_scorer_matches_score_candidates():
    from fastif.engine.scoring import score_candidates

    model, train, test = _problem()
    selection = select_parameters(model)
    s_test = torch.randn(3, selection.numel)
    candidates = torch.tensor([[0, 5, 7], [5, 9, 1], [199, 0, 3]])
    cached = C.CandidateScorer(model, _loss, train, selection, candidates)
    uncached = C.CandidateScorer(model, _loss, train, selection, candidates, max_cache_bytes=0)
    expected = score_candidates(model, _loss, train, s_test, selection, candidates=candidates)
    torch.testing.assert_close(cached(s_test), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(uncached(s_test), expected, rtol=1e-4, atol=1e-5)
    assert C.CandidateScorer(model, _loss, train, selection, None)(s_test).shape == (3, 200)


# ----------------------------------------------------------------------------- hvp=calibrated


def _fake_calibration(outputs: Path, hvp: dict, experiment: str = "demo") -> Path:
    with Run(outputs, C.COMMAND, experiment) as run:
        C.write_recommended(run.dir / C.RECOMMENDED_FILE, {"hvp": hvp, "provenance": {"calibration_run": str(run.dir)}})
    return run.dir


def test_resolve_hvp_reads_the_latest_recommended_yaml_and_records_it(tmp_path):
    outputs = tmp_path / "outputs"
    section = dict(solver="lissa", damping=0.5, scale=12.5, depth=300, batch_size=8, chains=4, tol=0.0, max_iter=200, seed=2, tail_average=0.5)
    run_dir = _fake_calibration(outputs, section)
    hvp, source = C.resolve_hvp(HvpConfig(from_calibration="latest"), outputs, "demo")
    assert source == run_dir / C.RECOMMENDED_FILE
    assert (hvp.damping, hvp.scale, hvp.depth, hvp.batch_size, hvp.chains, hvp.seed) == (0.5, 12.5, 300, 8, 4, 2)
    assert hvp.from_calibration is None
    # explicit folder or file, and the manifest of a consuming run names the calibration
    with Run(outputs, "influence", "demo") as consumer:
        again, source2 = C.resolve_hvp(HvpConfig(from_calibration=str(run_dir)), outputs, "demo", run=consumer)
    assert again == hvp and source2 == source
    manifest = json.loads((consumer.dir / "manifest.json").read_text())
    assert manifest["hvp_source"] == str(source) and manifest["hvp_calibration_run"] == str(run_dir)
    assert any(i["role"] == "hvp_calibration" and i["path"] == str(source) for i in manifest["inputs"])
    # no calibration field: the section as is
    plain = HvpConfig(damping=0.2)
    assert C.resolve_hvp(plain, outputs, "demo") == (plain, None)


def test_resolve_hvp_errors_name_the_fix(tmp_path):
    outputs = tmp_path / "outputs"
    with pytest.raises(RunError, match="fastif hvp-calibrate"):
        C.resolve_hvp(HvpConfig(from_calibration="latest"), outputs, "demo")
    with Run(outputs, C.COMMAND, "demo"):
        pass  # a complete calibration without a recommendation
    with pytest.raises(RunError, match="recommended no setting"):
        C.resolve_hvp(HvpConfig(from_calibration="latest"), outputs, "demo")
    with pytest.raises(InputError, match="does not exist"):
        C.resolve_hvp(HvpConfig(from_calibration=str(tmp_path / "nope.yaml")), outputs, "demo")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hvp:\n  solver: lissa\n  depth: -3\n")
    with pytest.raises(InputError, match="invalid"):
        C.resolve_hvp(HvpConfig(from_calibration=str(bad)), outputs, "demo")
    with pytest.raises(ConfigError):
        HvpConfig(from_calibration=" ")


# ----------------------------------------------------------------------------- command line


SMALL = ["data.demo_train_size=300", "data.demo_eval_size=100", "model.influence_params=[classifier.*]",
         "calibrate.n_test=4", "knn.k=50", "hvp.damping=0.5"]


@pytest.mark.slow
def test_cli_grid_sweep_and_aggregate(fastif_cli, outputs):
    """One grid run (divergence row, recommendation, plot, resolve_hvp), then a 4-job sweep
    aggregated into one table. About 40 s on 2 cores."""
    grid = ["calibrate.grid.depth=[50,400]", "calibrate.grid.batch_size=[4,32]", "calibrate.grid.chains=[1]"]
    result = fastif_cli("hvp-calibrate", *SMALL, *grid, timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = (outputs / "hvp-calibrate" / "demo" / "latest").resolve()
    summary = pd.read_parquet(run_dir / C.SUMMARY_FILE)
    table = pd.read_parquet(run_dir / C.CALIBRATION_FILE)
    assert len(summary) == 8 and len(table) == 8 * 4
    assert (summary.loc[summary["scale_spec"] == "0.25x", "status"] == C.STATUS_DIVERGED).all()
    assert (summary.loc[summary["scale_spec"] == "2x", "status"] == C.STATUS_OK).all()
    assert table["misclassified"].sum() == 2 * 8
    facts = json.loads((run_dir / C.SPECTRUM_FILE).read_text())
    assert facts["reference"]["method"] == "exact" and facts["spectrum"]["method"] == "exact"
    assert (run_dir / C.TRADEOFF_PLOT).stat().st_size > 10_000
    assert (run_dir / C.SUMMARY_CSV).is_file()
    assert summary["recommended"].sum() == 1
    chosen = summary[summary["recommended"]].iloc[0]
    assert chosen["spearman"] >= 0.99 and chosen["seconds"] == summary.loc[summary["meets_target"], "seconds"].min()
    hvp, source = C.resolve_hvp(HvpConfig(from_calibration="latest"), outputs, "demo")
    assert source == run_dir / C.RECOMMENDED_FILE
    assert hvp.scale == pytest.approx(chosen["scale"]) and hvp.depth == chosen["depth"] and hvp.batch_size == chosen["batch_size"]
    assert hvp.scale > facts["spectrum"]["top_estimate"]
    # hvp=calibrated: a command re-measures exactly the recommended setting, and its manifest says so
    again = fastif_cli("hvp-calibrate", "hvp=calibrated", "calibrate.mode=hvp", *SMALL[:-1], timeout=300)
    assert again.returncode == 0, again.stderr
    recheck_dir = (outputs / "hvp-calibrate" / "demo" / "latest").resolve()
    assert recheck_dir != run_dir
    manifest = json.loads((recheck_dir / "manifest.json").read_text())
    assert manifest["hvp_source"] == str(run_dir / C.RECOMMENDED_FILE) and manifest["hvp_calibration_run"] == str(run_dir)
    recheck = pd.read_parquet(recheck_dir / C.SUMMARY_FILE)
    assert len(recheck) == 1 and recheck["setting"].iloc[0] == chosen["setting"]
    assert recheck["spearman"].iloc[0] == pytest.approx(chosen["spearman"], abs=1e-6)

    sweep = fastif_cli("hvp-calibrate", "-m", "hvp.batch_size=4,32", "hvp.depth=50,400", "hvp.tol=0", *SMALL, timeout=300)
    assert sweep.returncode == 0, sweep.stderr
    assert sweep.stderr.count("reusing the spectrum and exact reference") == 3  # jobs 1-3 reuse job 0's
    folders = sorted((outputs / "hvp-calibrate" / "demo" / "multirun").iterdir())
    assert len(folders) == 1
    jobs = C.job_folders(folders[0])
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert len(pd.read_parquet(job / C.SUMMARY_FILE)) == 1  # each job measures its hvp setting only
        assert not (job / C.RECOMMENDED_FILE).exists()  # one setting is no choice: the aggregate recommends
    with pytest.raises(RunError, match="aggregate"):
        C.resolve_hvp(HvpConfig(from_calibration="latest"), outputs, "demo")
    aggregated = fastif_cli("hvp-calibrate", f"aggregate={folders[0]}", timeout=120)
    assert aggregated.returncode == 0, aggregated.stderr
    assert "| job |" in aggregated.stderr  # the table is printed
    agg_dir = sorted(p for p in (outputs / "hvp-calibrate" / "demo").iterdir() if p.name[0].isdigit())[-1]
    agg = pd.read_parquet(agg_dir / C.SUMMARY_FILE)
    assert sorted(agg["job"]) == [0, 1, 2, 3]
    assert sorted(zip(agg["batch_size"], agg["depth"])) == [(4, 50), (4, 400), (32, 50), (32, 400)]
    assert len(pd.read_parquet(agg_dir / C.CALIBRATION_FILE)) == 4 * 4
    manifest = json.loads((agg_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and any(i["role"] == "multirun" for i in manifest["inputs"])
    if agg["meets_target"].any():  # the aggregate recommends the fastest job meeting the target
        hvp, source = C.resolve_hvp(HvpConfig(from_calibration="latest"), outputs, "demo")
        best = agg[agg["meets_target"]].sort_values("seconds").iloc[0]
        assert source == agg_dir / C.RECOMMENDED_FILE and (hvp.depth, hvp.batch_size) == (best["depth"], best["batch_size"])
