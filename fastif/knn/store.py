"""A kNN index with its training-example ids and provenance, saved as one directory.

Layout of a saved index directory::

    metadata.json   provenance + build facts (see below)
    ids.json        training-example ids; search returns positions into this list
    index/          the backend's files (backend.json + index.faiss or vectors.npy)

The directory is written under a temporary name and renamed into place, so a reader
never sees a half-written index. ``metadata.json`` holds what ``build_index``
records (n_vectors, dim, backend, index_factory, metric, nprobe, ef_search,
feature_spec, build_seconds, fastif_version, created_at, format_version) plus what
the caller passes to ``KnnIndex.save`` -- by convention ``model_hash``
(``checkpoint_hash`` or ``state_dict_hash``) and ``dataset_fingerprint``
(``dataset_fingerprint``). ``load_index(dir, expect=...)`` refuses an index whose
metadata differs from ``expect`` with an ``IndexMismatchError`` naming the field.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from fastif.config import KnnConfig
from fastif.errors import IndexMismatchError, InputError
from fastif.knn.backends import NearestNeighborIndex, make_index
from fastif.knn.features import FeatureSpec

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
IDS_FILE = "ids.json"
INDEX_DIR = "index"

# What a differing metadata field means, for the refusal message.
_FIELD_MEANING = {
    "model_hash": "model checkpoint",
    "dataset_fingerprint": "training dataset",
    "feature_spec": "feature spec",
    "metric": "distance metric",
    "index_factory": "index structure",
}


@dataclass
class KnnIndex:
    """A nearest-neighbour index over training examples: ``search`` returns positions
    into ``ids`` (= the training pool's order), best first."""

    index: NearestNeighborIndex
    ids: list[str]
    metadata: dict = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.dim

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions int64 (q, k), distances float32 (q, k)); see fastif.knn.backends
        for the distance convention (l2: squared, ascending; ip: descending)."""
        return self.index.search(queries, k)

    def save(self, directory, metadata: Optional[Mapping[str, Any]] = None) -> Path:
        """Write atomically into ``directory`` (replacing an existing index there);
        ``metadata`` (e.g. model_hash, dataset_fingerprint) is merged into the
        recorded metadata. Returns the directory."""
        directory = Path(directory)
        if metadata:
            self.metadata.update(_jsonable(dict(metadata)))
        self.metadata["format_version"] = FORMAT_VERSION
        with _atomic_directory(directory) as tmp:
            self.index.save(tmp / INDEX_DIR)
            (tmp / IDS_FILE).write_text(json.dumps(self.ids))
            (tmp / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2, sort_keys=True))
        return directory


def build_index(features, ids: Sequence[str], cfg: KnnConfig) -> KnnIndex:
    """Index ``features`` (n, d) of the training examples ``ids`` (same order) as
    ``cfg`` says (backend, index_factory, metric, nprobe, ef_search, device)."""
    ids = [str(i) for i in ids]
    n = features.shape[0] if hasattr(features, "shape") else len(features)
    if len(ids) != n:
        raise InputError(f"Got {n} feature vectors but {len(ids)} ids. Fix: pass one id per training example, in the same order as the features.")
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, c in _counts(ids).items() if c > 1)
        raise InputError(f"Training example ids must be unique; '{duplicate}' appears more than once. Fix: de-duplicate the training split's id column.")
    if n == 0 or len(features.shape) != 2:
        raise InputError(f"Features must be a non-empty (n, d) matrix, got shape {tuple(features.shape)}. Fix: extract features of a non-empty training split.")
    started = time.perf_counter()
    index = make_index(cfg, int(features.shape[1]))
    index.add(features)
    seconds = time.perf_counter() - started
    from fastif import __version__

    metadata = {
        "n_vectors": index.ntotal,
        "dim": index.dim,
        "backend": index.backend,
        "index_factory": index.index_string,
        "metric": index.metric,
        "nprobe": cfg.nprobe,
        "ef_search": cfg.ef_search,
        "feature_spec": FeatureSpec.from_config(cfg).to_dict(),
        "build_seconds": round(seconds, 3),
        "fastif_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return KnnIndex(index=index, ids=ids, metadata=metadata)


def read_metadata(directory) -> dict:
    """The metadata of a saved index (InputError when there is none)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise InputError(f"No kNN index in {directory} ({METADATA_FILE} is missing). Fix: build one with `fastif index experiment=<name>`.")
    return json.loads(path.read_text())


def find_mismatches(metadata: Mapping[str, Any], expect: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, expected, found) for every field of ``expect`` that ``metadata`` lacks or differs in."""
    found_all = _jsonable(dict(metadata))
    wanted = [(key, _jsonable(value)) for key, value in expect.items()]  # keeps the caller's order
    return [(key, value, found_all.get(key)) for key, value in wanted if found_all.get(key) != value]


def load_index(directory, expect: Optional[Mapping[str, Any]] = None, *, device: str = "auto") -> KnnIndex:
    """Load a saved index, refusing (IndexMismatchError) one whose metadata differs
    from ``expect`` -- e.g. ``{"model_hash": ..., "dataset_fingerprint": ...,
    "feature_spec": spec.to_dict()}``."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    mismatches = find_mismatches(metadata, expect or {})
    if mismatches:
        parts = [f"{_FIELD_MEANING.get(key, key)} differs ({key}: expected {_short(want)}, found {_short(got)})" for key, want, got in mismatches]
        raise IndexMismatchError(
            f"The kNN index in {directory} was built for something else: {'; '.join(parts)}. "
            "Fix: rebuild it with `fastif index experiment=<name>` for the current model and data, or pass knn.rebuild=true."
        )
    ids = json.loads((directory / IDS_FILE).read_text())
    index = NearestNeighborIndex.load(directory / INDEX_DIR, device=device)
    if not index.ntotal == len(ids) == metadata.get("n_vectors", len(ids)):
        raise InputError(
            f"The kNN index in {directory} is inconsistent ({index.ntotal} vectors, {len(ids)} ids, metadata says {metadata.get('n_vectors')}). "
            "Fix: rebuild it with `fastif index` or pass knn.rebuild=true."
        )
    return KnnIndex(index=index, ids=ids, metadata=metadata)


# -- fingerprints ----------------------------------------------------------------------------


def checkpoint_hash(path) -> str:
    """sha256 (hex) of a checkpoint file's bytes, or of a checkpoint directory (relative
    paths + file hashes) -- the same digest ``fastif.runs.Run.record_input`` stores in
    run manifests, so an index's model_hash can be matched against a training run's."""
    from fastif.runs import directory_sha256, file_sha256

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise InputError(f"Checkpoint {path} does not exist. Fix: train the model first (`fastif train`) or correct model.name_or_path.")
    digest, n_files, _ = directory_sha256(path)
    if n_files == 0:
        raise InputError(f"Checkpoint directory {path} contains no files. Fix: point model.name_or_path at a saved checkpoint.")
    return digest


def state_dict_hash(module: torch.nn.Module) -> str:
    """sha256 (hex) of a model's state dict (names, dtypes, shapes, values) -- the
    model_hash of an in-memory model that has no checkpoint on disk."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}\0".encode())
        _update_tensor(digest, tensor)
    return digest.hexdigest()


def dataset_fingerprint(ids: Sequence[Any], content: Any = None) -> str:
    """sha256 (hex) of a training pool: its ids in order, plus optional content --
    a sequence of strings (e.g. premise + hypothesis + label), a tensor/array, or a
    mapping / DataFrame of columns (hashed in sorted column order)."""
    digest = hashlib.sha256(b"fastif-dataset-v1\0")
    _update_strings(digest, [str(i) for i in ids])
    if content is not None:
        _update_content(digest, content)
    return digest.hexdigest()


def _update_content(digest, content) -> None:
    if hasattr(content, "columns"):  # pandas DataFrame
        content = {str(col): content[col].to_numpy() for col in content.columns}
    if isinstance(content, Mapping):
        for key in sorted(content):
            digest.update(f"\0column:{key}\0".encode())
            _update_content(digest, content[key])
    elif torch.is_tensor(content):
        _update_tensor(digest, content)
    elif isinstance(content, np.ndarray) and content.dtype.kind in "biufc":
        with warnings.catch_warnings():  # read-only arrays (pandas columns) are only read here
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(np.ascontiguousarray(content))
        _update_tensor(digest, tensor)
    elif isinstance(content, (Sequence, np.ndarray)) and not isinstance(content, (str, bytes)):
        _update_strings(digest, [str(v) for v in content])
    else:
        raise InputError(f"Cannot fingerprint dataset content of type {type(content).__name__}. Fix: pass texts (list of str), tensors, or a mapping of columns.")


def _update_strings(digest, values: Sequence[str]) -> None:
    digest.update(f"strings:{len(values)}\0".encode())
    for value in values:
        data = value.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)


def _update_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


# -- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_directory(target: Path):
    """Yield a temporary sibling directory; on success it replaces ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    """Normalise through JSON so that tuples/lists and int/float keys compare as stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    text = json.dumps(value, sort_keys=True) if value is not None else "nothing"
    return text if len(text) <= 120 else text[:117] + "..."


def _counts(values: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts
