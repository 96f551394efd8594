"""Parameter selection: which parameters the Hessian and the gradients are taken over.

FastIF differentiates only a slice of BERT (layers 10-11, pooler, classifier); the
selection is a list of name patterns over ``model.named_parameters()``: fnmatch globs
(``bert.encoder.layer.1[01].*``) or regular expressions prefixed with ``re:``.
A selection flattens the chosen tensors into one vector of length ``numel`` in a
fixed order, which is the coordinate system of every s_test and gradient.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from fastif.errors import ConfigError


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def match_names(names: Iterable[str], patterns: Sequence[str]) -> List[str]:
    """The names (in their given order) matched by at least one pattern.

    Every pattern must match something: a pattern that matches nothing is almost
    always a typo, so it is refused with a few of the available names.
    """
    names = list(names)
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ConfigError(f"Parameter pattern '{pattern}' is not a valid regular expression ({exc}). Fix the regex after 're:'.") from None
        if not any(_pattern_matches(pattern, n) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"Parameter pattern '{pattern}' matches no parameter of the model. "
                f"Available names look like: {shown}. Use an fnmatch glob (e.g. 'classifier.*') or 're:<regex>'."
            )
    return [n for n in names if any(_pattern_matches(p, n) for p in patterns)]


@dataclass(frozen=True)
class ParameterSelection:
    """An ordered set of a model's parameters, flattened into one coordinate vector."""

    names: tuple
    shapes: tuple

    @property
    def numels(self) -> List[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def tensors(self, model: torch.nn.Module) -> List[torch.nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors (optionally with leading batch dims) into (..., numel)."""
        lead = tensors[0].shape[: tensors[0].dim() - len(self.shapes[0])]
        return torch.cat([t.reshape(*lead, -1) for t in tensors], dim=-1)

    def unflatten(self, vector: torch.Tensor) -> List[torch.Tensor]:
        """Split (..., numel) back into per-parameter tensors of shape (..., *shape)."""
        lead = vector.shape[:-1]
        chunks = torch.split(vector, self.numels, dim=-1)
        return [c.reshape(*lead, *s) for c, s in zip(chunks, self.shapes)]

    def values(self, model: torch.nn.Module) -> torch.Tensor:
        """The current parameter values as one detached vector."""
        return self.flatten([p.detach() for p in self.tensors(model)])


def select_parameters(model: torch.nn.Module, patterns: Optional[Sequence[str]] = None) -> ParameterSelection:
    """Select parameters by name patterns (None: every parameter that requires grad)."""
    named = dict(model.named_parameters())
    if patterns is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise ConfigError("The model has no parameter that requires grad. Pass params=[...] name patterns to choose the influence parameters.")
    else:
        names = match_names(named.keys(), list(patterns))
    return ParameterSelection(names=tuple(names), shapes=tuple(tuple(named[n].shape) for n in names))


class requires_grad_only:
    """Context manager: exactly the selected parameters require grad (restored on exit).

    Autograd then builds graphs only through what the selection needs, which is
    what keeps Hessian-vector products over a top slice of a network cheap.
    """

    def __init__(self, model: torch.nn.Module, selection: ParameterSelection):
        self.model = model
        self.selected = set(selection.names)
        self._saved: Dict[str, bool] = {}

    def __enter__(self) -> "requires_grad_only":
        for name, p in self.model.named_parameters():
            self._saved[name] = p.requires_grad
            p.requires_grad_(name in self.selected)
        return self

    def __exit__(self, *exc) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._saved[name])
