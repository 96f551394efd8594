"""`fastif influence`: the pipeline's tables against the engine, resume after kill -9, locks, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cli_env, fastif_executable
from fastif.pipeline import INFLUENCE_COLUMNS, TESTS_COLUMNS, merge_neighbours, select_queries

SMALL = ["tests.n=4", "output.chunk_size=2", "output.top_m=5", "knn.k=60", "hvp.depth=60", "hvp.batch_size=16"]


def test_select_queries_modes():
    frame = pd.DataFrame({"id": [f"t{i}" for i in range(10)], "label": [0, 1] * 5, "heuristic": ["a", "b"] * 5})
    preds = np.array([0, 0] * 5)  # every odd row is misclassified
    wrong = select_queries(frame, preds, mode="misclassified", n=3, seed=1)
    assert len(wrong) == 3 and all(int(q.query_id[1:]) % 2 == 1 for q in wrong)
    right = select_queries(frame, preds, mode="correct", n=20)
    assert sorted(int(q.query_id[1:]) for q in right) == [0, 2, 4, 6, 8]
    assert [q.query_id for q in select_queries(frame, preds, mode="ids", n=1, ids=["t3", "t1"])] == ["t3", "t1"]
    groups = select_queries(frame, preds, mode="anchor_groups", n=1, group_column="heuristic", anchors_per_group=3, seed=0)
    assert [q.query_id for q in groups] == ["group:a", "group:b"]
    assert all(len(q.rows) == 3 and len({frame.heuristic[r] for r in q.rows}) == 1 for q in groups)
    again = select_queries(frame, preds, mode="anchor_groups", n=1, group_column="heuristic", anchors_per_group=3, seed=0)
    assert [q.rows for q in groups] == [q.rows for q in again]


def test_merge_neighbours_keeps_best_distance_once():
    positions = torch.tensor([[5, 2, 9], [2, 7, 5]])
    distances = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.3, 0.8]])
    pos, dist = merge_neighbours(positions, distances, 4, larger_is_closer=False)
    assert pos.tolist() == [5, 2, 7, 9]
    assert dist.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.9])


@pytest.fixture
def demo_outputs(trained_demo, tmp_path) -> Path:
    """A private copy of the session's outputs root with a trained demo model."""
    target = tmp_path / "outputs"
    shutil.copytree(trained_demo, target, symlinks=True)
    return target


def _run(outputs: Path, *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*fastif_executable(), "influence", *args], cwd=cwd or outputs.parent, env=cli_env(outputs),
                          capture_output=True, text=True, timeout=timeout)


def _complete_runs(outputs: Path) -> list[Path]:
    runs = []
    for manifest in sorted((outputs / "influence" / "demo").glob("*/manifest.json")):
        if not manifest.parent.is_symlink() and json.loads(manifest.read_text())["status"] == "complete":
            runs.append(manifest.parent)
    return runs


@pytest.mark.slow
def test_influence_writes_documented_tables(demo_outputs):
    result = _run(demo_outputs, *SMALL, "output.csv=true")
    assert result.returncode == 0, result.stderr
    (run,) = _complete_runs(demo_outputs)
    influence = pd.read_parquet(run / "influence.parquet")
    tests = pd.read_parquet(run / "tests.parquet")
    assert list(influence.columns) == INFLUENCE_COLUMNS and list(tests.columns) == TESTS_COLUMNS
    assert len(tests) == 4 and (tests.test_label != tests.test_pred).all()  # default: misclassified points
    assert (tests.candidates == 60).all()
    for test_id, part in influence.groupby("test_id"):
        helpful = part[part.direction == "helpful"].sort_values("rank")
        harmful = part[part.direction == "harmful"].sort_values("rank")
        assert len(helpful) <= 5 and len(harmful) <= 5 and len(part) >= 1
        assert helpful.influence.is_monotonic_increasing and harmful.influence.is_monotonic_decreasing
        assert (helpful.influence < 0).all() and (harmful.influence > 0).all()
        assert (part.knn_rank.between(1, 60)).all()
    manifest = json.loads((run / "manifest.json").read_text())
    assert "negative = helpful" in manifest["sign_convention"]
    report = (run / "report.md").read_text()
    first = tests.iloc[0]
    assert first.text in report and influence.train_text.iloc[0].replace("|", "\\|") in report
    assert (run / "influence.csv").exists()
    assert any(i["role"] == "knn_index" for i in manifest["inputs"])


@pytest.mark.slow
def test_full_scan_table_matches_engine_on_exact_solver(demo_outputs):
    """knn.k=all with the exact solver: the kept rows are the top of the engine's full score matrix."""
    args = ["tests.n=2", "output.top_m=3", "knn.k=all", "hvp=exact", "model.influence_params=[classifier.*]", "hvp.damping=0.01"]
    result = _run(demo_outputs, *args)
    assert result.returncode == 0, result.stderr
    (run,) = _complete_runs(demo_outputs)
    influence = pd.read_parquet(run / "influence.parquet")

    import fastif
    from fastif.config import DataConfig
    from fastif.data import load_splits
    from fastif.data.encoding import encode
    from fastif.engine.hf import sequence_classification_loss
    from fastif.models import load_classifier

    model_dir = json.loads((run / "manifest.json").read_text())["inputs"][0]["path"]
    model, tokenizer = load_classifier(model_dir, 2, "cpu")
    config = json.loads(json.dumps(__import__("yaml").safe_load((run / ".hydra" / "config.yaml").read_text())))
    splits = load_splits(DataConfig(**{k: v for k, v in config["data"].items()}))
    max_length = config["model"]["max_length"]
    train = encode(splits["train"], tokenizer, max_length)
    test_ids = list(dict.fromkeys(influence.test_id))
    test_frame = splits["challenge"].set_index("id").loc[test_ids].reset_index()
    test = encode(test_frame, tokenizer, max_length)
    scores = fastif.influence_scores(model, sequence_classification_loss, train, test, params=["classifier.*"], solver="exact", damping=0.01)
    for t, test_id in enumerate(test_ids):
        part = influence[(influence.test_id == test_id) & (influence.direction == "helpful")].sort_values("rank")
        expected = torch.argsort(scores[t])[:3].tolist()
        assert part.train_index.tolist() == expected
        assert np.allclose(part.influence.to_numpy(), scores[t, expected].numpy(), rtol=1e-4, atol=1e-6)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() or proc.poll() is not None:
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_nine_then_resume_equals_uninterrupted_run(demo_outputs):
    args = ["tests.n=6", "output.chunk_size=1", "output.top_m=5", "knn.k=60", "hvp.depth=80", "hvp.batch_size=16"]
    reference = _run(demo_outputs, *args)
    assert reference.returncode == 0, reference.stderr
    (reference_dir,) = _complete_runs(demo_outputs)
    proc = subprocess.Popen([*fastif_executable(), "influence", *args], cwd=demo_outputs.parent, env=cli_env(demo_outputs),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runs_before = set((demo_outputs / "influence" / "demo").iterdir())
        deadline = time.time() + 240
        killed_dir = None
        while time.time() < deadline and killed_dir is None:
            for folder in set((demo_outputs / "influence" / "demo").iterdir()) - runs_before:
                if (folder / "chunks" / "tests_00001.parquet").exists():
                    killed_dir = folder
            time.sleep(0.1)
        assert killed_dir is not None, "the run never reached its second chunk"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((killed_dir / "manifest.json").read_text())["status"] == "running"
    assert not (killed_dir / "influence.parquet").exists()
    done_before = sorted(p.name for p in (killed_dir / "chunks").glob("tests_*.parquet"))
    assert 2 <= len(done_before) < 6
    resumed = _run(demo_outputs, *args, f"resume={killed_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert "already done (resumed)" in (killed_dir / "influence.log").read_text()
    assert json.loads((killed_dir / "manifest.json").read_text())["status"] == "complete"
    pd.testing.assert_frame_equal(pd.read_parquet(killed_dir / "influence.parquet"), pd.read_parquet(reference_dir / "influence.parquet"))


@pytest.mark.slow
def test_second_run_on_a_locked_folder_is_refused(demo_outputs):
    args = ["tests.n=6", "output.chunk_size=1", "knn.k=60", "hvp.depth=200"]
    proc = subprocess.Popen([*fastif_executable(), "influence", *args], cwd=demo_outputs.parent, env=cli_env(demo_outputs),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        folder = None
        while time.time() < deadline and folder is None:
            for manifest in (demo_outputs / "influence" / "demo").glob("*/manifest.json"):
                folder = manifest.parent.resolve()
            time.sleep(0.1)
        assert folder is not None
        second = _run(demo_outputs, *args, f"resume={folder}", timeout=120)
        assert second.returncode != 0
        assert "in use by another process" in second.stderr and "Traceback" not in second.stderr
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_table(demo_outputs):
    pytest.importorskip("torch.distributed.run")
    args = ["tests.n=4", "output.chunk_size=4", "output.top_m=5", "knn.k=60", "hvp=cg", "hvp.damping=0.2",
            "model.influence_params=[classifier.*,bert.pooler.*]"]
    single = _run(demo_outputs, *args)
    assert single.returncode == 0, single.stderr
    (single_dir,) = _complete_runs(demo_outputs)
    env = {**cli_env(demo_outputs), "MASTER_PORT": "29517"}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                             "-m", "fastif", "influence", *args], cwd=demo_outputs.parent, env=env,
                            capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    runs = _complete_runs(demo_outputs)
    assert len(runs) == 2  # one folder per job, whatever the number of ranks
    (double_dir,) = [r for r in runs if r != single_dir]
    assert json.loads((double_dir / "manifest.json").read_text())["world_size"] == 2
    a = pd.read_parquet(single_dir / "influence.parquet")
    b = pd.read_parquet(double_dir / "influence.parquet")
    pd.testing.assert_frame_equal(a.drop(columns=["influence"]), b.drop(columns=["influence"]))
    assert np.allclose(a.influence, b.influence, rtol=1e-5, atol=1e-7)
