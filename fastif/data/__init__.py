"""NLI data: every split is a pandas DataFrame with columns id, premise, hypothesis, label,
label_name (+ extras such as heuristic, subcase, genre).

:func:`load_splits` turns a :class:`~fastif.config.DataConfig` into the splits a command uses:
``name=demo`` generates the embedded demo (:mod:`fastif.data.demo`); the real datasets (mnli, hans,
anli, snli, files) are read by :func:`fastif.data.nli.load_nli`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import pandas as pd

from fastif.config import DataConfig
from fastif.errors import ConfigError

DEMO = "demo"
REAL_DATASETS = ("mnli", "hans", "anli", "snli", "files")


def load_splits(data_cfg: DataConfig) -> Dict[str, pd.DataFrame]:
    """The splits named by ``data_cfg``: keys 'train', 'eval', and 'challenge' unless it is null.

    For ``name=demo`` the split values pick demo splits ('train', 'dev', 'challenge'), sized by
    data.demo_train_size (train) and data.demo_eval_size (dev, challenge). For real datasets each
    value is a local file (relative names are looked up under ``data.root`` first) or a hub split of ``data_cfg.name``; a value written ``<dataset>:<split or
    path>`` (e.g. ``hans:validation``) reads that split from another dataset, as HANS is the
    challenge set of MNLI. ``data.max_train`` keeps the first n training examples. ``data.pool``, when
    set, adds the key 'pool' (finetune-correct's candidate pool). Values joined by '+' (e.g.
    ``anli:train_r1+train_r2+train_r3``) are concatenated; a dataset prefix on the first part applies to all.
    """
    name = str(data_cfg.name).lower()
    wanted = {"train": data_cfg.train, "eval": data_cfg.eval}
    if data_cfg.challenge is not None:
        wanted["challenge"] = data_cfg.challenge
    if getattr(data_cfg, "pool", None) is not None:
        wanted["pool"] = data_cfg.pool  # finetune-correct's candidate pool
    if name == DEMO:
        splits = {role: _demo_split(data_cfg, role, value) for role, value in wanted.items()}
    elif name in REAL_DATASETS:
        splits = {role: _real_split(data_cfg, name, value) for role, value in wanted.items()}
    else:
        raise ConfigError(f"Unknown dataset data.name={data_cfg.name!r}. Fix: use one of {', '.join((DEMO,) + REAL_DATASETS)} ('files' for local files).")
    if data_cfg.max_train is not None:
        splits["train"] = splits["train"].iloc[: data_cfg.max_train].reset_index(drop=True)
    return splits


def _demo_split(data_cfg: DataConfig, role: str, split: str) -> pd.DataFrame:
    from fastif.data.demo import SPLITS, generate_split

    if data_cfg.label_map != "2way":
        raise ConfigError(f"The demo dataset is 2-way (entailment / non-entailment), but data.label_map={data_cfg.label_map}. Fix: set data.label_map=2way.")
    if split not in SPLITS:
        raise ConfigError(f"The demo dataset has no split {split!r} (asked for data.{role}). Fix: use one of {', '.join(SPLITS)}.")
    size = data_cfg.demo_train_size if split == "train" else data_cfg.demo_eval_size
    return generate_split(split, size, seed=data_cfg.seed, shortcut=data_cfg.demo_shortcut)


def _split_source(default_name: str, value: str) -> Tuple[str, str]:
    head, sep, rest = str(value).partition(":")
    if sep and head.lower() in REAL_DATASETS and rest:
        return head.lower(), rest
    return default_name, str(value)


def _real_split(data_cfg: DataConfig, name: str, value: str) -> pd.DataFrame:
    parts = [part.strip() for part in str(value).split("+")]
    if len(parts) > 1:  # 'anli:train_r1+train_r2+train_r3': the splits one after another
        first, sep, _ = parts[0].partition(":")
        prefix = f"{first}:" if sep and first.lower() in REAL_DATASETS else ""
        frames = [_real_split(data_cfg, name, part if ":" in part or not prefix else prefix + part) for part in parts]
        return pd.concat(frames, ignore_index=True)
    try:
        from fastif.data.nli import load_nli
    except ImportError as exc:  # pragma: no cover - only when the package is incomplete
        raise ConfigError(f"Dataset '{name}' needs fastif.data.nli, which could not be imported ({exc}). Fix: reinstall fastif, or use data.name=demo.") from None
    source, split = _split_source(name, value)
    split = _under_root(data_cfg, split)
    column_map: Optional[dict] = getattr(data_cfg, "column_map", None)
    return load_nli(source, split, data_cfg.label_map, column_map)


NLI_PACK = "nli-pack"


def _under_root(data_cfg: DataConfig, split: str) -> str:
    """``split`` joined to ``data.root`` when that names an existing file there; else unchanged."""
    root = getattr(data_cfg, "root", None)
    if root is None:
        return split
    if str(root) == NLI_PACK:
        from fastif.data.nli import SHARED_NLI_ENV, shared_nli_dir

        folder = shared_nli_dir()
        if folder is None:
            raise ConfigError(f"data.root={NLI_PACK} but the offline NLI pack (a shared/data/nli folder next to the repository) was not found. "
                              f"Fix: set the environment variable {SHARED_NLI_ENV}=/path/to/shared/data/nli, or data.root=/path/to/the/files.")
    else:
        from pathlib import Path

        folder = Path(str(root)).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"data.root={root} is not a folder. Fix: point data.root at the folder holding the data files, or set data.root=null.")
    candidate = folder / split
    return str(candidate) if candidate.is_file() else split
