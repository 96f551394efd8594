"""The ``fastif`` command line, run as a user runs it: installed console script, unrelated cwd."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import cli_env, fastif_executable, manifests

from fastif.commands import COMMANDS
from fastif.config import DataConfig

# group -> options that must be listed (later issues may add more)
GROUPS = {"experiment": {"demo"}, "model": {"tiny_bert", "bert_base_cased"}, "data": {"demo"},
          "hvp": {"lissa", "cg", "exact"}, "knn": {"flat"}}


def listed_groups(help_text: str) -> dict[str, set[str]]:
    groups = {}
    for line in help_text.splitlines():
        name, sep, options = line.partition(": ")
        if sep and name in GROUPS:
            groups[name] = {option.strip() for option in options.split(",")}
    return groups


def test_top_level_help_lists_every_command_with_one_line(fastif_cli):
    result = fastif_cli("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, command in COMMANDS.items():
        assert any(line.split() and line.split()[0] == name and command.summary in line for line in lines), name


def test_no_command_prints_usage_and_fails(fastif_cli):
    result = fastif_cli()
    assert result.returncode == 2
    assert "Usage: fastif <command>" in result.stderr and "train" in result.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help_lists_config_groups_and_fields(fastif_cli, name):
    result = fastif_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"fastif {name}" in result.stdout
    listed = listed_groups(result.stdout)
    for group, options in GROUPS.items():
        assert options <= listed.get(group, set()), (group, result.stdout)
    assert "train.epochs" in result.stdout and "Training epochs" in result.stdout  # field reference
    assert "Traceback" not in result.stdout + result.stderr


def test_python_dash_m_is_the_same_program(outputs, elsewhere):
    result = subprocess.run([sys.executable, "-m", "fastif", "train", "--help"], cwd=elsewhere,
                            env=cli_env(outputs), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "fastif train" in result.stdout and "demo" in listed_groups(result.stdout)["experiment"]


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, fastif.cli, fastif.runs, fastif.commands.train; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_cfg_job_prints_the_composed_config_and_creates_nothing(fastif_cli, outputs):
    result = fastif_cli("train", "--cfg", "job", "train.epochs=5", "experiment=demo")
    assert result.returncode == 0, result.stderr
    assert "experiment_name: demo" in result.stdout
    assert "epochs: 5.0" in result.stdout
    assert list(outputs.iterdir()) == []


# ----------------------------------------------------------------------------- bad input


def assert_clean_refusal(result: subprocess.CompletedProcess, outputs: Path, *needles: str) -> None:
    """Non-zero exit, a message naming the problem, no traceback, no complete run folder."""
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    assert all(manifest["status"] != "complete" for manifest in manifests(outputs))


def test_unknown_command(fastif_cli, outputs):
    result = fastif_cli("trian")
    assert_clean_refusal(result, outputs, "unknown command 'trian'", "Did you mean 'train'", "hvp-calibrate")
    assert result.returncode == 2


def test_unknown_key(fastif_cli, outputs):
    assert_clean_refusal(fastif_cli("train", "foo=1"), outputs, "foo")
    assert_clean_refusal(fastif_cli("train", "+foo=1"), outputs, "Unknown config key", "foo")
    assert_clean_refusal(fastif_cli("train", "train.epoch=2"), outputs, "epoch")
    assert list(outputs.iterdir()) == []  # refused before any folder exists


def test_unknown_group_option_lists_the_valid_ones(fastif_cli, outputs):
    result = fastif_cli("train", "experiment=nope")
    assert_clean_refusal(result, outputs, "experiment/nope", "Available options in 'experiment'", "demo")
    result = fastif_cli("influence", "hvp=newton")
    assert_clean_refusal(result, outputs, "hvp/newton", "cg", "exact", "lissa")
    assert list(outputs.iterdir()) == []


def test_out_of_range_value_is_refused_before_any_run_folder(fastif_cli, outputs):
    result = fastif_cli("train", "train.epochs=-1")
    assert_clean_refusal(result, outputs, "train.epochs", "got -1", "Fix:")
    assert result.returncode == 2
    assert result.stderr.startswith("fastif train: error:")
    assert list(outputs.iterdir()) == []


def test_wrongly_typed_and_missing_values_are_refused(fastif_cli, outputs):
    assert_clean_refusal(fastif_cli("train", "train.epochs=abc"), outputs, "train.epochs", "abc")
    assert_clean_refusal(fastif_cli("train", "model.name_or_path=???"), outputs, "model.name_or_path", "missing")
    assert_clean_refusal(fastif_cli("train", "device=gpu"), outputs, "device", "device=auto")
    assert list(outputs.iterdir()) == []


def test_a_missing_model_path_is_an_input_error(fastif_cli, outputs):
    result = fastif_cli("train", "model.name_or_path=/does/not/exist")
    assert_clean_refusal(result, outputs, "/does/not/exist", "does not exist", "Fix:")
    error_paragraph = result.stderr[result.stderr.index("fastif train: error:"):]
    assert "/does/not/exist" in error_paragraph and "\n\n" not in error_paragraph.strip()
    failed = manifests(outputs)
    assert [m["status"] for m in failed] == ["failed"]
    assert "/does/not/exist" in failed[0]["error"]["message"]


# ----------------------------------------------------------------------------- sweeps

# A stand-in for `train` whose work is cheap: the real CLI, configs and Run, a trivial execute().
FAKE_TRAIN = textwrap.dedent(
    """
    import sys, types
    from fastif import commands
    from fastif.commands.train import TrainSettings

    fake = types.ModuleType("fake_train")
    fake.SCHEMA = TrainSettings
    def execute(settings, run):
        run.write_json("echo.json", {"seed": settings.seed, "epochs": settings.train.epochs})
    fake.execute = execute
    sys.modules["fake_train"] = fake
    commands.COMMANDS["train"] = commands.Command("train", "fake_train", "test double")

    from fastif.cli import main
    main(sys.argv[1:])
    """
)


def run_fake_train(outputs: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAKE_TRAIN, "train", *args], cwd=cwd, env=cli_env(outputs),
                          capture_output=True, text=True, timeout=120)


def test_multirun_gives_each_job_its_own_folder(outputs, elsewhere):
    result = run_fake_train(outputs, elsewhere, "-m", "seed=1,2", "train.epochs=0.5")
    assert result.returncode == 0, result.stderr
    sweeps = list((outputs / "train" / "demo" / "multirun").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job, seed in (("0", 1), ("1", 2)):
        folder = sweeps[0] / job
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["seed"] == seed
        assert f"seed={seed}" in manifest["overrides"]
        assert json.loads((folder / "echo.json").read_text()) == {"seed": seed, "epochs": 0.5}
        assert "seed: %d" % seed in (folder / ".hydra" / "config.yaml").read_text()
    assert (outputs / "train" / "demo" / "latest").resolve().parent == sweeps[0].resolve()
    assert not (elsewhere / "multirun").exists() and not (elsewhere / "outputs").exists()
    assert list(elsewhere.iterdir()) == []  # Hydra wrote nothing into the working directory


def test_two_sweeps_in_the_same_second_do_not_share_a_folder(outputs, elsewhere):
    first = subprocess.Popen([sys.executable, "-c", FAKE_TRAIN, "train", "-m", "seed=1,2"], cwd=elsewhere,
                             env=cli_env(outputs), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = run_fake_train(outputs, elsewhere, "-m", "seed=3,4")
    first.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    sweeps = sorted((outputs / "train" / "demo" / "multirun").iterdir())
    assert len(sweeps) == 2
    seeds = sorted(json.loads((job / "echo.json").read_text())["seed"] for sweep in sweeps for job in sweep.iterdir()
                   if job.is_dir())
    assert seeds == [1, 2, 3, 4]


def test_sweep_folders_are_claimed_exclusively(tmp_path):
    from fastif.cli import _claim_sweep_dir

    first = _claim_sweep_dir(str(tmp_path), "hvp-calibrate", "demo")
    second = _claim_sweep_dir(str(tmp_path), "hvp-calibrate", "demo")
    assert first != second
    assert Path(first).parent == Path(second).parent == tmp_path / "hvp-calibrate" / "demo" / "multirun"


def test_a_single_run_writes_config_overrides_log_and_manifest(outputs, elsewhere):
    result = run_fake_train(outputs, elsewhere, "seed=7")
    assert result.returncode == 0, result.stderr
    (folder,) = [p for p in (outputs / "train" / "demo").iterdir() if p.is_dir() and not p.is_symlink()]
    assert {p.name for p in folder.iterdir()} >= {".hydra", "manifest.json", "train.log", "echo.json"}
    assert "seed: 7" in (folder / ".hydra" / "config.yaml").read_text()
    assert "${" not in (folder / ".hydra" / "config.yaml").read_text()  # resolved
    assert str(outputs) in (folder / ".hydra" / "config.yaml").read_text()  # FASTIF_OUTPUTS was used
    assert "seed=7" in (folder / ".hydra" / "overrides.yaml").read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["command"] == "train"
    assert (outputs / "train" / "demo" / "latest").resolve() == folder.resolve()
    assert list(elsewhere.iterdir()) == []


def test_a_torchrun_follower_rank_writes_no_run_folder(outputs, elsewhere):
    env = {**cli_env(outputs), "WORLD_SIZE": "2", "RANK": "1"}
    result = subprocess.run([sys.executable, "-c", FAKE_TRAIN, "train"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert list(outputs.iterdir()) == []


def test_paths_outputs_override_wins_over_the_environment(outputs, elsewhere, tmp_path):
    other = tmp_path / "other_outputs"
    result = run_fake_train(outputs, elsewhere, f"paths.outputs={other}")
    assert result.returncode == 0, result.stderr
    assert (other / "train" / "demo" / "latest" / "manifest.json").exists()
    assert list(outputs.iterdir()) == []


# ----------------------------------------------------------------------------- the real demo


def wait_for_status(folder_root: Path, status: str, timeout: float) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in folder_root.rglob("manifest.json"):
            try:
                if json.loads(path.read_text())["status"] == status:
                    return path.parent
            except (OSError, ValueError):
                pass
        time.sleep(0.1)
    raise AssertionError(f"no run reached status {status} under {folder_root}")


@pytest.mark.parametrize("sig, expected", [(signal.SIGKILL, "running"), (signal.SIGTERM, "failed")])
def test_a_train_run_killed_midway_is_never_complete(outputs, elsewhere, sig, expected):
    process = subprocess.Popen([*fastif_executable(), "train"], cwd=elsewhere, env=cli_env(outputs),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        folder = wait_for_status(outputs, "running", timeout=60)
        time.sleep(1.0)  # into the work
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == expected
    assert process.returncode != 0
    assert not (outputs / "train" / "demo" / "latest").exists()
    if sig == signal.SIGTERM:
        assert "SIGTERM" in manifest["error"]["message"]
        assert "terminated by signal SIGTERM" in stderr and "Traceback" not in stderr
        assert process.returncode == 128 + signal.SIGTERM


@pytest.mark.slow
def test_fastif_train_demo_learns_the_shortcut(trained_demo):
    run_dir = (trained_demo / "train" / "demo" / "latest").resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["device"] in ("cpu", "cuda", "cuda:0")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["in_distribution_accuracy"] >= 0.9
    # The shortcut shows: high-overlap non-entailment pairs are mostly called entailment.
    assert metrics["challenge_non_entailment_accuracy"] <= metrics["in_distribution_accuracy"] - 0.2
    assert metrics["challenge_entailment_accuracy"] >= 0.9
    assert set(metrics["challenge_by_heuristic"]) == {"lexical_overlap", "subsequence", "constituent"}
    model_dir = run_dir / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    assert any(p.suffix in (".safetensors", ".bin") for p in model_dir.iterdir())
    assert manifest["data"]["train"]["rows"] == DataConfig().demo_train_size


@pytest.mark.slow
def test_demo_model_is_reused_and_reloads_with_the_same_predictions(trained_demo):
    import torch

    from fastif.commands.train import TrainSettings
    from fastif.config import PathsConfig
    from fastif.data import load_splits
    from fastif.data.encoding import encode
    from fastif.demo_model import ensure_demo_model
    from fastif.models import load_classifier
    from fastif.training import evaluate

    settings = TrainSettings(paths=PathsConfig(outputs=str(trained_demo)))
    model_dir = ensure_demo_model(settings)
    run_dir = (trained_demo / "train" / "demo" / "latest").resolve()
    assert model_dir == run_dir / "model"  # reused, not retrained
    assert len([p for p in (trained_demo / "train" / "demo").iterdir() if p.is_dir() and not p.is_symlink()]) == 1

    model, tokenizer = load_classifier(str(model_dir), 2, torch.device("cpu"))
    splits = load_splits(settings.data)
    result = evaluate(model, encode(splits["eval"], tokenizer, settings.model.max_length), 128, torch.device("cpu"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result["accuracy"] == pytest.approx(metrics["in_distribution_accuracy"], abs=1e-9)
