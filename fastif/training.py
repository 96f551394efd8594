"""Fine-tuning and evaluating sequence classifiers on encoded NLI splits.

Batches are dicts of tensors with ``labels`` (see :mod:`fastif.data.encoding`); the loss is
:func:`fastif.engine.hf.sequence_classification_loss`, the same per-example loss the influence
engine differentiates, so training and influence agree on what "the loss" is.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from fastif.config import TrainConfig
from fastif.data.encoding import EncodedDataset
from fastif.engine.hf import classifier_logits, sequence_classification_loss
from fastif.errors import ConfigError, InputError, RunError

logger = logging.getLogger(__name__)


def _batch(data: Dataset, indices: Sequence[int], device: torch.device) -> Dict[str, torch.Tensor]:
    if isinstance(data, EncodedDataset):
        batch = data.batch(indices)  # one gather per column instead of collating n dicts
    else:
        batch = default_collate([data[int(i)] for i in indices])
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(device: torch.device, precision: str):
    if precision == "fp32" or device.type != "cuda":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _linear_schedule(total_steps: int, warmup_steps: int):
    """Learning-rate multiplier: linear warm-up to 1 over warmup_steps, then linear decay toward 0."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return multiplier


def train_classifier(model: torch.nn.Module, train: Dataset, train_cfg: TrainConfig, device, seed: int, progress: bool) -> dict:
    """Fine-tune ``model`` in place on ``train`` and return {'steps', 'seconds', 'final_loss'}.

    AdamW over the parameters that require grad (weight decay on matrices only), linear warm-up
    and decay, ``ceil(epochs * batches_per_epoch)`` steps (epochs may be fractional), a fresh
    seeded shuffle per epoch, gradient clipping, and bf16/fp16 autocast on CUDA when
    ``train_cfg.precision`` asks for it (CPU always trains in fp32). Dropout draws from a torch
    RNG seeded by ``seed`` that is restored afterwards, so the same seed gives the same model.
    ``final_loss`` is the mean training loss over the last epoch's worth of steps.
    The model is left in eval mode.
    """
    device = torch.device(device)
    n = len(train)
    if n == 0:
        raise InputError("The training set is empty. Fix: check data.train and data.max_train.")
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("No model parameter is trainable. Fix: set model.trainable to patterns that match parameters, e.g. model.trainable='[*]'.")
    precision = train_cfg.precision
    if precision != "fp32" and device.type != "cuda":
        logger.warning("train.precision=%s needs CUDA; training on %s in fp32", precision, device)
        precision = "fp32"

    batch_size = train_cfg.batch_size
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = max(1, math.ceil(train_cfg.epochs * steps_per_epoch))
    warmup_steps = int(round(train_cfg.warmup_ratio * total_steps))
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},  # biases, LayerNorm
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train_cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(total_steps, warmup_steps))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    shuffle = torch.Generator().manual_seed(seed)
    recent: deque = deque(maxlen=min(total_steps, steps_per_epoch))

    model.to(device)
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="train", unit="step", leave=False)
    start = time.perf_counter()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        step = 0
        while step < total_steps:
            order = torch.randperm(n, generator=shuffle)
            for begin in range(0, n, batch_size):
                if step >= total_steps:
                    break
                batch = _batch(train, order[begin : begin + batch_size].tolist(), device)
                with _autocast(device, precision):
                    loss = sequence_classification_loss(model, batch).mean()
                if not torch.isfinite(loss):
                    raise RunError(
                        f"Training diverged: the loss became {loss.item()} at step {step + 1} of {total_steps}. "
                        "Fix: lower train.learning_rate (e.g. divide it by 10) or use train.precision=fp32."
                    )
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if train_cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], train_cfg.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                step += 1
                recent.append(loss.item())
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0 or step == total_steps:
                        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return {"steps": total_steps, "seconds": time.perf_counter() - start, "final_loss": float(sum(recent) / len(recent))}


def predict(model: torch.nn.Module, data: Dataset, batch_size: int, device) -> Tuple[np.ndarray, np.ndarray]:
    """Class probabilities (n, C) and per-example cross-entropy losses (n,) as float32 arrays.

    Runs in eval mode under ``torch.inference_mode``; the model's train/eval mode is restored.
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ConfigError(f"Evaluation batch size must be >= 1, got {batch_size}. Fix: e.g. train.eval_batch_size=128.")
    was_training = model.training
    model.eval()
    probs, losses = [], []
    try:
        with torch.inference_mode():
            for begin in range(0, len(data), batch_size):
                batch = _batch(data, range(begin, min(begin + batch_size, len(data))), device)
                logits = classifier_logits(model, batch).float()
                probs.append(torch.softmax(logits, dim=-1).cpu())
                losses.append(F.cross_entropy(logits, batch["labels"], reduction="none").cpu())
    finally:
        model.train(was_training)
    if not probs:
        n_labels = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
        return np.zeros((0, n_labels), dtype=np.float32), np.zeros((0,), dtype=np.float32)
    return torch.cat(probs).numpy(), torch.cat(losses).numpy()


def evaluate(model: torch.nn.Module, data: Dataset, batch_size: int, device, groups: Optional[pd.Series] = None) -> dict:
    """Accuracy and mean loss over ``data``, overall and per group.

    groups: one value per example in dataset order (e.g. ``df['heuristic']``); examples whose
    group is missing (NaN/None) count only in the totals. Returns
    {'accuracy', 'loss', 'n', 'groups': {str(group): {'accuracy', 'n'}}} ('groups' empty without groups).
    """
    n = len(data)
    if n == 0:
        raise InputError("Cannot evaluate on an empty dataset. Fix: check the data split (data.eval / data.challenge).")
    if groups is not None and len(groups) != n:
        raise InputError(f"evaluate got {len(groups)} group labels for {n} examples. Fix: pass one group value per example, in dataset order.")
    probs, losses = predict(model, data, batch_size, device)
    labels = _labels(data)
    correct = probs.argmax(axis=1) == labels
    result = {"accuracy": float(correct.mean()), "loss": float(losses.mean()), "n": int(n), "groups": {}}
    if groups is not None:
        frame = pd.DataFrame({"group": pd.Series(groups).to_numpy(), "correct": correct})
        for key, part in frame.groupby("group", sort=True, dropna=True):
            result["groups"][str(key)] = {"accuracy": float(part["correct"].mean()), "n": int(len(part))}
    return result


def _labels(data: Dataset) -> np.ndarray:
    if isinstance(data, EncodedDataset):
        return data.tensors["labels"].numpy()
    return np.asarray([int(data[i]["labels"]) for i in range(len(data))])
