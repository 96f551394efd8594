"""Run folders: distinct folders, manifest, latest only on completion, locks, kills."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastif.errors import RunError
from fastif.runs import (
    Run,
    atomic_write_text,
    config_sha256,
    directory_sha256,
    latest_complete,
    progress_enabled,
    read_manifest,
    unfinished_runs,
)

FROZEN = dt.datetime(2024, 5, 17, 9, 30, 0, tzinfo=dt.timezone.utc)


def frozen_clock(when: dt.datetime = FROZEN):
    return lambda: when


def test_two_runs_in_the_same_second_get_distinct_folders(tmp_path):
    with Run(tmp_path, "train", "demo", clock=frozen_clock()) as first:
        with Run(tmp_path, "train", "demo", clock=frozen_clock()) as second:  # concurrent
            pass
    with Run(tmp_path, "train", "demo", clock=frozen_clock()) as third:  # sequential
        pass
    names = [first.dir.name, second.dir.name, third.dir.name]
    assert names == ["2024-05-17_09-30-00", "2024-05-17_09-30-00_1", "2024-05-17_09-30-00_2"]
    assert all(run.dir.parent == tmp_path / "train" / "demo" for run in (first, second, third))
    assert [read_manifest(run.dir)["status"] for run in (first, second, third)] == ["complete"] * 3


def test_manifest_records_versions_config_hash_and_inputs(tmp_path):
    data_file = tmp_path / "train.jsonl"
    data_file.write_text('{"premise": "a", "hypothesis": "b"}\n')
    model_dir = tmp_path / "model"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "sub" / "weights.bin").write_bytes(b"\x00\x01\x02")
    config = {"experiment_name": "demo", "seed": 3, "paths": {"outputs": str(tmp_path)}, "train": {"epochs": 1.0}}

    with Run(tmp_path / "out", "train", "demo", config=config, overrides=["seed=3"], seed=3, device="auto") as run:
        running = read_manifest(run.dir)
        run.record_input(data_file, "data.train")
        run.record_input(model_dir, "model")
        run.annotate(device="cpu")

    manifest = read_manifest(run.dir)
    assert running["status"] == "running" and running["ended_at"] is None
    assert manifest["status"] == "complete" and manifest["error"] is None
    assert manifest["command"] == "train" and manifest["experiment"] == "demo"
    assert manifest["seed"] == 3 and manifest["device"] == "cpu"
    assert manifest["fastif_version"] == "0.1.0"
    assert "git_commit" in manifest
    assert {"python", "torch", "transformers", "faiss"} <= set(manifest["versions"])
    assert manifest["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    start = dt.datetime.fromisoformat(manifest["started_at"])
    end = dt.datetime.fromisoformat(manifest["ended_at"])
    assert start <= end and manifest["seconds"] >= 0

    # The config hash ignores where results go, and nothing else.
    assert manifest["config_sha256"] == config_sha256(config)
    assert config_sha256({**config, "paths": {"outputs": "/elsewhere"}}) == config_sha256(config)
    assert config_sha256({**config, "seed": 4}) != config_sha256(config)

    inputs = {entry["role"]: entry for entry in manifest["inputs"]}
    assert inputs["data.train"]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert inputs["data.train"]["kind"] == "file"
    assert inputs["model"]["kind"] == "directory" and inputs["model"]["files"] == 2
    assert inputs["model"]["sha256"] == directory_sha256(model_dir)[0]

    assert (run.dir / ".hydra" / "config.yaml").read_text().count("epochs: 1.0") == 1
    assert "seed=3" in (run.dir / ".hydra" / "overrides.yaml").read_text()


def test_recording_a_missing_input_is_an_error(tmp_path):
    with Run(tmp_path, "train", "demo") as run:
        with pytest.raises(RunError, match="does not exist"):
            run.record_input(tmp_path / "nope.jsonl", "data.train")
    assert read_manifest(run.dir)["inputs"] == []


def test_directory_hash_sees_content_and_names(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    before = directory_sha256(folder)[0]
    (folder / "a.txt").write_text("two")
    changed = directory_sha256(folder)[0]
    (folder / "a.txt").rename(folder / "b.txt")
    renamed = directory_sha256(folder)[0]
    assert len({before, changed, renamed}) == 3


def test_failed_run_keeps_error_and_does_not_move_latest(tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with Run(tmp_path, "train", "demo") as run:
            raise ValueError("boom")
    manifest = read_manifest(run.dir)
    assert manifest["status"] == "failed"
    assert manifest["error"] == {"type": "ValueError", "message": "boom"}
    assert not (tmp_path / "train" / "demo" / "latest").exists()
    assert latest_complete(tmp_path, "train", "demo") is None


def test_keyboard_interrupt_marks_the_run_failed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with Run(tmp_path, "train", "demo") as run:
            raise KeyboardInterrupt
    manifest = read_manifest(run.dir)
    assert manifest["status"] == "failed" and "interrupted" in manifest["error"]["message"]


def test_latest_moves_only_on_completion(tmp_path):
    link = tmp_path / "train" / "demo" / "latest"
    with Run(tmp_path, "train", "demo", clock=frozen_clock()) as first:
        assert not link.exists()  # nothing complete yet
    assert link.is_symlink() and link.resolve() == first.dir.resolve()
    assert not os.path.isabs(os.readlink(link))  # relative: the outputs folder can move

    with Run(tmp_path, "train", "demo", clock=frozen_clock(FROZEN + dt.timedelta(seconds=5))) as second:
        assert link.resolve() == first.dir.resolve()  # still the complete one while running
        assert latest_complete(tmp_path, "train", "demo") == first.dir.resolve()
    assert link.resolve() == second.dir.resolve()

    with pytest.raises(RuntimeError):
        with Run(tmp_path, "train", "demo", clock=frozen_clock(FROZEN + dt.timedelta(seconds=9))):
            raise RuntimeError("crash")
    assert link.resolve() == second.dir.resolve()
    assert latest_complete(tmp_path, "train", "demo") == second.dir.resolve()


def test_an_older_run_finishing_late_does_not_take_latest(tmp_path):
    link = tmp_path / "train" / "demo" / "latest"
    older = Run(tmp_path, "train", "demo", clock=frozen_clock())
    older.__enter__()
    with Run(tmp_path, "train", "demo", clock=frozen_clock(FROZEN + dt.timedelta(seconds=1))) as newer:
        pass
    older.__exit__(None, None, None)
    assert read_manifest(older.dir)["status"] == "complete"
    assert link.resolve() == newer.dir.resolve()


def test_latest_complete_scans_when_the_link_is_missing(tmp_path):
    with Run(tmp_path, "index", "demo", clock=frozen_clock()) as first:
        pass
    with Run(tmp_path, "index", "demo", clock=frozen_clock(FROZEN + dt.timedelta(hours=1))) as second:
        pass
    with pytest.raises(RuntimeError):
        with Run(tmp_path, "index", "demo", clock=frozen_clock(FROZEN + dt.timedelta(hours=2))):
            raise RuntimeError("late failure")
    (tmp_path / "index" / "demo" / "latest").unlink()
    assert latest_complete(tmp_path, "index", "demo") == second.dir.resolve()
    assert first.dir != second.dir
    assert latest_complete(tmp_path, "index", "other") is None


def test_a_locked_folder_is_refused(tmp_path):
    folder = tmp_path / "job"
    with Run(tmp_path, "train", "demo", folder=folder):
        with pytest.raises(RunError, match=rf"{folder} is in use by another process \(pid {os.getpid()}\)"):
            with Run(tmp_path, "train", "demo", folder=folder):
                pass
    assert read_manifest(folder)["status"] == "complete"


def test_a_folder_holding_a_run_is_never_reused(tmp_path):
    folder = tmp_path / "job"
    with Run(tmp_path, "train", "demo", folder=folder):
        pass
    before = (folder / "manifest.json").read_text()
    with pytest.raises(RunError, match="already holds a run"):
        with Run(tmp_path, "train", "demo", folder=folder):
            pass
    assert (folder / "manifest.json").read_text() == before


def test_logging_goes_to_the_run_log_and_only_summaries_to_the_console(tmp_path, capfd):
    with Run(tmp_path, "train", "demo") as run:
        run.log.info("summary line 42")
        logging.getLogger("fastif.training").info("detail line 43")
        logging.getLogger("fastif.training").warning("warning line 44")
    log_text = (run.dir / "train.log").read_text()
    assert "summary line 42" in log_text and "detail line 43" in log_text and "warning line 44" in log_text
    console = capfd.readouterr().err
    assert "summary line 42" in console and "warning line 44" in console
    assert "detail line 43" not in console
    # Handlers are gone after the run.
    logging.getLogger("fastif.training").info("after the run")
    assert "after the run" not in (run.dir / "train.log").read_text()


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "deep" / "report.md"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]

    pd = pytest.importorskip("pandas")
    with Run(tmp_path, "influence", "demo") as run:
        run.write_json("summary.json", {"n": 2})
        run.write_parquet("table.parquet", pd.DataFrame({"train_id": ["a", "b"], "influence": [-1.5, 2.0]}))
    assert json.loads((run.dir / "summary.json").read_text()) == {"n": 2}
    table = pd.read_parquet(run.dir / "table.parquet")
    assert table["influence"].tolist() == [-1.5, 2.0]
    assert not [p for p in run.dir.iterdir() if p.name.endswith(".tmp")]


def test_progress_bars_follow_the_environment(monkeypatch):
    monkeypatch.setenv("FASTIF_PROGRESS", "0")
    assert progress_enabled() is False
    monkeypatch.setenv("FASTIF_PROGRESS", "1")
    assert progress_enabled() is True


# ----------------------------------------------------------------------------- other processes

HOLD_RUN = textwrap.dedent(
    """
    import sys, time
    from fastif.runs import Run
    with Run(sys.argv[1], "train", "demo", folder=sys.argv[2]) as run:
        print("ready", flush=True)
        time.sleep(60)
    """
)


def start_holder(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    folder = tmp_path / "held"
    process = subprocess.Popen([sys.executable, "-c", HOLD_RUN, str(tmp_path), str(folder)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    return process, folder


def test_another_process_is_refused_with_its_pid(tmp_path):
    process, folder = start_holder(tmp_path)
    try:
        with pytest.raises(RunError, match=rf"in use by another process \(pid {process.pid}\)"):
            with Run(tmp_path, "train", "demo", folder=folder):
                pass
    finally:
        process.kill()
        process.wait()


def test_sigkill_leaves_the_run_running_never_complete(tmp_path):
    process, folder = start_holder(tmp_path)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_manifest(folder)["status"] == "running"
    assert latest_complete(tmp_path, "train", "demo") is None
    # The kernel released the lock with the process, but the folder is still never reused.
    with pytest.raises(RunError, match="already holds a run"):
        with Run(tmp_path, "train", "demo", folder=folder):
            pass


def test_sigterm_marks_the_run_failed(tmp_path):
    process, folder = start_holder(tmp_path)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    manifest = read_manifest(folder)
    assert process.returncode != 0
    assert manifest["status"] == "failed"
    assert "SIGTERM" in manifest["error"]["message"]
    assert latest_complete(tmp_path, "train", "demo") is None


def test_a_killed_run_is_found_and_resumed_with_the_same_config(tmp_path):
    config = {"experiment_name": "demo", "seed": 0}
    code = textwrap.dedent(
        """
        import sys, time
        from fastif.runs import Run
        with Run(sys.argv[1], "influence", "demo", config={"experiment_name": "demo", "seed": 0}) as run:
            run.write_text("chunk_0.txt", "done")
            print(run.dir, flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    folder = Path(process.stdout.readline().strip())
    assert unfinished_runs(tmp_path, "influence", "demo") == []  # alive: not a candidate
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert unfinished_runs(tmp_path, "influence", "demo", config_sha256(config)) == [folder]
    assert unfinished_runs(tmp_path, "influence", "demo", config_sha256({**config, "seed": 1})) == []
    with pytest.raises(RunError, match="another config"):
        with Run(tmp_path, "influence", "demo", config={**config, "seed": 1}, folder=folder, resume=True):
            pass
    with Run(tmp_path, "influence", "demo", config=config, folder=folder, resume=True) as run:
        assert (run.dir / "chunk_0.txt").read_text() == "done"  # earlier work is kept
    manifest = read_manifest(folder)
    assert manifest["status"] == "complete"
    assert [r["previous_status"] for r in manifest["resumptions"]] == ["running"]  # the refusal changed nothing
    assert (tmp_path / "influence" / "demo" / "latest").resolve() == folder
    with pytest.raises(RunError, match="already complete"):
        with Run(tmp_path, "influence", "demo", config=config, folder=folder, resume=True):
            pass


def test_follower_processes_of_a_torchrun_job_make_no_run_folder(tmp_path, capfd):
    with Run(tmp_path, "influence", "demo", primary=False) as follower:
        follower.log.info("rank 1 summary")
        follower.write_json("scratch.json", {"rank": 1})
        scratch = follower.dir
    assert not scratch.exists()
    assert not (tmp_path / "influence").exists()
    assert "rank 1 summary" not in capfd.readouterr().err
