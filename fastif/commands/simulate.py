"""`fastif simulate`: FastIF's simulatability study of the influential training points.

Steps: find the influence run (``simulate.source.run``: the latest complete ``fastif influence``
run of the experiment, a run folder, or ``new``; when there is none it computes one now, in its
own influence run folder, over random test points so that correct and incorrect predictions both
occur), load the task model, build the simulator (a copy of the task model, or a model trained on
the task model's predictions), and for each test point take one SGD step of the simulator on its
top-m helpful, top-m harmful and m random training points over a grid of learning rates,
measuring the simulator's loss on the test input labelled with the task model's prediction.
Outputs: ``simulate.parquet`` (one row per test point, arm and learning rate), ``simulate.png``
and ``summary.json``; the summary is also logged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from fastif.commands import ExperimentSettings
from fastif.config import _check
from fastif.runs import Run

SIMULATORS = ("copy", "predictions")


@dataclass
class SimulatorConfig:
    kind: str = field(default="copy", metadata={"help": "copy (the task model itself) or predictions (a model trained on the training split labelled with the task model's predictions, as in the paper; uses the train recipe)."})
    base: str = field(default="", metadata={"help": "kind=predictions: model the simulator starts from; empty = model.name_or_path (for the demo: a freshly initialised tiny BERT)."})

    def __post_init__(self) -> None:
        _check(self.kind in SIMULATORS, "simulator.kind", f"got '{self.kind}'", "use simulator.kind=copy or simulator.kind=predictions")


@dataclass
class StepConfig:
    m: int = field(default=10, metadata={"help": "Training points per set: top-m helpful, top-m harmful, m random."})
    lr_min: float = field(default=1e-5, metadata={"help": "Smallest learning rate of the one SGD step (the paper: 1e-5)."})
    lr_max: float = field(default=0.0031622776601683794, metadata={"help": "Largest learning rate (the paper: 10^-2.5)."})
    lr_count: int = field(default=20, metadata={"help": "Learning rates, log-spaced in [lr_min, lr_max] (the paper: 50)."})
    params: List[str] = field(default_factory=list, metadata={"help": "Name patterns of the parameters the step updates; empty = model.trainable."})
    seed: int = field(default=0, metadata={"help": "Seed of the random training sets."})

    def __post_init__(self) -> None:
        _check(self.m >= 1, "step.m", f"got {self.m}, need >= 1", "e.g. step.m=10")
        _check(0 < self.lr_min <= self.lr_max, "step.lr_min", f"need 0 < lr_min <= lr_max, got {self.lr_min} and {self.lr_max}",
               "e.g. step.lr_min=1e-5 step.lr_max=0.00316")
        _check(self.lr_count >= 1, "step.lr_count", f"got {self.lr_count}, need >= 1", "e.g. step.lr_count=20")


@dataclass
class SourceConfig:
    run: str = field(default="latest", metadata={"help": "Influence run with the sets: latest (the latest complete `fastif influence` run of the experiment; computed now when there is none), new (always compute one now), or a run folder."})
    split: str = field(default="challenge", metadata={"help": "run=new (or none yet): split of the test points, eval or challenge."})
    n: int = field(default=40, metadata={"help": "run=new (or none yet): random test points (correct and incorrect ones both occur)."})
    seed: int = field(default=0, metadata={"help": "run=new (or none yet): seed of the test-point sample."})

    def __post_init__(self) -> None:
        _check(bool(self.run.strip()), "source.run", "empty string", "use source.run=latest, source.run=new or a run folder")
        _check(self.split in ("eval", "challenge"), "source.split", f"got '{self.split}'", "use source.split=eval or source.split=challenge")
        _check(self.n >= 1, "source.n", f"got {self.n}, need >= 1", "e.g. source.n=40")


@dataclass
class SimulateSettings(ExperimentSettings):
    """Settings of `fastif simulate`."""

    simulator: SimulatorConfig = field(default_factory=SimulatorConfig, metadata={"help": "The model that imitates the task model."})
    step: StepConfig = field(default_factory=StepConfig, metadata={"help": "The one SGD step and its learning-rate grid."})
    source: SourceConfig = field(default_factory=SourceConfig, metadata={"help": "Where the helpful and harmful sets come from."})


SCHEMA = SimulateSettings


def influence_run(settings: SimulateSettings) -> Path:
    """The influence run folder to read: configured, latest complete, or computed now."""
    from fastif.errors import InputError
    from fastif.runs import latest_complete

    outputs = Path(settings.paths.outputs)
    choice = settings.source.run
    if choice not in ("latest", "new"):
        folder = Path(choice).expanduser()
        if not (folder / "influence.parquet").is_file() or not (folder / "tests.parquet").is_file():
            raise InputError(f"'{folder}' is not a finished influence run (no influence.parquet and tests.parquet). "
                             f"Fix: set source.run to a folder under {outputs / 'influence'}, or source.run=latest.")
        return folder
    if choice == "latest":
        latest = latest_complete(outputs, "influence", settings.experiment_name)
        if latest is not None:
            return latest
    return compute_influence(settings)


def compute_influence(settings: SimulateSettings) -> Path:
    """A new influence run (its own run folder) over random test points, keeping the top m per direction."""
    from omegaconf import OmegaConf

    from fastif.commands import influence

    shared = {item.name: getattr(settings, item.name) for item in dataclasses.fields(ExperimentSettings)}
    influence_settings = influence.InfluenceSettings(
        **shared,
        tests=influence.TestSelectionConfig(split=settings.source.split, mode="random", n=settings.source.n, seed=settings.source.seed),
        output=influence.OutputConfig(top_m=settings.step.m),
    )
    with Run(Path(settings.paths.outputs), "influence", settings.experiment_name,
             config=OmegaConf.to_container(OmegaConf.structured(influence_settings)),
             seed=influence_settings.seed, device=influence_settings.device) as run:
        influence.execute(influence_settings, run)
    return run.dir


def execute(settings: SimulateSettings, run: Run) -> None:
    import io

    import pandas as pd
    import torch

    from fastif import simulate as sim
    from fastif.engine.params import match_names
    from fastif.errors import InputError
    from fastif.runs import atomic_write_bytes
    from fastif.training import predict
    from fastif.workbench import loss_fn, open_workbench

    source = influence_run(settings)
    run.record_input(source / "influence.parquet", "influence")
    run.record_input(source / "tests.parquet", "influence_tests")
    run.log.info("influence run %s", source)
    influence = pd.read_parquet(source / "influence.parquet")
    tests = pd.read_parquet(source / "tests.parquet")
    if (tests["n_examples"] == 1).sum() == 0:
        raise InputError(f"The influence run {source} has no single test points (only anchor groups). "
                         f"Fix: run 'fastif influence tests.mode=random', or set source.run=new.")
    split = str(tests["split"].iat[0])
    kept = int(influence.groupby(["test_id", "direction"]).size().max()) if len(influence) else 0
    if kept < settings.step.m:
        run.log.warning("the influence run keeps at most %d training points per direction, fewer than step.m=%d: "
                        "the helpful and harmful sets are shorter (rerun influence with output.top_m >= step.m)", kept, settings.step.m)

    workbench = open_workbench(settings, run, splits=("train", split))
    torch.manual_seed(settings.seed)
    train, test = workbench.data["train"], workbench.data[split]
    sim.check_train_positions(influence, workbench.frames["train"]["id"].astype(str).tolist())
    probs, _ = predict(workbench.model, test, settings.train.eval_batch_size, workbench.device)
    points, disagreements = sim.points_from_tests(tests, workbench.frames[split], probs.argmax(1))
    if disagreements > max(1, 0.05 * len(points)):
        raise InputError(f"The task model now predicts differently from the influence run {source} for {disagreements} of "
                         f"{len(points)} test points: it was computed with another model. "
                         f"Fix: set source.run=new, or point source.run at an influence run of this model.")
    sets = sim.candidate_sets(influence, [p.test_id for p in points], len(train), settings.step.m, settings.step.seed)
    for point in points:
        point.sets = sets[point.test_id]
    n_correct = sum(p.correct for p in points)
    run.log.info("%d test points of split %s: %d predicted correctly, %d incorrectly", len(points), split, n_correct, len(points) - n_correct)
    if n_correct == 0 or n_correct == len(points):
        run.log.warning("all test points are %s; for both kinds use an influence run over random test points "
                        "(source.run=new)", "correct" if n_correct else "incorrect")

    simulator = workbench.model
    if settings.simulator.kind == "predictions":
        simulator = build_simulator(settings, run, workbench, probs_train=predict(workbench.model, train, settings.train.eval_batch_size, workbench.device)[0])
        agreement = float((predict(simulator, test, settings.train.eval_batch_size, workbench.device)[0].argmax(1) == probs.argmax(1)).mean())
        run.annotate(simulator_agreement=agreement)
        run.log.info("simulator agrees with the task model on %.1f%% of split %s", 100 * agreement, split)
    patterns = settings.step.params or settings.model.trainable
    params = match_names([n for n, _ in simulator.named_parameters()], list(patterns))
    for name, parameter in simulator.named_parameters():
        parameter.requires_grad_(name in params)

    lrs = sim.learning_rates(settings.step.lr_min, settings.step.lr_max, settings.step.lr_count)
    frame = sim.simulate(simulator, loss_fn, train, test, points, lrs, params, workbench.device)
    summary = sim.summarize(frame)
    run.write_parquet("simulate.parquet", frame)
    run.write_json("summary.json", {"influence_run": str(source), "simulator": settings.simulator.kind, "m": settings.step.m,
                                    "learning_rates": lrs.tolist(), "parameters": len(params), **summary})
    figure = sim.plot_simulation(frame, title=f"Simulatability ({settings.experiment_name}, simulator: {settings.simulator.kind}, m={settings.step.m})")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(run.dir / "simulate.png", buffer.getvalue())
    for line in sim.summary_lines(summary):
        run.log.info("%s", line)
    run.log.info("results: %s", run.dir / "simulate.parquet")


def build_simulator(settings: SimulateSettings, run: Run, workbench, probs_train):
    """A model trained on the training split labelled with the task model's predictions."""
    from fastif.commands.train import load_model_for_training
    from fastif.models import apply_trainable
    from fastif.runs import progress_enabled
    from fastif.simulate import train_simulator

    base = settings.simulator.base or settings.model.name_or_path
    base_settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, name_or_path=base))
    model, _ = load_model_for_training(base_settings, run, workbench.device)
    apply_trainable(model, settings.model.trainable)
    summary = train_simulator(model, workbench.data["train"], probs_train.argmax(1), settings.train, workbench.device,
                              settings.seed + 1, progress_enabled())
    run.log.info("simulator trained on the task model's predictions: %d steps in %.1f s", summary["steps"], summary["seconds"])
    model.eval()
    return model
