"""Batching contract of the engine.

``train`` and ``test`` are map-style datasets (anything with ``__len__`` and
``__getitem__``) or tuples of tensors sharing their first dimension. Batches are made
by a collate function (torch's default collate unless one is given), moved to the
device, and handed to ``loss_fn(model, batch)``, which must return the per-example
losses of that batch, shape (batch_size,). Example i of a batch must not influence
the loss of example j (no batch norm in train mode, no in-batch negatives).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

DatasetLike = Union[Dataset, Tuple[torch.Tensor, ...]]
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def as_dataset(data: DatasetLike) -> Dataset:
    """A map-style dataset from a dataset or a tuple of tensors."""
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return TensorDataset(*data)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return data  # type: ignore[return-value]
    raise TypeError("Expected a map-style dataset (with __len__ and __getitem__) or a tuple of tensors.")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def make_batch(dataset: Dataset, indices: Sequence[int], device: torch.device, collate_fn: Optional[Callable] = None) -> Any:
    """The examples ``indices`` as one batch on ``device``.

    Fast paths (no per-item collation): TensorDataset, and datasets with a
    ``batch(indices)`` method returning what the default collate would.
    """
    collate = collate_fn or default_collate
    if collate_fn is None and callable(getattr(dataset, "batch", None)):
        return to_device(dataset.batch(list(indices)), device)
    if isinstance(dataset, TensorDataset):
        # Index tensors directly: much faster than collating one tuple per example.
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return to_device([t[idx] for t in dataset.tensors], device)
    return to_device(collate([dataset[int(i)] for i in indices]), device)


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    indices: Optional[Sequence[int]] = None,
    collate_fn: Optional[Callable] = None,
) -> Iterator[Tuple[torch.Tensor, Any]]:
    """Yield (positions, batch) over ``indices`` (default: the whole dataset) in order."""
    order = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, make_batch(dataset, chunk.tolist(), device, collate_fn)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()
