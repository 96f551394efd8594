"""What the analysis commands work on: the experiment's model, its splits and its influence setup.

``index``, ``hvp-calibrate``, ``influence``, ``finetune-correct`` and ``simulate`` all open the
same workbench, so that they load the model, the data and the parameter selection one way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Sequence

import pandas as pd
import torch

from fastif.commands import ExperimentSettings
from fastif.config import HvpConfig
from fastif.data.encoding import EncodedDataset, encode
from fastif.engine.hf import sequence_classification_loss
from fastif.engine.params import ParameterSelection, select_parameters
from fastif.engine.solvers import CGSolver, ExactSolver, LissaSolver, Solver
from fastif.runs import Run, frame_sha256

log = logging.getLogger("fastif.run.workbench")

loss_fn = sequence_classification_loss


@dataclass
class Workbench:
    """The loaded experiment. ``frames[name]`` and ``data[name]`` share row order."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    model_source: str
    selection: ParameterSelection
    hvp: HvpConfig  # the inverse-HVP settings in force (``hvp=calibrated`` resolved to its recommendation)
    frames: Dict[str, pd.DataFrame] = field(default_factory=dict)
    data: Dict[str, EncodedDataset] = field(default_factory=dict)


def open_workbench(settings: ExperimentSettings, run: Run, splits: Sequence[str] = ("train", "eval", "challenge")) -> Workbench:
    """Load the model (training the demo model on first use), the splits, the selection and the HVP settings."""
    from fastif.calibration import resolve_hvp
    from fastif.data import load_splits
    from fastif.demo_model import resolve_model_source
    from fastif.models import load_classifier, resolve_device

    device = resolve_device(settings.device)
    source = resolve_model_source(settings, run)
    model, tokenizer = load_classifier(source, settings.model.num_labels, device)
    model.eval()
    frames = {name: frame for name, frame in load_splits(settings.data).items() if name in splits}
    for name, frame in frames.items():
        run.annotate(**{f"data_{name}": {"rows": len(frame), "sha256": frame_sha256(frame)}})
    data = {name: encode(frame, tokenizer, settings.model.max_length) for name, frame in frames.items()}
    selection = select_parameters(model, settings.model.influence_params)
    hvp, _ = resolve_hvp(settings.hvp, settings.paths.outputs, settings.experiment_name, run)
    log.info("model %s on %s; influence over %d parameters (%d tensors); splits %s",
             source, device, selection.numel, len(selection.names), {k: len(v) for k, v in frames.items()})
    return Workbench(model=model, tokenizer=tokenizer, device=device, model_source=source, selection=selection, hvp=hvp, frames=frames, data=data)


def make_solver(hvp: HvpConfig, chains: int | None = None, seed_offset: int = 0) -> Solver:
    """The inverse-HVP solver an ``hvp`` config section describes (scale 0 = estimate it)."""
    if hvp.solver == "exact":
        return ExactSolver()
    if hvp.solver == "cg":
        return CGSolver(tol=hvp.tol, max_iter=hvp.max_iter)
    return LissaSolver(
        scale=hvp.scale or None,
        depth=hvp.depth,
        batch_size=hvp.batch_size,
        chains=hvp.chains if chains is None else chains,
        tol=hvp.tol,
        seed=hvp.seed + seed_offset,
        tail_average=hvp.tail_average,
    )
