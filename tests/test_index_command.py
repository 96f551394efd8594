"""`fastif index`: the index run folder, the recall audit, and refusal of a mismatching index."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import cli_env, fastif_executable


@pytest.fixture
def demo_outputs(trained_demo, tmp_path) -> Path:
    target = tmp_path / "outputs"
    shutil.copytree(trained_demo, target, symlinks=True)
    return target


def _fastif(outputs: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*fastif_executable(), *args], cwd=outputs.parent, env=cli_env(outputs),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_index_with_recall_audit(demo_outputs):
    result = _fastif(demo_outputs, "index", "knn.audit.enabled=true", "knn.audit.n_test=4", "knn.audit.ms=[10]")
    assert result.returncode == 0, result.stderr
    run = (demo_outputs / "index" / "demo" / "latest").resolve()
    meta = json.loads((run / "index" / "metadata.json").read_text()) if (run / "index" / "metadata.json").exists() else None
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    table = pd.read_parquet(run / "recall.parquet")
    assert sorted(table.k_fraction.unique().round(2).tolist()) == [0.01, 0.05, 0.1, 0.25]
    assert set(table.ranking) == {"helpful", "harmful", "abs"}
    assert (table.random_baseline.round(2) == table.k_fraction.round(2)).all()
    # recall can only grow with k (the candidate sets are nested)
    for _, part in table.groupby(["ranking", "m"]):
        assert part.sort_values("k").recall.is_monotonic_increasing
    assert (run / "recall.png").stat().st_size > 1000
    if meta is not None:
        assert meta["n_vectors"] == 8000


@pytest.mark.slow
def test_influence_refuses_an_index_of_other_data_unless_rebuilt(demo_outputs):
    assert _fastif(demo_outputs, "index").returncode == 0
    other = ["data.demo_train_size=500", "tests.n=2", "knn.k=20", "hvp.depth=30"]
    refused = _fastif(demo_outputs, "influence", *other)
    assert refused.returncode != 0
    assert "training dataset differs" in refused.stderr and "knn.rebuild=true" in refused.stderr
    assert "Traceback" not in refused.stderr
    rebuilt = _fastif(demo_outputs, "influence", *other, "knn.rebuild=true")
    assert rebuilt.returncode == 0, rebuilt.stderr
