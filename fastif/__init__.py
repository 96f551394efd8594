"""fastif: FastIF influence functions (Guo et al., EMNLP 2021).

Which training examples caused a model's prediction, computed fast with a kNN
prefilter and a calibrated inverse Hessian-vector product, for any torch.nn.Module.

The public Python API is re-exported here lazily so that ``import fastif`` (and the
command line's ``--help``) stays fast: torch is imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_PUBLIC = {
    "influence_scores": "fastif.engine.scoring",
    "score_candidates": "fastif.engine.scoring",
    "ParameterSelection": "fastif.engine.params",
    "select_parameters": "fastif.engine.params",
    "per_example_gradients": "fastif.engine.gradients",
    "directional_derivatives": "fastif.engine.gradients",
    "HessianOperator": "fastif.engine.hessian",
    "top_eigenvalue": "fastif.engine.hessian",
    "smallest_eigenvalue": "fastif.engine.hessian",
    "query_gradients": "fastif.engine.scoring",
    "ExactSolver": "fastif.engine.solvers",
    "CGSolver": "fastif.engine.solvers",
    "LissaSolver": "fastif.engine.solvers",
    "SolveResult": "fastif.engine.solvers",
    "make_solver": "fastif.engine.solvers",
    "sequence_classification_loss": "fastif.engine.hf",
    "FastifError": "fastif.errors",
    "SolverDivergenceError": "fastif.errors",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fastif' has no attribute {name!r}")
