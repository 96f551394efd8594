"""Adapter for Hugging Face sequence classifiers (dict batches with ``labels``).

Kept beside the engine, not inside it: the engine only sees ``loss_fn(model, batch)``.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


def trim_padding(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop trailing sequence positions that are padding for every example of the batch.

    Datasets padded to a fixed max_length waste most of each pass on pad tokens; with
    right padding and an attention mask the per-example outputs are unchanged.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    used = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else mask.shape[1]
    if used == mask.shape[1]:
        return batch
    return {k: (v[:, :used] if k in _MODEL_INPUTS and v.dim() >= 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.items()}


def classifier_logits(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a HF sequence classifier for a dict batch (labels are not passed to the model)."""
    batch = trim_padding(batch)
    out = model(**{k: v for k, v in batch.items() if k in _MODEL_INPUTS})
    return out.logits if hasattr(out, "logits") else out[0]


def sequence_classification_loss(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy of a HF sequence classifier: the engine's ``loss_fn``."""
    logits = classifier_logits(model, batch)
    return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, batch["labels"], reduction="none")
