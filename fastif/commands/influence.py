"""`fastif influence`: the most helpful and most harmful training examples for chosen test points.

Per chunk of test queries: kNN candidates from the experiment's index (``knn.k=all``: full
scan), s_test for all queries of the chunk at once, batched scoring, top-m per direction.
Each finished chunk is saved under ``chunks/`` so a killed run resumes where it stopped
(``resume=<run dir>``, or automatically when an unfinished run with the same config hash
exists). Outputs: ``influence.parquet`` (long form), ``tests.parquet``, ``report.md``,
optionally ``influence.csv``. Under ``torchrun --nproc_per_node=N -m fastif influence``
the ranks share the LiSSA chains and the candidates; rank 0 writes the one run folder.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from fastif.commands import ExperimentSettings
from fastif.config import _check
from fastif.errors import ConfigError
from fastif.runs import Run

log = logging.getLogger("fastif.run.influence")
MODES = ("ids", "first", "random", "misclassified", "correct", "anchor_groups")
CHUNKS_DIR = "chunks"


@dataclass
class TestSelectionConfig:
    split: str = field(default="challenge", metadata={"help": "Split the test points come from: eval or challenge."})
    mode: str = field(default="misclassified", metadata={"help": "ids, first, random, misclassified, correct, or anchor_groups (FastIF's HANS setting: influence on each group's mean loss)."})
    n: int = field(default=16, metadata={"help": "How many test points (modes first, random, misclassified, correct)."})
    ids: List[str] = field(default_factory=list, metadata={"help": "Explicit test ids (mode=ids)."})
    group_column: Optional[str] = field(default="heuristic", metadata={"help": "Column that groups test points (report grouping; the anchor groups of mode=anchor_groups)."})
    anchors_per_group: int = field(default=10, metadata={"help": "Anchors drawn per group (mode=anchor_groups)."})
    seed: int = field(default=0, metadata={"help": "Seed of random and anchor selection."})

    def __post_init__(self) -> None:
        _check(self.split in ("eval", "challenge"), "tests.split", f"got '{self.split}'", "use tests.split=eval or tests.split=challenge")
        _check(self.mode in MODES, "tests.mode", f"got '{self.mode}'", f"use one of {', '.join(MODES)}")
        _check(self.n >= 1, "tests.n", f"got {self.n}, need >= 1", "e.g. tests.n=16")
        _check(self.mode != "ids" or len(self.ids) > 0, "tests.ids", "mode=ids needs ids", "e.g. tests.ids=[demo-challenge-000001]")
        _check(self.anchors_per_group >= 1, "tests.anchors_per_group", f"got {self.anchors_per_group}", "e.g. tests.anchors_per_group=10")


@dataclass
class OutputConfig:
    top_m: int = field(default=10, metadata={"help": "Training points kept per test point and direction (helpful, harmful); 0 = all candidates."})
    chunk_size: int = field(default=8, metadata={"help": "Test queries solved together and checkpointed together."})
    csv: bool = field(default=False, metadata={"help": "Also write influence.csv."})
    report_top: int = field(default=5, metadata={"help": "Training examples shown per direction in report.md."})
    score_batch_size: int = field(default=128, metadata={"help": "Batch size of the gradient passes over candidates."})

    def __post_init__(self) -> None:
        _check(self.top_m >= 0, "output.top_m", f"got {self.top_m}", "use a positive integer, or 0 for all candidates")
        _check(self.chunk_size >= 1, "output.chunk_size", f"got {self.chunk_size}", "e.g. output.chunk_size=8")
        _check(self.report_top >= 1, "output.report_top", f"got {self.report_top}", "e.g. output.report_top=5")
        _check(self.score_batch_size >= 1, "output.score_batch_size", f"got {self.score_batch_size}", "e.g. output.score_batch_size=128")


@dataclass
class InfluenceSettings(ExperimentSettings):
    """Settings of `fastif influence`."""

    tests: TestSelectionConfig = field(default_factory=TestSelectionConfig, metadata={"help": "Which test points."})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "What is kept and written."})
    resume: Optional[str] = field(default=None, metadata={"help": "Run folder of an unfinished influence run to finish (same config)."})


SCHEMA = InfluenceSettings


def resume_folder(settings: InfluenceSettings, config_hash: str) -> Optional[Path]:
    """The unfinished run to continue: ``resume=<dir>``, else the newest killed run with this config."""
    from fastif.runs import unfinished_runs

    if settings.resume:
        return Path(settings.resume).expanduser()
    found = unfinished_runs(settings.paths.outputs, "influence", settings.experiment_name, config_hash)
    return found[0] if found else None


def _candidates(settings: InfluenceSettings, workbench, queries, run: Run):
    """Per query: training positions in kNN order and their distances (None for a full scan)."""
    import torch

    from fastif.commands.index import ensure_index
    from fastif.knn import FeatureSpec, extract_features
    from fastif.pipeline import merge_neighbours

    n = len(workbench.data["train"])
    k = settings.knn.resolve_k(n)
    if k >= n:
        everything = torch.arange(n)
        return [everything for _ in queries], [None for _ in queries]
    index = ensure_index(settings, workbench, run)
    test = workbench.data[settings.tests.split]
    spec = FeatureSpec.from_config(settings.knn)
    rows = sorted({r for q in queries for r in q.rows})
    feats = extract_features(workbench.model, torch.utils.data.Subset(test, rows), spec, device=workbench.device,
                             batch_size=settings.knn.batch_size)
    positions, distances = index.search(feats, k)
    where = {r: i for i, r in enumerate(rows)}
    cands, dists = [], []
    for q in queries:
        members = [where[r] for r in q.rows]
        if len(members) == 1:
            cands.append(positions[members[0]])
            dists.append(distances[members[0]])
        else:
            p, d = merge_neighbours(positions[members], distances[members], k, larger_is_closer=settings.knn.metric == "ip")
            cands.append(p)
            dists.append(d)
    return cands, dists


def execute(settings: InfluenceSettings, run: Run) -> None:
    import pandas as pd

    from fastif.engine.hessian import HessianOperator
    from fastif.engine.solvers import LissaSolver
    from fastif.models import label_names, resolve_device
    from fastif.pipeline import SIGN_CONVENTION, Distributed, markdown_report, score_chunk, select_queries
    from fastif.training import predict
    from fastif.workbench import loss_fn, make_solver, open_workbench

    dist = Distributed.from_environment(resolve_device(settings.device))
    if not dist.is_main:
        dist.barrier()  # rank 0 first trains the demo model / builds the index if they are missing
    workbench = open_workbench(settings, run, splits=("train", settings.tests.split))
    hvp = workbench.hvp
    train, test = workbench.data["train"], workbench.data[settings.tests.split]
    test_frame, train_frame = workbench.frames[settings.tests.split], workbench.frames["train"]
    probs, losses = predict(workbench.model, test, settings.train.eval_batch_size, workbench.device)
    queries = select_queries(test_frame, probs.argmax(1), mode=settings.tests.mode, n=settings.tests.n, ids=settings.tests.ids,
                             seed=settings.tests.seed, group_column=settings.tests.group_column,
                             anchors_per_group=settings.tests.anchors_per_group)
    if not queries:
        raise ConfigError(f"No test point of split '{settings.tests.split}' matches tests.mode={settings.tests.mode}. "
                          f"Fix: choose another mode (e.g. tests.mode=first) or split.")
    if dist.is_main:
        found = _candidates(settings, workbench, queries, run)
        dist.barrier()
    candidates, distances = dist.broadcast(found if dist.is_main else None)

    operator = HessianOperator(workbench.model, loss_fn, train, workbench.selection, batch_size=64)
    solver = make_solver(hvp, chains=math.ceil(hvp.chains / dist.world_size))
    if isinstance(solver, LissaSolver) and solver.scale is None:
        solver.scale = solver.resolve_scale(operator, hvp.damping)  # once, so every chunk and rank solves one system
    run.annotate(sign_convention=SIGN_CONVENTION, n_queries=len(queries), world_size=dist.world_size,
                 solver={"name": solver.name, "damping": hvp.damping, "scale": getattr(solver, "scale", None),
                         "chains": hvp.chains}, candidates_per_query=int(len(candidates[0])))

    chunk_dir = run.dir / CHUNKS_DIR
    size = settings.output.chunk_size
    chunk_count = math.ceil(len(queries) / size)
    for ci in range(chunk_count):
        done = (chunk_dir / f"influence_{ci:05d}.parquet").exists() and (chunk_dir / f"tests_{ci:05d}.parquet").exists()
        if dist.broadcast(done):
            run.log.info("chunk %d/%d already done (resumed)", ci + 1, chunk_count)
            continue
        if isinstance(solver, LissaSolver):
            solver.seed = hvp.seed + 1000 * ci + 100_003 * dist.rank  # chunk-determined: a resumed run repeats it exactly
        part = slice(ci * size, (ci + 1) * size)
        result = score_chunk(model=workbench.model, loss_fn=loss_fn, train=train, test=test, queries=queries[part],
                             candidates=candidates[part], distances=distances[part], selection=workbench.selection,
                             operator=operator, solver=solver, damping=hvp.damping, top_m=settings.output.top_m,
                             train_frame=train_frame, test_frame=test_frame, test_probs=probs, test_losses=losses,
                             split=settings.tests.split, chunk=ci, dist=dist, batch_size=settings.output.score_batch_size)
        if dist.is_main:
            run.write_parquet(f"{CHUNKS_DIR}/influence_{ci:05d}.parquet", result.influence)
            run.write_parquet(f"{CHUNKS_DIR}/tests_{ci:05d}.parquet", result.tests)
            run.log.info("chunk %d/%d: %d queries in %.1f s", ci + 1, chunk_count, len(result.tests), result.seconds)
    dist.barrier()
    if not dist.is_main:
        return
    influence = pd.concat([pd.read_parquet(chunk_dir / f"influence_{ci:05d}.parquet") for ci in range(chunk_count)], ignore_index=True)
    tests = pd.concat([pd.read_parquet(chunk_dir / f"tests_{ci:05d}.parquet") for ci in range(chunk_count)], ignore_index=True)
    run.write_parquet("influence.parquet", influence)
    run.write_parquet("tests.parquet", tests)
    if settings.output.csv:
        run.write_text("influence.csv", influence.to_csv(index=False))
    names = label_names(settings.model.num_labels)
    run.write_text("report.md", markdown_report(influence, tests, names, top=settings.output.report_top))
    run.log.info("%d test queries, %d rows: %s", len(tests), len(influence), Path(run.dir) / "influence.parquet")
