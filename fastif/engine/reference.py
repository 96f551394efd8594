"""The reference FastIF scoring loop, kept as the correctness and speed baseline.

It mirrors the original code: for each test point, for each candidate, one batch-size-1
``torch.autograd.grad(..., create_graph=True)`` and a dot product with s_test. Tests
compare the batched engine against it; ``scripts/bench_engine.py`` times it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fastif.engine.data import DatasetLike, LossFn, as_dataset, make_batch, model_device
from fastif.engine.params import ParameterSelection, requires_grad_only


def reference_scores(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train: DatasetLike,
    s_test: torch.Tensor,
    selection: ParameterSelection,
    candidates: torch.Tensor,
    collate_fn: Optional[Callable] = None,
) -> torch.Tensor:
    """-grad L(z_j) . s_test[t] for candidates (T, k), one example and one test point at a time."""
    train = as_dataset(train)
    device = model_device(model)
    params = selection.tensors(model)
    out = torch.empty(candidates.shape, dtype=s_test.dtype)
    with requires_grad_only(model, selection), torch.enable_grad():
        for t in range(candidates.shape[0]):
            for j, idx in enumerate(candidates[t].tolist()):
                batch = make_batch(train, [idx], device, collate_fn)
                grads = torch.autograd.grad(loss_fn(model, batch).sum(), params, create_graph=True)
                out[t, j] = -float(sum((g * v).sum() for g, v in zip(grads, selection.unflatten(s_test[t]))))
    return out
