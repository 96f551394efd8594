"""Tokenised NLI splits: one fixed-shape tensor batch per split, indexable like any torch Dataset."""

from __future__ import annotations

from typing import Dict, List, Sequence

import pandas as pd
import torch
from torch.utils.data import Dataset

from fastif.errors import InputError

FEATURES = ("input_ids", "attention_mask", "token_type_ids", "labels")


class EncodedDataset(Dataset):
    """A pre-tokenised split, padded to ``max_length``.

    ``data[i]`` is a dict of tensors ``input_ids``, ``attention_mask``, ``token_type_ids`` (each
    shape (max_length,), int64) and ``labels`` (shape (), int64), so torch's default collate
    stacks items into a batch. ``tensors`` holds the same columns stacked (shape (n, ...)) for
    code that slices whole batches at once; ``ids`` are the split's example ids in row order.
    """

    def __init__(self, tensors: Dict[str, torch.Tensor], ids: Sequence[str]):
        missing = [k for k in FEATURES if k not in tensors]
        if missing:
            raise ValueError(f"EncodedDataset needs tensors {FEATURES}; missing {missing}")
        n = len(ids)
        for key, value in tensors.items():
            if value.shape[0] != n:
                raise ValueError(f"tensor '{key}' has {value.shape[0]} rows, expected {n} (one per id)")
        self.tensors = {k: tensors[k] for k in FEATURES}
        self.ids: List[str] = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    @property
    def max_length(self) -> int:
        return int(self.tensors["input_ids"].shape[1])

    def batch(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The rows ``indices`` as one batch (what default collate of those items would give)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}

    def subset(self, indices: Sequence[int]) -> "EncodedDataset":
        """A new dataset with the rows ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        return EncodedDataset(self.batch(idx), [self.ids[i] for i in idx])


def encode(df: pd.DataFrame, tokenizer, max_length: int) -> EncodedDataset:
    """Tokenise premise/hypothesis pairs of an NLI split (truncated and padded to ``max_length``).

    ``df`` needs the columns id, premise, hypothesis and label (integer class ids). Tokenizers
    without segment ids (RoBERTa-style) get all-zero ``token_type_ids``.
    """
    missing = [c for c in ("id", "premise", "hypothesis", "label") if c not in df.columns]
    if missing:
        raise InputError(
            f"The dataset has no column(s) {', '.join(missing)} (it has: {', '.join(map(str, df.columns))}). "
            "Fix: load splits with fastif.data.load_splits, or rename the columns to id, premise, hypothesis, label."
        )
    if max_length < 4:
        raise InputError(f"max_length must be at least 4 (got {max_length}). Fix: set model.max_length, e.g. model.max_length=128.")
    try:
        labels = torch.tensor(pd.to_numeric(df["label"], errors="raise").to_numpy(), dtype=torch.long)
    except (TypeError, ValueError):
        raise InputError("The 'label' column must hold integer class ids. Fix: map label names to ids (entailment=0, ...).") from None
    if len(df) == 0:
        empty = torch.zeros((0, max_length), dtype=torch.long)
        return EncodedDataset({"input_ids": empty, "attention_mask": empty.clone(), "token_type_ids": empty.clone(), "labels": labels}, [])
    enc = tokenizer(
        df["premise"].astype(str).tolist(),
        df["hypothesis"].astype(str).tolist(),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=True,
    )
    tensors = {
        "input_ids": enc["input_ids"].long(),
        "attention_mask": enc["attention_mask"].long(),
        "token_type_ids": enc["token_type_ids"].long() if "token_type_ids" in enc else torch.zeros_like(enc["input_ids"]),
        "labels": labels,
    }
    return EncodedDataset(tensors, df["id"].astype(str).tolist())
