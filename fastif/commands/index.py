"""`fastif index`: the kNN candidate index over the training pool's model features.

Writes ``<run>/index/`` (the index, the training ids, and metadata: model checkpoint hash,
dataset fingerprint, feature spec, index string, build time) and, with
``knn.audit.enabled=true``, the recall audit (``recall.parquet``, ``recall.png``): full-scan
influence for a sample of test points against the kNN candidate sets of several sizes.
Other commands reuse the latest matching index through :func:`ensure_index`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastif.commands import ExperimentSettings
from fastif.errors import IndexMismatchError
from fastif.runs import Run, latest_complete

INDEX_DIR = "index"
log = logging.getLogger("fastif.run.index")


@dataclass
class IndexSettings(ExperimentSettings):
    """Settings of `fastif index`: the experiment's groups; the knn section holds the index and audit knobs."""


SCHEMA = IndexSettings


def index_expectation(settings: ExperimentSettings, workbench) -> dict:
    """The provenance an index must match to serve this model and training pool."""
    from fastif.knn import FeatureSpec, checkpoint_hash, dataset_fingerprint, state_dict_hash

    frame = workbench.frames["train"]
    local = Path(workbench.model_source).exists()  # a hub id has no files here: hash the loaded weights
    return {
        "model_hash": checkpoint_hash(workbench.model_source) if local else state_dict_hash(workbench.model),
        "dataset_fingerprint": dataset_fingerprint(list(frame["id"]), frame[["premise", "hypothesis", "label"]]),
        "feature_spec": FeatureSpec.from_config(settings.knn).to_dict(),
    }


def build_and_save(settings: ExperimentSettings, workbench, run: Run):
    """Extract training features, build the index and save it into ``<run>/index``."""
    from fastif.knn import FeatureSpec, build_index, extract_features
    from fastif.runs import progress_enabled

    spec = FeatureSpec.from_config(settings.knn)
    start = time.perf_counter()
    features = extract_features(workbench.model, workbench.data["train"], spec, device=workbench.device,
                                batch_size=settings.knn.batch_size, progress=progress_enabled())
    index = build_index(features, workbench.data["train"].ids, settings.knn)
    index.save(run.dir / INDEX_DIR, index_expectation(settings, workbench))
    run.log.info("index: %d vectors of dimension %d (%s, %s) in %.1f s", features.shape[0], features.shape[1],
                 settings.knn.index_factory, index.metadata.get("backend"), time.perf_counter() - start)
    return index


def ensure_index(settings: ExperimentSettings, workbench, run: Run):
    """The latest complete index of this experiment that matches the model and data; built on first use.

    A mismatching index is refused (IndexMismatchError naming what differs) unless
    ``knn.rebuild=true``, which builds a fresh one in a new index run.
    """
    from omegaconf import OmegaConf

    from fastif.knn import load_index

    outputs = Path(settings.paths.outputs)
    latest = latest_complete(outputs, "index", settings.experiment_name)
    if latest is not None and (latest / INDEX_DIR).is_dir():
        try:
            index = load_index(latest / INDEX_DIR, expect=index_expectation(settings, workbench), device=settings.knn.device)
            run.record_input(latest / INDEX_DIR, "knn_index")
            return index
        except IndexMismatchError:
            if not settings.knn.rebuild:
                raise
            log.info("index of %s does not match; knn.rebuild=true: building a new one", latest)
    shared = {item.name: getattr(settings, item.name) for item in dataclasses.fields(ExperimentSettings)}
    index_settings = IndexSettings(**shared)
    index_settings.knn = dataclasses.replace(index_settings.knn, audit=dataclasses.replace(index_settings.knn.audit, enabled=False))
    with Run(outputs, "index", settings.experiment_name, config=OmegaConf.to_container(OmegaConf.structured(index_settings)),
             seed=settings.seed, device=settings.device) as index_run:
        run.log.info("building the kNN index in %s", index_run.dir)
        index = build_and_save(index_settings, workbench, index_run)
    run.record_input(index_run.dir / INDEX_DIR, "knn_index")
    return index


def recall_audit_run(settings: ExperimentSettings, workbench, index, run: Run) -> None:
    """FastIF's recall study: how many of the full-scan top-m influential points the kNN set holds."""
    import torch

    from fastif.engine.hessian import HessianOperator
    from fastif.engine.scoring import query_gradients, score_candidates
    from fastif.knn import FeatureSpec, extract_features, plot_recall, recall_audit, recall_summary, resolve_ks
    from fastif.workbench import loss_fn, make_solver

    audit = settings.knn.audit
    test = workbench.data[audit.split]
    n = len(workbench.data["train"])
    gen = torch.Generator().manual_seed(audit.seed)
    picked = torch.randperm(len(test), generator=gen)[: audit.n_test].tolist()
    queries = test.subset(picked)
    ks = resolve_ks(audit.ks, n)
    spec = FeatureSpec.from_config(settings.knn)
    q_features = extract_features(workbench.model, queries, spec, device=workbench.device, batch_size=settings.knn.batch_size)
    candidates, _ = index.search(q_features, max(ks))
    operator = HessianOperator(workbench.model, loss_fn, workbench.data["train"], workbench.selection, batch_size=64)
    grads = query_gradients(workbench.model, loss_fn, queries, workbench.selection)
    s_test = make_solver(workbench.hvp).solve(operator, grads, workbench.hvp.damping).vectors
    scores = score_candidates(workbench.model, loss_fn, workbench.data["train"], s_test, workbench.selection, batch_size=128)
    table = recall_audit(scores, candidates, ks, audit.ms)
    run.write_parquet("recall.parquet", table)
    plot_recall(table, run.dir / "recall.png")
    summary = recall_summary(table, m=min(audit.ms, key=lambda m: abs(m - 10)))
    run.write_text("recall.md", summary.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else summary.to_string(index=False))
    run.log.info("recall audit (%d test points of %s, N=%d):\n%s", len(picked), audit.split, n, summary.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def execute(settings: IndexSettings, run: Run) -> None:
    from fastif.workbench import open_workbench

    splits = ("train", settings.knn.audit.split) if settings.knn.audit.enabled else ("train",)
    workbench = open_workbench(settings, run, splits=splits)
    index = build_and_save(settings, workbench, run)
    if settings.knn.audit.enabled:
        recall_audit_run(settings, workbench, index, run)
