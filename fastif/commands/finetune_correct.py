"""`fastif finetune-correct`: fine-tune on the training examples most helpful to a model's errors.

FastIF's error-correction experiment (Guo et al., 2021, section 6), procedure in
:mod:`fastif.correction`. Steps: load the starting model (the latest ``fastif train`` run of the
experiment, or ``model.name_or_path``), the training data (the Hessian's data), the candidate pool
(``data.pool``, default the training split), the in-distribution eval split and the challenge
split; split the challenge split into an anchor part and a held-out part (ids saved to
``anchor_split.json``); build the kNN index over the pool once, on the starting model's features;
then per replica sample anchors per group and run the arms (helpful, harmful, random, anchors) for
``correct.rounds`` one-step rounds each, evaluating after every round.

Outputs in the run folder: ``results.parquet`` (arm, replica, round, eval_split, group, accuracy,
loss, n), ``summary.json`` (accuracy changes vs the starting model with t-intervals over replicas,
and arm - random differences), ``curves.png``, ``anchor_split.json``, ``anchors.json`` and
``selections.parquet`` (the pool examples each arm stepped on, per round).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from fastif.commands import ExperimentSettings
from fastif.config import _check
from fastif.errors import InputError, RunError
from fastif.runs import Run

ARMS = ("helpful", "harmful", "random", "anchors")  # = fastif.correction.ARMS (not imported: keeps --help free of torch)
START_MODELS = ("train_run", "model")


@dataclass
class CorrectConfig:
    """The error-correction procedure (defaults: FastIF's paper setting for BERT)."""

    group_by: List[str] = field(default_factory=lambda: ["heuristic"], metadata={"help": "Challenge-split columns whose values form the anchor groups (HANS: heuristic; joined with '/' when several)."})
    anchor_fraction: float = field(default=0.5, metadata={"help": "Fraction of each group of the challenge split that forms the anchor part; the rest is the held-out part evaluated after every round."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the anchor / held-out split (kept fixed across replicas)."})
    split_file: Optional[str] = field(default=None, metadata={"help": "anchor_split.json of an earlier run: reuse its anchor / held-out ids instead of drawing a split (null: draw one)."})
    anchors_per_group: int = field(default=10, metadata={"help": "Anchors sampled per group from the anchor part, per replica (the paper: 10 per HANS heuristic)."})
    m: int = field(default=10, metadata={"help": "Pool examples per anchor group in each round's batch of the helpful/harmful arms (the random arm takes m x groups)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the plain SGD steps (the paper: 1e-4 for BERT)."})
    rounds: int = field(default=10, metadata={"help": "Cumulative rounds; each takes one SGD step on the arm's batch (influence recomputed every round)."})
    replicas: int = field(default=3, metadata={"help": "Repeats with different seeds (anchors sample, random arm); intervals are over replicas."})
    arms: List[str] = field(default_factory=lambda: list(ARMS), metadata={"help": "Arms to run: helpful, harmful, random (the control), anchors."})
    trainable: Optional[List[str]] = field(default=None, metadata={"help": "Name patterns of the parameters the SGD steps update; null = model.influence_params (as in the paper: influence then predicts the effect of the step it selects for)."})
    hessian_examples: Optional[int] = field(default=None, metadata={"help": "Training examples the Hessian is averaged over (a seeded random subset); null = the whole training split."})
    eval_examples: Optional[int] = field(default=None, metadata={"help": "In-distribution eval examples evaluated each round (a seeded random subset); null = all."})
    heldout_examples: Optional[int] = field(default=None, metadata={"help": "Held-out challenge examples evaluated each round (a seeded random subset of the held-out part); null = all."})
    influence_batch_size: int = field(default=64, metadata={"help": "Batch size of the gradient and Hessian-vector-product passes."})
    start_model: str = field(default="train_run", metadata={"help": "train_run: the model/ of the latest complete `fastif train` run of correct.train_experiment (the demo model is trained on first use); model: model.name_or_path is already the fine-tuned starting checkpoint."})
    train_experiment: Optional[str] = field(default=None, metadata={"help": "Experiment whose `fastif train` run gives the starting model (null: this experiment); e.g. hans_unseen_local uses mnli_hans_local's model."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the t-intervals over replicas."})

    def __post_init__(self) -> None:
        _check(len(self.group_by) > 0, "correct.group_by", "empty list", "name a challenge column, e.g. correct.group_by=[heuristic]")
        _check(0.0 < self.anchor_fraction < 1.0, "correct.anchor_fraction", f"got {self.anchor_fraction}, need 0 < x < 1", "e.g. correct.anchor_fraction=0.5")
        for key in ("anchors_per_group", "m", "rounds", "replicas", "influence_batch_size"):
            _check(getattr(self, key) >= 1, f"correct.{key}", f"got {getattr(self, key)}, need >= 1", f"set correct.{key} to a positive integer")
        _check(self.learning_rate > 0, "correct.learning_rate", f"got {self.learning_rate}, need > 0", "e.g. correct.learning_rate=1e-4")
        _check(len(self.arms) > 0 and all(a in ARMS for a in self.arms) and len(set(self.arms)) == len(self.arms), "correct.arms",
               f"got {list(self.arms)}", f"choose distinct arms from {', '.join(ARMS)}")
        for key in ("hessian_examples", "eval_examples", "heldout_examples"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"correct.{key}", f"got {value}", "use a positive integer or null")
        _check(self.trainable is None or len(self.trainable) > 0, "correct.trainable", "empty list", "give patterns, e.g. correct.trainable='[classifier.*]', or null")
        _check(self.start_model in START_MODELS, "correct.start_model", f"got '{self.start_model}'", f"use one of {', '.join(START_MODELS)}")
        _check(0.5 <= self.confidence < 1.0, "correct.confidence", f"got {self.confidence}", "e.g. correct.confidence=0.95")


@dataclass
class FinetuneCorrectSettings(ExperimentSettings):
    """Settings of `fastif finetune-correct`: the experiment's groups plus the correction procedure."""

    correct: CorrectConfig = field(default_factory=CorrectConfig, metadata={"help": "The error-correction procedure."})


SCHEMA = FinetuneCorrectSettings

RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
SPLIT_FILE = "anchor_split.json"
ANCHORS_FILE = "anchors.json"
SELECTIONS_FILE = "selections.parquet"


def execute(settings: FinetuneCorrectSettings, run: Run) -> None:
    import time

    import numpy as np
    import pandas as pd
    import torch

    from fastif import correction
    from fastif.models import apply_trainable
    from fastif.workbench import loss_fn, make_solver, open_workbench

    cfg = settings.correct
    torch.manual_seed(settings.seed)
    bench = open_workbench(_with_start_model(settings, run), run, splits=("train", "eval", "challenge", "pool"))
    if "challenge" not in bench.frames:
        raise InputError("finetune-correct needs a challenge split to take anchors from, but data.challenge is null. "
                         "Fix: set data.challenge (e.g. hans:validation, or a file) or use an experiment that has one (experiment=demo).")
    model, device = bench.model, bench.device
    model.eval()
    patterns = cfg.trainable if cfg.trainable is not None else settings.model.influence_params
    trainable = apply_trainable(model, patterns)
    run.log.info("SGD steps update %d parameter tensors (%s); influence over %d parameters (model.influence_params)",
                 len(trainable), "correct.trainable" if cfg.trainable is not None else "= model.influence_params", bench.selection.numel)

    pool = bench.data.get("pool", bench.data["train"])
    pool_name = "pool" if "pool" in bench.data else "train"
    hessian_data = _subset(bench.data["train"], cfg.hessian_examples, settings.seed)
    eval_data = _subset(bench.data["eval"], cfg.eval_examples, settings.seed)

    challenge = bench.frames["challenge"].reset_index(drop=True)
    groups = correction.group_labels(challenge, cfg.group_by)
    anchor_part, heldout_part = _anchor_split(cfg, challenge, groups, run)
    rng = np.random.default_rng([cfg.split_seed, 1])
    if cfg.heldout_examples is not None and cfg.heldout_examples < len(heldout_part):
        heldout_part = np.sort(rng.choice(heldout_part, size=cfg.heldout_examples, replace=False))
    heldout_data = bench.data["challenge"].subset(heldout_part.tolist())
    heldout_groups = groups.iloc[heldout_part].reset_index(drop=True)
    run.log.info("challenge split: %d anchor-part and %d held-out examples (evaluated: %d) in groups %s; pool: %s (%d examples); "
                 "Hessian over %d training examples; in-distribution eval: %d",
                 len(anchor_part), len(challenge) - len(anchor_part), len(heldout_part), sorted(groups.unique()), pool_name, len(pool),
                 len(hessian_data), len(eval_data))

    setup = correction.InfluenceSetup(loss_fn=loss_fn, pool=pool, hessian_data=hessian_data, selection=bench.selection,
                                      solver=make_solver(bench.hvp), damping=bench.hvp.damping, batch_size=cfg.influence_batch_size)
    k = settings.knn.resolve_k(len(pool))
    index = _pool_index(settings, model, pool, device, run) if k < len(pool) else None

    results, selections, anchors_record = [], [], {}
    started = time.perf_counter()
    for replica in range(cfg.replicas):
        anchors = correction.sample_anchors(groups, anchor_part, cfg.anchors_per_group, seed=settings.seed * 1000 + replica)
        order = [int(p) for g in sorted(anchors) for p in anchors[g]]
        anchors_data = bench.data["challenge"].subset(order)
        anchors_record[str(replica)] = {g: [challenge["id"].iloc[p] for p in anchors[g]] for g in sorted(anchors)}
        anchor_rows = dict(zip(sorted(anchors), correction.anchor_row_blocks(anchors)))
        candidates = _candidates(settings, model, anchors_data, anchors, anchor_rows, index, k, len(pool), device)
        run.log.info("replica %d: %d anchors; kNN candidates per group %s (k=%d of %d)", replica, len(order),
                     {g: len(c) for g, c in candidates.items()}, k, len(pool))
        plan = correction.ReplicaPlan(
            replica=replica, anchors=anchors, heldout_data=heldout_data, heldout_groups=heldout_groups, eval_data=eval_data,
            anchors_data=anchors_data, candidates=candidates, m=cfg.m, rounds=cfg.rounds, learning_rate=cfg.learning_rate,
            seed=settings.seed, arms=list(cfg.arms), eval_batch_size=settings.train.eval_batch_size, log=run.log.info)
        results.append(correction.run_replica(model, setup, plan, device))
        selections += [dict(s, ids=[pool.ids[i] if s["arm"] != "anchors" else anchors_data.ids[i] for i in s.pop("positions")]) for s in plan.selections]
        run.log.info("replica %d done (%.0f s so far)", replica, time.perf_counter() - started)

    table = pd.concat(results, ignore_index=True)
    run.write_parquet(RESULTS_FILE, table)
    run.write_parquet(SELECTIONS_FILE, pd.DataFrame(selections, columns=["arm", "replica", "round", "ids"]))
    run.write_json(ANCHORS_FILE, anchors_record)
    summary = correction.summarize(table, confidence=cfg.confidence)
    summary.update(pool=pool_name, pool_size=len(pool), knn_k=k, seconds=time.perf_counter() - started,
                   learning_rate=cfg.learning_rate, m=cfg.m, anchors_per_group=cfg.anchors_per_group,
                   groups=sorted(groups.unique().tolist()), heldout_evaluated=len(heldout_part), eval_evaluated=len(eval_data))
    run.write_json(SUMMARY_FILE, summary)
    correction.plot_curves(table, run.dir / CURVES_FILE, confidence=cfg.confidence)
    _log_summary(run, summary)


def _with_start_model(settings: FinetuneCorrectSettings, run: Run) -> FinetuneCorrectSettings:
    """Settings whose model.name_or_path is the starting checkpoint."""
    from pathlib import Path

    from fastif.commands import train
    from fastif.runs import latest_complete

    cfg = settings.correct
    if cfg.start_model == "model" or settings.model.name_or_path == "demo":
        return settings  # the demo model: the workbench finds (or trains) it
    experiment = cfg.train_experiment or settings.experiment_name
    latest = latest_complete(Path(settings.paths.outputs), "train", experiment)
    if latest is None or not (latest / train.MODEL_DIR).is_dir():
        raise RunError(f"finetune-correct starts from the model of a complete 'fastif train experiment={experiment}' run, and there is none under "
                       f"{Path(settings.paths.outputs) / 'train' / experiment}. Fix: run 'fastif train experiment={experiment}' first, or set "
                       f"correct.start_model=model with model.name_or_path pointing at an already fine-tuned checkpoint.")
    run.log.info("starting model: %s", latest / train.MODEL_DIR)
    model = dataclasses.replace(settings.model, name_or_path=str(latest / train.MODEL_DIR))
    return dataclasses.replace(settings, model=model)


def _subset(data, size: Optional[int], seed: int):
    import numpy as np

    if size is None or size >= len(data):
        return data
    rng = np.random.default_rng([seed, size])
    return data.subset(np.sort(rng.choice(len(data), size=size, replace=False)).tolist())


def _anchor_split(cfg: CorrectConfig, challenge, groups, run: Run):
    """(anchor part, held-out part) positions: drawn (seeded) or read from cfg.split_file; saved to the run."""
    import json
    from pathlib import Path

    import numpy as np

    from fastif import correction

    ids = challenge["id"].astype(str)
    if cfg.split_file is not None:
        path = Path(cfg.split_file).expanduser()
        try:
            saved = json.loads(path.read_text())
            anchor_ids, heldout_ids = set(saved["anchor_ids"]), set(saved["heldout_ids"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"Cannot read the anchor split {path} ({exc}). Fix: point correct.split_file at an anchor_split.json written by finetune-correct, or set it to null.") from None
        missing = (anchor_ids | heldout_ids) - set(ids)
        if missing:
            raise InputError(f"{path} names {len(missing)} ids that are not in the challenge split (e.g. {sorted(missing)[0]!r}). "
                             f"Fix: use the split file of a run on the same data.challenge, or set correct.split_file=null.")
        run.record_input(path, "correct.split_file")
        anchor = np.flatnonzero(ids.isin(anchor_ids).to_numpy())
        heldout = np.flatnonzero(ids.isin(heldout_ids).to_numpy())
    else:
        anchor, heldout = correction.split_anchor_part(groups, cfg.anchor_fraction, cfg.split_seed)
    run.write_json(SPLIT_FILE, {"group_by": list(cfg.group_by), "seed": cfg.split_seed,
                                "anchor_ids": ids.iloc[anchor].tolist(), "heldout_ids": ids.iloc[heldout].tolist()})
    return anchor, heldout


def _pool_index(settings, model, pool, device, run: Run):
    from fastif.knn import FeatureSpec, build_index, extract_features

    spec = FeatureSpec.from_config(settings.knn)
    features = extract_features(model, pool, spec, device=device, batch_size=settings.knn.batch_size)
    index = build_index(features, pool.ids, settings.knn)
    run.log.info("kNN index over the pool: %d x %d %s features (%s)", features.shape[0], features.shape[1], spec.kind, index.index.backend)
    return index


def _candidates(settings, model, anchors_data, anchors, anchor_rows, index, k, pool_size, device):
    import torch

    from fastif import correction
    from fastif.knn import FeatureSpec, extract_features

    if index is None:
        everything = torch.arange(pool_size)
        return {g: everything for g in anchors}
    queries = extract_features(model, anchors_data, FeatureSpec.from_config(settings.knn), device=device, batch_size=settings.knn.batch_size)
    positions, _ = index.search(queries, k)
    return correction.candidate_sets(positions.cpu(), anchors, anchor_rows)


def _log_summary(run: Run, summary: dict) -> None:
    from fastif.correction import CHALLENGE, IN_DISTRIBUTION

    for arm, entry in summary["arms"].items():
        challenge, ind = entry.get(CHALLENGE, {}), entry.get(IN_DISTRIBUTION, {})
        run.log.info("arm %-8s held-out challenge change %s; in-distribution change %s", arm, _fmt(challenge), _fmt(ind))
    for arm, entry in summary.get("vs_random", {}).items():
        run.log.info("%s - random on the held-out challenge part: %s", arm, _fmt(entry.get(CHALLENGE, {})))


def _fmt(stat: dict) -> str:
    if not stat:
        return "n/a"
    if stat.get("low") is None:
        return f"{100 * stat['mean']:+.2f} pts"
    return f"{100 * stat['mean']:+.2f} pts [{100 * stat['low']:+.2f}, {100 * stat['high']:+.2f}]"
