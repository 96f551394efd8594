"""Versioned run folders: one folder per run, a manifest that says what happened, atomic writes.

Layout (``outputs`` is ``paths.outputs``)::

    <outputs>/<command>/<experiment>/<YYYY-MM-DD_HH-MM-SS>[_<n>]/      single runs
    <outputs>/<command>/<experiment>/multirun/<timestamp>[_<n>]/<job>/  jobs of a Hydra sweep
    <outputs>/<command>/<experiment>/latest -> newest *complete* run

Each run folder holds ``.hydra/config.yaml`` (the resolved config), ``.hydra/overrides.yaml``,
``<command>.log`` (all logging of the run), ``manifest.json`` (versions, device, seed, config
hash, times, status running/complete/failed, every input read with its content hash) and the
command's results. Folders are claimed with an exclusive ``mkdir``, so runs never overwrite each
other; a ``flock`` on ``<run>/.lock`` keeps a second process out of a folder in use.

Only the standard library is imported here (pandas lazily): the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

try:  # flock is POSIX-only; elsewhere runs are simply not locked.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from fastif.errors import RunError

TIMESTAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
LATEST = "latest"
SUMMARY_LOGGER = "fastif.run"
FILE_ONLY = "fastif_file_only"  # logging `extra` key: keep a record out of the console

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"

Clock = Callable[[], _dt.datetime]


def local_now() -> _dt.datetime:
    return _dt.datetime.now().astimezone()


# ----------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------- hashing


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_sha256(path: str | os.PathLike) -> tuple[str, int, int]:
    """Hash over the relative paths and contents of every file below ``path``.

    Returns (hex digest, number of files, total bytes). Hidden lock/temp files are skipped.
    """
    root = Path(path)
    digest = hashlib.sha256()
    n_files = 0
    n_bytes = 0
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not _is_scratch(p.name)):
        relative = file.relative_to(root).as_posix()
        digest.update(relative.encode("utf-8") + b"\0")
        digest.update(file_sha256(file).encode("ascii") + b"\n")
        n_files += 1
        n_bytes += file.stat().st_size
    return digest.hexdigest(), n_files, n_bytes


def _is_scratch(name: str) -> bool:
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(".tmp"))


def config_sha256(config: dict) -> str:
    """sha256 of a resolved config without ``paths`` and ``resume``: where results go, and which
    unfinished run they continue, is not what they are."""
    content = {key: value for key, value in config.items() if key not in ("paths", "resume")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def frame_sha256(frame) -> str:
    """Content fingerprint of a pandas DataFrame (values, column names and order)."""
    import pandas as pd

    row_hashes = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(row_hashes.tobytes())
    digest.update(json.dumps([str(c) for c in frame.columns]).encode("utf-8"))
    return digest.hexdigest()


# ----------------------------------------------------------------------------- environment facts


def progress_enabled() -> bool:
    """Progress bars only for a person watching: stderr is a terminal (FASTIF_PROGRESS=0/1 forces)."""
    forced = os.environ.get("FASTIF_PROGRESS")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def package_versions() -> dict[str, str]:
    """Versions of the libraries results depend on, read from package metadata (no imports)."""
    from importlib import metadata

    versions: dict[str, str] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy", "pandas", "hydra-core", "omegaconf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    versions["faiss"] = _faiss_version()
    return versions


def _faiss_version() -> str:
    from importlib import metadata

    for dist in metadata.packages_distributions().get("faiss", []):
        try:
            return f"{metadata.version(dist)} ({dist})"
        except metadata.PackageNotFoundError:
            continue
    import importlib.util

    if importlib.util.find_spec("faiss") is None:
        return "absent"
    try:  # faiss built from source or from conda carries no pip metadata
        import faiss

        return str(getattr(faiss, "__version__", "unknown"))
    except Exception:  # a broken faiss install must not stop a run
        return "unimportable"


def source_revision() -> dict[str, Any]:
    """Git commit of the code that runs, when it is a tracked checkout (None otherwise)."""
    package_dir = Path(__file__).resolve().parent

    def git(*args: str) -> Optional[str]:
        try:
            result = subprocess.run(
                ["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    # An installed copy inside some repo's venv is not that repo's code: require tracked files.
    if git("ls-files", "--error-unmatch", "runs.py") is None:
        return {"git_commit": None, "git_dirty": None}
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def fastif_version() -> str:
    from fastif import __version__

    return __version__


# ----------------------------------------------------------------------------- run folders


class RunTerminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM during a run.

    A BaseException (like KeyboardInterrupt) so that generic ``except Exception`` blocks in
    libraries do not swallow it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")


_active_runs: list["Run"] = []


class Run:
    """A versioned run folder, used as a context manager around the work of one command.

    On enter: claims ``<outputs>/<command>/<experiment>/<timestamp>[_n]/`` (or ``folder``, e.g. a
    Hydra multirun job directory), locks it, writes ``.hydra/`` and ``manifest.json`` (status
    running) and sends all logging to ``<command>.log``. On exit: status complete (and ``latest``
    moves here) or failed with the error; SIGTERM and Ctrl-C count as failed. A process killed
    with SIGKILL leaves status running.

    ``resume=True`` continues the unfinished run in ``folder`` (status running after a kill, or
    failed), if it has the same config hash; its manifest keeps the original start and lists each
    resumption. ``primary=False`` is for the other processes of a ``torchrun`` job (rank > 0): they
    get a private temporary folder, deleted on exit, so one job makes one run folder.
    ``clock`` exists for tests (two runs in the same second).
    """

    def __init__(
        self,
        outputs: str | os.PathLike,
        command: str,
        experiment: str,
        *,
        config: Optional[dict] = None,
        overrides: Iterable[str] = (),
        seed: Optional[int] = None,
        device: Optional[str] = None,
        folder: Optional[str | os.PathLike] = None,
        resume: bool = False,
        primary: bool = True,
        clock: Clock = local_now,
    ):
        self.outputs = Path(outputs).expanduser().absolute()
        self.command = command
        self.experiment = experiment
        self.config = config
        self.overrides = list(overrides)
        self.seed = seed
        self.device = device
        self._folder = Path(folder).expanduser().absolute() if folder is not None else None
        if resume and self._folder is None:
            raise ValueError("resume=True needs the folder of the run to resume")
        self.resume = resume
        self.primary = primary
        self._clock = clock
        self.dir: Path = Path()  # set on enter
        self.manifest: dict[str, Any] = {}
        self.log = logging.getLogger(f"{SUMMARY_LOGGER}.{command}")
        self._lock_handle = None
        self._handlers: list[logging.Handler] = []
        self._saved_root_level: Optional[int] = None
        self._saved_sigterm: Any = None
        self._captured_warnings = False

    # -- public API -----------------------------------------------------------------------

    @property
    def experiment_dir(self) -> Path:
        return self.outputs / self.command / self.experiment

    @property
    def status(self) -> str:
        return self.manifest.get("status", "")

    def record_input(self, path: str | os.PathLike, role: str) -> dict:
        """Hash an input artefact (file or directory) into the manifest; returns its entry."""
        source = Path(path).expanduser().absolute()
        if source.is_file():
            entry = {"role": role, "path": str(source), "kind": "file", "sha256": file_sha256(source),
                     "bytes": source.stat().st_size}
        elif source.is_dir():
            digest, n_files, n_bytes = directory_sha256(source)
            entry = {"role": role, "path": str(source), "kind": "directory", "sha256": digest,
                     "files": n_files, "bytes": n_bytes}
        else:
            raise RunError(f"Input '{source}' ({role}) does not exist, so it cannot be recorded. "
                           f"Fix: check the path in the config.")
        self.manifest["inputs"] = [i for i in self.manifest["inputs"] if i["path"] != entry["path"] or i["role"] != role]
        self.manifest["inputs"].append(entry)
        self._write_manifest()
        logging.getLogger("fastif.runs").info("input %s: %s (sha256 %s)", role, source, entry["sha256"][:12])
        return entry

    def annotate(self, **fields: Any) -> None:
        """Add facts to the manifest (e.g. the resolved device, a sign convention, data fingerprints)."""
        reserved = {"status", "started_at", "ended_at", "error", "inputs"}
        clash = reserved.intersection(fields)
        if clash:
            raise ValueError(f"manifest fields {sorted(clash)} are managed by Run")
        self.manifest.update(fields)
        self._write_manifest()

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.dir / name, obj)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.dir / name, text)

    def write_parquet(self, name: str, frame) -> Path:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return atomic_write_bytes(self.dir / name, buffer.getvalue())

    # -- context manager --------------------------------------------------------------------

    def __enter__(self) -> "Run":
        started = self._clock()
        if not self.primary:
            self.dir = Path(tempfile.mkdtemp(prefix=f"fastif-{self.command}-follower-"))
        else:
            self.dir = self._folder if self._folder is not None else self._claim_folder(started)
        try:
            self._lock()
            if self.resume:
                self.manifest = self._resumed_manifest(started)
            elif (self.dir / MANIFEST).exists():
                raise RunError(f"Run folder {self.dir} already holds a run; runs never overwrite each other. "
                               f"Fix: start a new run (without an explicit folder).")
            else:
                self.manifest = self._initial_manifest(started)
            self._write_hydra_files()
            self._write_manifest()
            self._start_logging()
            self._install_sigterm()
        except BaseException:
            self._release()
            raise
        _active_runs.append(self)
        if self.primary:
            self.log.info("%s %s", "resuming the run in" if self.resume else "run folder", self.dir)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        ended = self._clock()
        try:
            self.manifest["ended_at"] = ended.isoformat()
            self.manifest["seconds"] = round((ended - _parse_time(self.manifest["started_at"])).total_seconds(), 3)
            if exc is None:
                self.manifest["status"] = STATUS_COMPLETE
                self._write_manifest()
                if self.primary:
                    self.log.info("complete in %.1f s: %s", self.manifest["seconds"], self.dir)
                    self._point_latest_here()
            else:
                self.manifest["status"] = STATUS_FAILED
                self.manifest["error"] = {"type": exc_type.__name__, "message": _error_message(exc)}
                self._write_manifest()
                # File only: the command line prints the error itself, once.
                logging.getLogger("fastif.runs").error(
                    "run failed: %s: %s", exc_type.__name__, _error_message(exc),
                    exc_info=(exc_type, exc, tb), extra={FILE_ONLY: True})
        finally:
            if self in _active_runs:
                _active_runs.remove(self)
            self._release()
            if not self.primary:
                shutil.rmtree(self.dir, ignore_errors=True)
        return False

    # -- internals --------------------------------------------------------------------------

    def _claim_folder(self, started: _dt.datetime) -> Path:
        return claim_unique_dir(self.experiment_dir, started.strftime(TIMESTAMP_FORMAT))

    def _lock(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.dir / LOCK_FILE, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise RunError(f"Run folder {self.dir} is in use by another process (pid {owner}). "
                               f"Fix: wait for that process to finish, or start a new run.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def _write_hydra_files(self) -> None:
        if self.config is None:
            return
        from omegaconf import OmegaConf

        hydra_dir = self.dir / ".hydra"
        atomic_write_text(hydra_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(self.config)))
        atomic_write_text(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(self.overrides)))

    def _initial_manifest(self, started: _dt.datetime) -> dict[str, Any]:
        return {
            "command": self.command,
            "experiment": self.experiment,
            "run_dir": str(self.dir),
            "status": STATUS_RUNNING,
            "error": None,
            "started_at": started.isoformat(),
            "ended_at": None,
            "seconds": None,
            "fastif_version": fastif_version(),
            **source_revision(),
            "versions": package_versions(),
            "device": self.device,
            "seed": self.seed,
            "config_sha256": config_sha256(self.config) if self.config is not None else None,
            "overrides": self.overrides,
            "argv": list(sys.argv),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "inputs": [],
        }

    def _resumed_manifest(self, started: _dt.datetime) -> dict[str, Any]:
        previous = _read_manifest(self.dir)
        if previous is None:
            raise RunError(f"Cannot resume {self.dir}: it holds no readable {MANIFEST}. "
                           f"Fix: point resume to an unfinished run folder, or start a new run.")
        if previous.get("status") == STATUS_COMPLETE:
            raise RunError(f"Cannot resume {self.dir}: that run is already complete. Fix: start a new run.")
        expected = config_sha256(self.config) if self.config is not None else None
        if expected is not None and previous.get("config_sha256") not in (None, expected):
            raise RunError(f"Cannot resume {self.dir}: it was started with another config "
                           f"(config hash {str(previous.get('config_sha256'))[:12]}, now {expected[:12]}). "
                           f"Fix: resume with the same overrides as that run (see its .hydra/overrides.yaml), "
                           f"or start a new run.")
        manifest = dict(previous)
        manifest["resumptions"] = list(previous.get("resumptions", [])) + [
            {"at": started.isoformat(), "pid": os.getpid(), "previous_status": previous.get("status"),
             "previous_error": previous.get("error")}]
        manifest.update(status=STATUS_RUNNING, error=None, ended_at=None, seconds=None, pid=os.getpid(),
                        argv=list(sys.argv), overrides=self.overrides, versions=package_versions(),
                        **source_revision())
        return manifest

    def _write_manifest(self) -> None:
        atomic_write_json(self.dir / MANIFEST, self.manifest)

    def _start_logging(self) -> None:
        root = logging.getLogger()
        self._saved_root_level = root.level
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        file_handler = logging.FileHandler(self.dir / f"{self.command}.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file_handler.setLevel(logging.DEBUG)
        self._handlers.append(file_handler)
        if not _active_runs:  # an enclosing run already prints to the console
            console = logging.StreamHandler(sys.stderr)
            console.addFilter(_summary_or_warning if self.primary else _warning_only)
            console.setFormatter(_ConsoleFormatter(self.command))
            self._handlers.append(console)
            warnings_were_captured = getattr(logging, "_warnings_showwarning", None) is not None
            if not warnings_were_captured:
                logging.captureWarnings(True)
                self._captured_warnings = True
        for handler in self._handlers:
            root.addHandler(handler)

    def _install_sigterm(self) -> None:
        if _active_runs or threading.current_thread() is not threading.main_thread():
            return

        def terminate(signum, frame):
            raise RunTerminated(signum)

        self._saved_sigterm = signal.signal(signal.SIGTERM, terminate)

    def _release(self) -> None:
        if self._saved_sigterm is not None:
            signal.signal(signal.SIGTERM, self._saved_sigterm)
            self._saved_sigterm = None
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
            handler.close()
        self._handlers.clear()
        if self._captured_warnings:
            logging.captureWarnings(False)
            self._captured_warnings = False
        if self._saved_root_level is not None:
            root.setLevel(self._saved_root_level)
            self._saved_root_level = None
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing releases the flock
            self._lock_handle = None

    def _point_latest_here(self) -> None:
        """Switch ``latest`` to this run unless a newer complete run already holds it."""
        link = self.experiment_dir / LATEST
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.experiment_dir / ".latest.lock"):
            current = _read_manifest(link) if link.is_symlink() else None
            if current is not None and current.get("status") == STATUS_COMPLETE:
                if _run_order(current) > _run_order(self.manifest):
                    return
            target = os.path.relpath(self.dir, self.experiment_dir)
            tmp = self.experiment_dir / f".{LATEST}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(target, tmp, target_is_directory=True)
            os.replace(tmp, link)


def claim_unique_dir(parent: Path, stem: str) -> Path:
    """Create ``parent/stem`` exclusively, or ``stem_1``, ``stem_2``, ... if taken (never reuses)."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(0, 10_000):
            candidate = parent / (stem if n == 0 else f"{stem}_{n}")
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            return candidate
    except OSError as error:
        raise RunError(f"Cannot create a run folder under {parent} ({error.strerror or error}). "
                       f"Fix: set paths.outputs=... (or the environment variable FASTIF_OUTPUTS) "
                       f"to a writable folder.") from None
    raise RunError(f"Could not create a new run folder under {parent}: 10000 folders named {stem}* exist. "
                   f"Fix: clean up {parent}.")


def latest_complete(outputs: str | os.PathLike, command: str, experiment: str) -> Optional[Path]:
    """The newest complete run folder of ``command``/``experiment`` (None if there is none).

    Follows the ``latest`` link; if it is missing or stale, scans the run folders' manifests.
    """
    experiment_dir = Path(outputs).expanduser().absolute() / command / experiment
    link = experiment_dir / LATEST
    if link.is_symlink():
        manifest = _read_manifest(link)
        if manifest is not None and manifest.get("status") == STATUS_COMPLETE:
            return link.resolve()
    best: Optional[tuple[tuple, Path]] = None
    for manifest_path in list(experiment_dir.glob(f"*/{MANIFEST}")) + list(experiment_dir.glob(f"multirun/*/*/{MANIFEST}")):
        if manifest_path.parent.is_symlink():
            continue
        manifest = _read_manifest(manifest_path.parent)
        if manifest is None or manifest.get("status") != STATUS_COMPLETE:
            continue
        key = _run_order(manifest)
        if best is None or key > best[0]:
            best = (key, manifest_path.parent.resolve())
    return best[1] if best else None


def unfinished_runs(outputs: str | os.PathLike, command: str, experiment: str,
                    config_hash: Optional[str] = None) -> list[Path]:
    """Run folders of ``command``/``experiment`` that stopped before completing (newest first).

    Status running (the process was killed) or failed, no live process holding the folder, and,
    when ``config_hash`` is given, the same config hash: candidates for ``Run(resume=True)``.
    """
    experiment_dir = Path(outputs).expanduser().absolute() / command / experiment
    found = []
    for manifest_path in list(experiment_dir.glob(f"*/{MANIFEST}")) + list(experiment_dir.glob(f"multirun/*/*/{MANIFEST}")):
        folder = manifest_path.parent
        manifest = _read_manifest(folder)
        if folder.is_symlink() or manifest is None or manifest.get("status") not in (STATUS_RUNNING, STATUS_FAILED):
            continue
        if config_hash is not None and manifest.get("config_sha256") != config_hash:
            continue
        if _is_locked(folder):
            continue
        found.append((_run_order(manifest), folder.resolve()))
    return [folder for _, folder in sorted(found, reverse=True)]


def _is_locked(folder: Path) -> bool:
    if fcntl is None or not (folder / LOCK_FILE).exists():
        return False
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a run folder (RunError if it has none)."""
    manifest = _read_manifest(Path(run_dir))
    if manifest is None:
        raise RunError(f"{run_dir} is not a fastif run folder (no readable {MANIFEST}). "
                       f"Fix: point to a folder under outputs/<command>/<experiment>/.")
    return manifest


def _read_manifest(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        with open(run_dir / MANIFEST, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _run_order(manifest: dict[str, Any]) -> tuple:
    return (_parse_time(manifest["started_at"]).timestamp(), _folder_sequence(manifest.get("run_dir", "")))


def _folder_sequence(run_dir: str) -> tuple:
    """Order of folders claimed in the same second: stem < stem_1 < stem_2 ..."""
    name = Path(run_dir).name
    if name.isdigit():  # multirun job number
        return ("", int(name))
    stem, _, suffix = name.rpartition("_")
    if stem and suffix.isdigit():
        return (stem, int(suffix))
    return (name, 0)


def _parse_time(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text)


def _error_message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return text or "interrupted (KeyboardInterrupt)"
    return text or exc.__class__.__name__


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _warning_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING and not getattr(record, FILE_ONLY, False)


def _summary_or_warning(record: logging.LogRecord) -> bool:
    if getattr(record, FILE_ONLY, False):
        return False
    if record.levelno >= logging.WARNING:
        return True
    return record.levelno >= logging.INFO and (record.name == SUMMARY_LOGGER or record.name.startswith(SUMMARY_LOGGER + "."))


class _ConsoleFormatter(logging.Formatter):
    def __init__(self, command: str):
        super().__init__()
        self.prefix = f"[fastif {command}]"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{self.prefix} {record.levelname}: {record.name}: {message}"
        return f"{self.prefix} {message}"
