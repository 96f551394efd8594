"""Shared fixtures: run the installed ``fastif`` command line as a user would.

``fastif_cli`` runs the console script in a subprocess from an unrelated working directory, with
``FASTIF_OUTPUTS`` pointing to a fresh temporary folder (``outputs``), so tests never touch the
repository's ``outputs/`` and prove that configs ship with the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def fastif_executable() -> list[str]:
    """The installed console script next to this interpreter (``python -m fastif`` otherwise)."""
    script = Path(sys.executable).with_name("fastif")
    if script.exists():
        return [str(script)]
    found = shutil.which("fastif")
    return [found] if found else [sys.executable, "-m", "fastif"]


def cli_env(outputs: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("HYDRA_FULL_ERROR", "FASTIF_PROGRESS")}
    env["FASTIF_OUTPUTS"] = str(outputs)
    env["FASTIF_PROGRESS"] = "0"
    # One intra-op thread: the demo model is tiny, and several torch threads on a busy 2-core
    # machine slow it down by orders of magnitude (spinning OpenMP workers).
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: tiny models run faster so, and a busy machine cannot stall them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    """The demo's word-level tokenizer."""
    from fastif.data.demo import demo_tokenizer

    return demo_tokenizer()


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """The run-folder root (FASTIF_OUTPUTS) of this test."""
    path = tmp_path / "outputs"
    path.mkdir()
    return path


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """An unrelated working directory (not the repository)."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


@pytest.fixture
def fastif_cli(outputs: Path, elsewhere: Path):
    """``fastif_cli(*args, timeout=120)`` -> CompletedProcess of ``fastif <args>`` (text output)."""

    def run(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*fastif_executable(), *args],
            cwd=elsewhere,
            env={**cli_env(outputs), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def manifests(outputs: Path) -> list[dict]:
    """Every manifest.json under ``outputs`` (run folders only, not the ``latest`` links)."""
    found = []
    for path in sorted(outputs.rglob("manifest.json")):
        if any(part == "latest" for part in path.relative_to(outputs).parts):
            continue
        found.append(json.loads(path.read_text()))
    return found


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory) -> Path:
    """Outputs root holding one complete ``fastif train`` (experiment=demo) run; trained once per session.

    Tests that use it take about a minute on 2 CPU cores the first time: mark them slow.
    """
    root = tmp_path_factory.mktemp("trained_demo")
    outputs = root / "outputs"
    outputs.mkdir()
    result = subprocess.run([*fastif_executable(), "train"], cwd=root, env=cli_env(outputs),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"fastif train failed:\n{result.stdout}\n{result.stderr}"
    return outputs
