"""The ``fastif`` command line: ``fastif <command> [hydra overrides...]``.

``main`` takes the command name off the argument list and hands the rest to a Hydra app whose
primary config is ``configs/<command>.yaml`` (read from the installed package as
``pkg://fastif.configs``), so every Hydra feature works per command: ``key=value`` overrides,
config groups (``experiment=...``), ``-m`` sweeps, ``--cfg job``, ``--help``.

The composed config is validated against the command's dataclass schema before any run folder
exists; the command then runs inside a :class:`fastif.runs.Run`. A
:class:`fastif.errors.FastifError` is printed as one paragraph, without a traceback.

Importing this module must not import torch (``fastif --help`` stays fast); command modules are
imported only for the command that runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fastif import __version__
from fastif.commands import COMMANDS, Command, field_help, register_schema
from fastif.config import to_settings
from fastif.errors import ConfigError, FastifError
from fastif.runs import (TIMESTAMP_FORMAT, Run, RunTerminated, claim_unique_dir, config_sha256, local_now,
                         progress_enabled)

CONFIG_MODULE = "fastif.configs"


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"fastif {__version__}: FastIF influence functions (which training examples caused a prediction).",
        "",
        "Usage: fastif <command> [KEY=VALUE ...] [GROUP=OPTION ...] [-m] [--cfg job] [--help]",
        "",
        "Commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
        "",
        "Run 'fastif <command> --help' for its config groups and fields.",
        "Results go to ${FASTIF_OUTPUTS:-./outputs}/<command>/<experiment>/<timestamp>/.",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    if args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if args[0] in ("-V", "--version"):
        print(f"fastif {__version__}")
        return
    command = COMMANDS.get(args[0])
    if command is None:
        _unknown_command(args[0])
    module = command.load()
    register_schema(command, module.SCHEMA)
    # Hydra reads sys.argv; argparse takes the program name for its usage lines from argv[0].
    sys.argv = [f"fastif {command.name}", *args[1:]]
    _hydra_app(command)()


def _unknown_command(name: str) -> NoReturn:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    _print_error("fastif", f"unknown command '{name}'.{hint} Valid commands: {', '.join(COMMANDS)}. "
                           f"Run 'fastif --help' for what each does.")
    sys.exit(2)


def config_source() -> str:
    """Where Hydra reads the configs: the installed ``fastif.configs`` package, or, when fastif is
    imported from a source checkout (``python -m fastif`` in the repository root shadows the
    installed package), the checkout's top-level ``configs/`` folder."""
    import importlib.util

    try:
        if importlib.util.find_spec(CONFIG_MODULE) is not None:
            return f"pkg://{CONFIG_MODULE}"
    except ModuleNotFoundError:
        pass
    checkout = Path(__file__).resolve().parent.parent / "configs"
    return str(checkout)  # an absolute path: Hydra reads it as a folder


def _hydra_app(command: Command):
    import hydra

    @hydra.main(version_base=None, config_path=config_source(), config_name=command.config_name)
    def app(cfg: DictConfig) -> None:
        run_command(command, cfg)

    return app


def run_command(command: Command, cfg: DictConfig) -> None:
    """Validate a composed config and execute the command in a new run folder (the Hydra task)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    module = command.load()
    if not progress_enabled():
        # Hugging Face libraries draw their own bars (loading, saving); read at their import.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        settings = validate(cfg, module.SCHEMA)
        if settings.cpu_threads > 0:
            import torch

            torch.set_num_threads(settings.cpu_threads)
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        config = OmegaConf.to_container(cfg, resolve=True)
        primary = torchrun_rank() == 0  # one run folder per job, written by rank 0
        folder = hydra_cfg.runtime.output_dir if multirun else None
        # A command may continue an unfinished run instead of starting a new one (its choice).
        resume_folder = getattr(module, "resume_folder", None)
        resumed = resume_folder(settings, config_sha256(config)) if primary and resume_folder else None
        with Run(
            settings.paths.outputs,
            command.name,
            settings.experiment_name,
            config=config,
            overrides=list(hydra_cfg.overrides.task),
            seed=settings.seed,
            device=settings.device,
            folder=resumed if resumed is not None else folder,
            resume=resumed is not None,
            primary=primary,
        ) as run:
            choices = {group: option for group, option in hydra_cfg.runtime.choices.items()
                       if not group.startswith("hydra") and option is not None}
            run.annotate(config_choices=choices)
            module.execute(settings, run)
    except FastifError as error:
        _print_error(f"fastif {command.name}", str(error))
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        _print_error(f"fastif {command.name}", "interrupted (a run in progress is marked failed).")
        sys.exit(128 + signal.SIGINT)
    except RunTerminated as terminated:
        _print_error(f"fastif {command.name}", f"{terminated}; the run is marked failed.")
        sys.exit(128 + terminated.signum)


def torchrun_rank() -> int:
    """This process's rank in a torchrun job (0 outside torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    return int(os.environ.get("RANK", "0"))


def validate(cfg: DictConfig, schema: type):
    """The composed config as validated schema objects (ConfigError naming the key otherwise)."""
    try:
        settings = to_settings(cfg, schema)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"Invalid config at '{key}': {_first_line(error)}. "
                          f"Fix: set it on the command line (e.g. {key}=...) or in the experiment file; "
                          f"'--cfg job' shows the composed config.") from None
    unknown = _unknown_keys(settings)
    if unknown:
        raise ConfigError(f"Unknown config key(s): {', '.join(unknown)} (not in the {schema.__name__} schema). "
                          f"Fix: check the spelling or remove them; '--help' lists every key.")
    return settings


def _unknown_keys(settings: object, prefix: str = "") -> list[str]:
    # OmegaConf.to_object sets keys added with '+key=value' as extra attributes: find them.
    known = {item.name for item in dataclasses.fields(settings)}
    unknown = [f"{prefix}{name}" for name in vars(settings) if name not in known and not name.startswith("_")]
    for name in known:
        value = getattr(settings, name)
        if dataclasses.is_dataclass(value):
            unknown.extend(_unknown_keys(value, prefix=f"{prefix}{name}."))
    return unknown


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__


def _print_error(prefix: str, message: str) -> None:
    text = f"{prefix}: error: {message}"
    print(textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False), file=sys.stderr)


# ----------------------------------------------------------------------------- resolvers used by configs/


def _claim_sweep_dir(outputs: str, command: str, experiment: str) -> str:
    """A fresh multirun folder (claimed with an exclusive mkdir, so concurrent sweeps never share one)."""
    parent = os.path.join(os.path.abspath(os.path.expanduser(str(outputs))), str(command), str(experiment), "multirun")

    return str(claim_unique_dir(Path(parent), local_now().strftime(TIMESTAMP_FORMAT)))


def _command_summary(name: str) -> str:
    return COMMANDS[name].summary


def _field_reference(name: str) -> str:
    rows = field_help(COMMANDS[name].load().SCHEMA)
    width = max((len(key) for key, _ in rows), default=0)
    # The help template goes through string.Template: a literal '$' must be doubled.
    return "\n".join(f"  {key:<{width}}  {text}".replace("$", "$$") for key, text in rows)


# Cached: Hydra copies the master config's resolver cache into every sweep job, so all jobs of
# one sweep share the folder claimed once.
OmegaConf.register_new_resolver("fastif.sweep_dir", _claim_sweep_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("fastif.summary", _command_summary, replace=True)
OmegaConf.register_new_resolver("fastif.field_help", _field_reference, replace=True)


if __name__ == "__main__":  # pragma: no cover
    main()
