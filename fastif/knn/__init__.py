"""kNN prefilter: model features, nearest-neighbour indexes (faiss or exact torch),
saved indexes with provenance checks, and the recall audit.

Typical use (what ``fastif index`` does)::

    spec = FeatureSpec.from_config(cfg.knn)
    features = extract_features(model, encoded_train, spec, device=device, batch_size=cfg.knn.batch_size)
    index = build_index(features, encoded_train.ids, cfg.knn)
    index.save(run_dir / "index", {"model_hash": checkpoint_hash(ckpt), "dataset_fingerprint": fingerprint})
    ...
    index = load_index(run_dir / "index", expect={"model_hash": ..., "dataset_fingerprint": ..., "feature_spec": spec.to_dict()})
    positions, distances = index.search(extract_features(model, encoded_test, spec, ...), k)
"""

from fastif.knn.audit import RANKINGS, plot_recall, recall_audit, recall_summary, resolve_ks
from fastif.knn.backends import FaissIndex, NearestNeighborIndex, TorchExactIndex, import_faiss, make_index
from fastif.knn.features import FeatureSpec, extract_features, find_classifier_layer
from fastif.knn.store import (
    KnnIndex,
    build_index,
    checkpoint_hash,
    dataset_fingerprint,
    find_mismatches,
    load_index,
    read_metadata,
    state_dict_hash,
)

__all__ = [
    "RANKINGS",
    "FaissIndex",
    "FeatureSpec",
    "KnnIndex",
    "NearestNeighborIndex",
    "TorchExactIndex",
    "build_index",
    "checkpoint_hash",
    "dataset_fingerprint",
    "extract_features",
    "find_classifier_layer",
    "find_mismatches",
    "import_faiss",
    "load_index",
    "make_index",
    "plot_recall",
    "read_metadata",
    "recall_audit",
    "recall_summary",
    "resolve_ks",
    "state_dict_hash",
]
