"""Which model checkpoint a command uses: the trained demo model, or the configured checkpoint.

``model.name_or_path=demo`` means "the tiny BERT of the latest complete ``fastif train`` run of
this experiment"; if there is none yet, it is trained now, in its own train run folder, exactly
as ``fastif train`` would.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from fastif.commands import ExperimentSettings
from fastif.runs import Run, latest_complete

log = logging.getLogger("fastif.run.demo_model")


def ensure_demo_model(settings: ExperimentSettings) -> Path:
    """The ``model/`` folder of the latest complete demo training run, training it on first use."""
    from omegaconf import OmegaConf

    from fastif.commands import train

    outputs = Path(settings.paths.outputs)
    latest = latest_complete(outputs, "train", settings.experiment_name)
    if latest is not None and (latest / train.MODEL_DIR).is_dir():
        log.info("using the demo model of %s", latest)
        return latest / train.MODEL_DIR
    log.info("no complete 'fastif train experiment=%s' run yet: training the demo model now",
             settings.experiment_name)
    shared = {item.name: getattr(settings, item.name) for item in dataclasses.fields(ExperimentSettings)}
    train_settings = train.TrainSettings(**shared)
    with Run(outputs, "train", settings.experiment_name,
             config=OmegaConf.to_container(OmegaConf.structured(train_settings)),
             seed=train_settings.seed, device=train_settings.device) as run:
        train.execute(train_settings, run)
    return run.dir / train.MODEL_DIR


def resolve_model_source(settings: ExperimentSettings, run: Run) -> str:
    """What to pass to ``fastif.models.load_classifier``; a local checkpoint is recorded as an input."""
    name_or_path = settings.model.name_or_path
    if name_or_path == "demo":
        path = ensure_demo_model(settings)
    elif Path(name_or_path).expanduser().exists():
        path = Path(name_or_path).expanduser()
    else:
        return name_or_path  # a hub id: load_classifier resolves it (or names it in an InputError)
    run.record_input(path, "model")
    return str(path)
