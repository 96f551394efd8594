"""The commands of the ``fastif`` command line: registry and the settings they share.

Contract of a command module (``fastif/commands/<name>.py``):

- ``SCHEMA``: the dataclass its composed config must match (a subclass of
  :class:`ExperimentSettings`, adding the command's own sections). The YAML
  ``configs/<name>.yaml`` starts its defaults list with ``schema_<name>``, the name under which
  :func:`register_schema` stores ``SCHEMA`` in Hydra's ConfigStore.
- ``execute(settings, run) -> None``: does the work inside an open :class:`fastif.runs.Run`;
  bad input raises a :class:`fastif.errors.FastifError` naming the problem and the fix. Under
  ``torchrun`` every rank executes; only rank 0's ``run`` is the job's run folder (the others
  get a private scratch folder), so write results from rank 0.
- optional ``resume_folder(settings, config_hash) -> Path | None``: an unfinished run folder to
  continue instead of starting a new one (e.g. the newest of
  :func:`fastif.runs.unfinished_runs` with the same config hash); ``None`` starts a new run.
- Importing the module must stay cheap (no torch at module level): ``fastif <command> --help``
  imports it to learn the schema. Import heavy libraries inside ``execute``.

This package imports neither torch nor the command modules: ``fastif --help`` reads only
:data:`COMMANDS`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from types import ModuleType

from fastif.config import DataConfig, HvpConfig, KnnConfig, ModelConfig, PathsConfig, TrainConfig
from fastif.errors import ConfigError, FastifError


@dataclass(frozen=True)
class Command:
    name: str  # as typed on the command line
    module: str  # the module with SCHEMA and execute()
    summary: str  # one line for `fastif --help`

    @property
    def config_name(self) -> str:
        """Name of the YAML file under configs/ (and of the Hydra job)."""
        return self.name.replace("-", "_")

    @property
    def schema_name(self) -> str:
        return f"schema_{self.config_name}"

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command("train", "fastif.commands.train",
                "Fine-tune a sequence classifier (default: the embedded demo tiny BERT); saves the model and metrics."),
        Command("index", "fastif.commands.index",
                "Build the kNN candidate index over the training pool's model features; audit its recall."),
        Command("hvp-calibrate", "fastif.commands.hvp_calibrate",
                "Measure speed vs quality of inverse-HVP settings and recommend one for influence."),
        Command("influence", "fastif.commands.influence",
                "Most helpful and most harmful training examples for chosen test points (kNN + inverse HVP)."),
        Command("finetune-correct", "fastif.commands.finetune_correct",
                "Fine-tune on the training examples most helpful to the model's errors; measure the correction."),
        Command("simulate", "fastif.commands.simulate",
                "Simulatability: one SGD step of a simulator on helpful vs random vs harmful training points."),
        Command("visualize", "fastif.commands.visualize",
                "Draw influence runs: interaction graph, histograms per group, top-k lists; one offline report.html."),
    )
}

_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass
class ExperimentSettings:
    """What every command composes: the experiment's model, data, training recipe, HVP and kNN settings.

    An experiment file (``configs/experiment/<name>.yaml``) fills these groups; commands add
    their own sections in subclasses.
    """

    experiment_name: str = field(default="demo", metadata={"help": "Name of the experiment (set by experiment=...); names the run folders outputs/<command>/<experiment_name>/."})
    seed: int = field(default=0, metadata={"help": "Seed of model initialisation, data order and sampling."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present, else CPU), cpu, cuda or cuda:<i>."})
    cpu_threads: int = field(default=0, metadata={"help": "Threads of torch's CPU operations; 0 = torch's default (one per core). Small models run best with 1."})
    paths: PathsConfig = field(default_factory=PathsConfig, metadata={"help": "Where run folders go."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The classifier (group model=...)."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Datasets and splits (group data=...)."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Fine-tuning recipe."})
    hvp: HvpConfig = field(default_factory=HvpConfig, metadata={"help": "Inverse Hessian-vector product solver (group hvp=...)."})
    knn: KnnConfig = field(default_factory=KnnConfig, metadata={"help": "kNN candidate prefilter (group knn=...)."})

    def __post_init__(self) -> None:
        if not _EXPERIMENT_NAME.match(self.experiment_name):
            raise ConfigError(f"Invalid config value for 'experiment_name': '{self.experiment_name}' cannot name a folder. "
                              f"Fix: use letters, digits, '_', '.' and '-' only, e.g. experiment_name=my_run.")
        if not _DEVICE.match(self.device):
            raise ConfigError(f"Invalid config value for 'device': got '{self.device}'. "
                              f"Fix: use device=auto, device=cpu, device=cuda or device=cuda:0.")
        if self.cpu_threads < 0:
            raise ConfigError(f"Invalid config value for 'cpu_threads': got {self.cpu_threads}, need >= 0. "
                              f"Fix: e.g. cpu_threads=0 (torch's default) or cpu_threads=1.")
        if self.seed < 0:
            raise ConfigError(f"Invalid config value for 'seed': got {self.seed}, need >= 0. Fix: e.g. seed=0.")


def register_schema(command: Command, schema: type) -> None:
    """Store a command's schema in Hydra's ConfigStore as ``schema_<config_name>``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=command.schema_name, node=schema)


def field_help(schema: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, help text) for every documented field of a schema, nested sections included."""
    rows: list[tuple[str, str]] = []
    for item in dataclasses.fields(schema):
        key = f"{prefix}{item.name}"
        nested = item.type if isinstance(item.type, type) else _resolve_type(schema, item)
        if nested is not None and dataclasses.is_dataclass(nested):
            rows.extend(field_help(nested, prefix=f"{key}."))
        elif item.metadata.get("help"):
            rows.append((key, item.metadata["help"]))
    return rows


def _resolve_type(schema: type, item: dataclasses.Field):
    # Field types are strings under `from __future__ import annotations`; the default tells the type.
    if item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = item.default_factory()  # type: ignore[misc]
        return type(value) if dataclasses.is_dataclass(value) else None
    return None


def not_implemented(command: str, issue: int) -> None:
    """The body of a command that a later issue fills in."""
    raise FastifError(f"'fastif {command}' is not implemented yet (it arrives with issue {issue}); "
                      f"its config composes and validates (try 'fastif {command} --cfg job'). "
                      f"Fix: run 'fastif train' for now, or update fastif.")
