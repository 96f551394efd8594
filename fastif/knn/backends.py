"""Nearest-neighbour indexes behind one small interface.

``NearestNeighborIndex`` holds vectors numbered 0..ntotal-1 in insertion order and
answers ``search(queries, k) -> (ids, distances)``, both (q, k) CPU tensors, best
match first:

- metric ``l2``: distances are SQUARED Euclidean distances, ascending (smaller = closer);
- metric ``ip``: "distances" are inner products, descending (larger = closer);
  with L2-normalised vectors this is cosine similarity and gives the same
  neighbours as ``l2``.

When an approximate index finds fewer than k vectors (an IVF probing too few cells),
the missing slots hold id -1 and distance +inf (l2) / -inf (ip).

Backends:

- ``FaissIndex``: any faiss ``index_factory`` string (Flat, IVF4096,Flat, HNSW32,
  IVF4096,PQ32, ...). Trains on a random sample when the index needs training.
  Search settings: ``nprobe`` (IVF cells visited, default 16) and ``ef_search``
  (HNSW candidate list, default 128; faiss uses max(ef_search, k)). On a machine
  where faiss sees GPUs the index lives there (``index_cpu_to_all_gpus``) and is
  saved back as a CPU index. faiss is optional and imported lazily.
- ``TorchExactIndex``: exact search with chunked matmul + topk, on CUDA when
  available. Memory is bounded by chunking both queries and database: the
  temporary score block is (query_batch_size, chunk_size) floats.

``make_index(cfg, dim)`` picks the backend from a ``KnnConfig``.
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch

from fastif.config import METRICS, KnnConfig
from fastif.errors import ConfigError, InputError
from fastif.models import resolve_device

log = logging.getLogger(__name__)

SETTINGS_FILE = "backend.json"
# faiss GPU k-selection handles at most this many neighbours per query; larger k
# searches a CPU copy of the index instead.
GPU_MAX_K = 2048
# Training sample of an index that needs training: 64 points per IVF cell (faiss
# warns below 39) and at least this many.
MIN_TRAIN_SAMPLE = 100_000
TRAIN_POINTS_PER_CELL = 64


def import_faiss():
    """The faiss module, or None when it is not installed (imported on each call so
    that tests can hide it through ``sys.modules``)."""
    try:
        import faiss  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    return faiss


def _require_faiss():
    faiss = import_faiss()
    if faiss is None:
        raise ConfigError(
            "The faiss backend was requested but faiss is not installed. Fix: `pip install faiss-cpu` "
            "(or faiss-gpu-cu12; extras fastif[cpu] / fastif[gpu]), or set knn.backend=torch (exact search)."
        )
    return faiss


def _as_matrix(vectors, dim: Optional[int], what: str) -> np.ndarray:
    """Contiguous float32 (n, d) numpy view/copy of a tensor or array, checked."""
    if torch.is_tensor(vectors):
        vectors = vectors.detach().to("cpu", torch.float32).numpy()
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise InputError(f"{what} must be a 2-D (n, d) matrix, got shape {array.shape}. Fix: stack the vectors into one (n, d) tensor.")
    if dim is not None and array.shape[1] != dim:
        raise InputError(f"{what} have dimension {array.shape[1]} but the index has dimension {dim}. Fix: use features from the same model and feature spec as the index.")
    if not np.isfinite(array).all():
        raise InputError(f"{what} contain NaN or infinite values. Fix: check the model's features (a diverged checkpoint?).")
    return array


def _check_k(k: int, ntotal: int) -> None:
    if ntotal == 0:
        raise InputError("The index is empty. Fix: add vectors before searching.")
    if not 1 <= k <= ntotal:
        raise InputError(f"Asked for k={k} neighbours from an index of {ntotal} vectors. Fix: use 1 <= k <= {ntotal} (e.g. knn.k=all for a full scan).")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"Unknown metric '{metric}'. Fix: use knn.metric=l2 or knn.metric=ip.")


class NearestNeighborIndex(ABC):
    """Vectors numbered 0..ntotal-1 in insertion order; see the module doc for the
    distance and ordering conventions."""

    backend: ClassVar[str]

    def __init__(self, dim: int, metric: str) -> None:
        if dim < 1:
            raise InputError(f"Index dimension must be >= 1, got {dim}. Fix: pass features of shape (n, d) with d >= 1.")
        _check_metric(metric)
        self.dim = int(dim)
        self.metric = metric

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of vectors in the index."""

    @property
    @abstractmethod
    def index_string(self) -> str:
        """faiss-style description of the index structure (``Flat`` for exact)."""

    @abstractmethod
    def add(self, vectors) -> None:
        """Append vectors (n, dim); an index that needs training trains on them first."""

    @abstractmethod
    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64 (q, k), distances float32 (q, k)), best first, on the CPU."""

    @abstractmethod
    def settings(self) -> dict:
        """JSON-able constructor settings, stored next to the saved index."""

    @abstractmethod
    def _save_data(self, directory: Path) -> None: ...

    @classmethod
    @abstractmethod
    def _load_data(cls, directory: Path, settings: dict, device: str) -> "NearestNeighborIndex": ...

    def save(self, directory) -> None:
        """Write the index into ``directory`` (created if missing). Not atomic on its
        own; ``fastif.knn.store`` wraps it in an atomic directory swap."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_data(directory)
        settings = {"backend": self.backend, **self.settings(), "ntotal": self.ntotal}
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))

    @staticmethod
    def load(directory, device: str = "auto") -> "NearestNeighborIndex":
        """Load an index saved by ``save`` with whichever backend wrote it."""
        directory = Path(directory)
        path = directory / SETTINGS_FILE
        if not path.is_file():
            raise InputError(f"No saved nearest-neighbour index in {directory} ({SETTINGS_FILE} is missing). Fix: build it with `fastif index`.")
        settings = json.loads(path.read_text())
        classes = {cls.backend: cls for cls in (FaissIndex, TorchExactIndex)}
        name = settings.pop("backend", None)
        if name not in classes:
            raise InputError(f"Index in {directory} has unknown backend '{name}'. Fix: rebuild it with `fastif index`.")
        settings.pop("ntotal", None)
        return classes[name]._load_data(directory, settings, device)


class TorchExactIndex(NearestNeighborIndex):
    """Exact search with chunked matmul + topk (CPU, or CUDA when available)."""

    backend = "torch"

    def __init__(self, dim: int, metric: str = "l2", *, device: str = "auto", query_batch_size: int = 1024, chunk_size: Optional[int] = None) -> None:
        super().__init__(dim, metric)
        if query_batch_size < 1 or (chunk_size is not None and chunk_size < 1):
            raise ConfigError(f"query_batch_size and chunk_size must be >= 1, got {query_batch_size} and {chunk_size}. Fix: leave them at their defaults.")
        self.device = resolve_device(device)
        self.query_batch_size = int(query_batch_size)
        # 16k x 1k fp32 scores = 64 MB per block on the CPU; 256k x 1k = 1 GB on a GPU.
        self.chunk_size = int(chunk_size) if chunk_size else (262_144 if self.device.type == "cuda" else 16_384)
        self._vectors = torch.empty(0, self.dim, dtype=torch.float32)
        self._device_vectors: Optional[torch.Tensor] = None  # cached copy on the GPU when it fits

    @property
    def ntotal(self) -> int:
        return self._vectors.shape[0]

    @property
    def index_string(self) -> str:
        return "Flat"

    def settings(self) -> dict:
        return {"dim": self.dim, "metric": self.metric, "index_factory": "Flat", "query_batch_size": self.query_batch_size, "chunk_size": self.chunk_size}

    def add(self, vectors) -> None:
        array = torch.from_numpy(_as_matrix(vectors, self.dim, "Vectors"))
        self._vectors = torch.cat([self._vectors, array]) if self.ntotal else array.clone()
        self._device_vectors = None

    def _database(self) -> torch.Tensor:
        """The database on the search device when it fits there, else on the CPU
        (then chunks stream to the device during search)."""
        if self.device.type != "cuda":
            return self._vectors
        if self._device_vectors is None:
            free, _total = torch.cuda.mem_get_info(self.device)
            needed = self._vectors.numel() * 4
            self._device_vectors = self._vectors.to(self.device) if needed < free // 2 else self._vectors
        return self._device_vectors

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        queries = torch.from_numpy(_as_matrix(queries, self.dim, "Queries"))
        _check_k(k, self.ntotal)
        database = self._database()
        ids = torch.empty(queries.shape[0], k, dtype=torch.int64)
        dists = torch.empty(queries.shape[0], k, dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, queries.shape[0], self.query_batch_size):
                q = queries[start : start + self.query_batch_size].to(self.device)
                batch_ids, batch_dists = self._search_block(q, database, k)
                ids[start : start + q.shape[0]] = batch_ids.cpu()
                dists[start : start + q.shape[0]] = batch_dists.cpu()
        return ids, dists

    def _search_block(self, q: torch.Tensor, database: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        l2 = self.metric == "l2"
        # For l2 rank by ||x||^2 - 2 q.x (||q||^2 is constant per query; added at the end).
        best = torch.full((q.shape[0], k), math.inf if l2 else -math.inf, device=self.device)
        best_ids = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=self.device)
        for offset in range(0, database.shape[0], self.chunk_size):
            x = database[offset : offset + self.chunk_size].to(self.device, non_blocking=True)
            if l2:
                scores = torch.addmm((x * x).sum(dim=1).unsqueeze(0), q, x.T, alpha=-2.0)
            else:
                scores = q @ x.T
            vals, idx = scores.topk(min(k, x.shape[0]), dim=1, largest=not l2)
            merged_vals = torch.cat([best, vals], dim=1)
            merged_ids = torch.cat([best_ids, idx + offset], dim=1)
            best, order = merged_vals.topk(k, dim=1, largest=not l2)
            best_ids = merged_ids.gather(1, order)
        if l2:
            best = (best + (q * q).sum(dim=1, keepdim=True)).clamp_min_(0.0)
        return best_ids, best

    def _save_data(self, directory: Path) -> None:
        np.save(directory / "vectors.npy", self._vectors.numpy())

    @classmethod
    def _load_data(cls, directory: Path, settings: dict, device: str) -> "TorchExactIndex":
        index = cls(settings["dim"], settings["metric"], device=device, query_batch_size=settings.get("query_batch_size", 1024))
        index.add(np.load(directory / "vectors.npy"))
        return index


class FaissIndex(NearestNeighborIndex):
    """A faiss index built from an ``index_factory`` string; GPU when faiss sees one."""

    backend = "faiss"

    def __init__(
        self,
        dim: int,
        index_factory: str = "Flat",
        metric: str = "l2",
        *,
        nprobe: int = 16,
        ef_search: int = 128,
        device: str = "auto",
        query_batch_size: int = 4096,
        seed: int = 0,
        _cpu_index=None,
    ) -> None:
        super().__init__(dim, metric)
        faiss = _require_faiss()
        self.index_factory = index_factory
        self.nprobe = int(nprobe)
        self.ef_search = int(ef_search)
        self.device = device
        self.query_batch_size = int(query_batch_size)
        self.seed = int(seed)
        if _cpu_index is None:
            faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
            try:
                _cpu_index = faiss.index_factory(self.dim, index_factory, faiss_metric)
            except RuntimeError as exc:
                raise ConfigError(
                    f"faiss cannot build index_factory '{index_factory}' for dimension {self.dim}: {_first_line(exc)}. "
                    "Fix: use a valid factory string such as Flat, IVF1024,Flat, HNSW32 or IVF1024,PQ16 (PQ's M must divide the dimension)."
                ) from None
            _skip_polysemous_training(_cpu_index, faiss)
        self._apply_search_params(_cpu_index)
        self._nlist = _ivf_cells(_cpu_index, faiss)
        self.on_gpu = False
        self._index = self._to_device(_cpu_index)
        self._cpu_copy = None  # for k > GPU_MAX_K on a GPU index

    # -- placement ---------------------------------------------------------------
    def _use_gpu(self) -> bool:
        faiss = _require_faiss()
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if self.device == "cpu":
            return False
        if self.device == "auto":
            return gpus > 0
        if gpus == 0:
            raise ConfigError(f"knn.device={self.device} but faiss sees no GPU (faiss-cpu installed, or no CUDA device). Fix: install faiss-gpu-cu12 on a GPU machine, or set knn.device=auto or cpu.")
        return True

    def _to_device(self, cpu_index):
        if not self._use_gpu():
            return cpu_index
        faiss = _require_faiss()
        try:
            if self.device.startswith("cuda:"):
                self._gpu_resources = faiss.StandardGpuResources()
                gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, int(self.device[5:]), cpu_index)
            else:
                gpu_index = faiss.index_cpu_to_all_gpus(cpu_index)
        except (RuntimeError, AttributeError) as exc:  # e.g. HNSW has no GPU implementation
            log.info("faiss index %s stays on the CPU: %s", self.index_factory, _first_line(exc))
            return cpu_index
        self.on_gpu = True
        return gpu_index

    def _cpu_index(self):
        if not self.on_gpu:
            return self._index
        return _require_faiss().index_gpu_to_cpu(self._index)

    def _apply_search_params(self, cpu_index) -> None:
        faiss = _require_faiss()
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search)):
            try:
                space.set_index_parameter(cpu_index, name, value)
            except RuntimeError:
                pass  # the parameter does not apply to this index type

    # -- interface -----------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def index_string(self) -> str:
        return self.index_factory

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def settings(self) -> dict:
        return {
            "dim": self.dim,
            "metric": self.metric,
            "index_factory": self.index_factory,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "query_batch_size": self.query_batch_size,
            "seed": self.seed,
        }

    def add(self, vectors) -> None:
        array = _as_matrix(vectors, self.dim, "Vectors")
        if not self._index.is_trained:
            self._train(array)
        self._index.add(array)
        self._cpu_copy = None

    def _train(self, array: np.ndarray) -> None:
        nlist = self._nlist
        if nlist and array.shape[0] < nlist:
            raise ConfigError(
                f"index_factory '{self.index_factory}' has {nlist} IVF cells but only {array.shape[0]} vectors to train on. "
                f"Fix: use fewer cells (e.g. knn.index_factory=IVF{_suggest_cells(array.shape[0])},Flat) or knn.index_factory=Flat."
            )
        size = min(array.shape[0], max(MIN_TRAIN_SAMPLE, TRAIN_POINTS_PER_CELL * nlist))
        if size < array.shape[0]:
            rows = np.sort(np.random.default_rng(self.seed).choice(array.shape[0], size=size, replace=False))
            sample = array[rows]
        else:
            sample = array
        try:
            self._index.train(sample)
        except RuntimeError as exc:
            raise ConfigError(f"faiss could not train '{self.index_factory}' on {size} vectors: {_first_line(exc)}. Fix: use a smaller index (fewer IVF cells / PQ bits) or knn.index_factory=Flat.") from None

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        array = _as_matrix(queries, self.dim, "Queries")
        _check_k(k, self.ntotal)
        index = self._index
        if self.on_gpu and k > GPU_MAX_K:
            if self._cpu_copy is None:
                log.info("k=%d exceeds faiss GPU's limit of %d: searching a CPU copy of the index", k, GPU_MAX_K)
                self._cpu_copy = self._cpu_index()
            index = self._cpu_copy
        dists = np.empty((array.shape[0], k), dtype=np.float32)
        ids = np.empty((array.shape[0], k), dtype=np.int64)
        for start in range(0, array.shape[0], self.query_batch_size):
            stop = start + self.query_batch_size
            dists[start:stop], ids[start:stop] = index.search(array[start:stop], k)
        missing = ids < 0
        if missing.any():
            dists[missing] = np.inf if self.metric == "l2" else -np.inf
        return torch.from_numpy(ids), torch.from_numpy(dists)

    def _save_data(self, directory: Path) -> None:
        _require_faiss().write_index(self._cpu_index(), str(directory / "index.faiss"))

    @classmethod
    def _load_data(cls, directory: Path, settings: dict, device: str) -> "FaissIndex":
        faiss = import_faiss()
        if faiss is None:
            raise ConfigError(
                f"The index in {directory} was built with faiss, which is not installed here. "
                "Fix: `pip install faiss-cpu`, or rebuild the index with knn.backend=torch (pass knn.rebuild=true)."
            )
        cpu_index = faiss.read_index(str(directory / "index.faiss"))
        metric = "l2" if cpu_index.metric_type == faiss.METRIC_L2 else "ip"
        options = {k: v for k, v in settings.items() if k in ("nprobe", "ef_search", "query_batch_size", "seed")}
        return cls(cpu_index.d, settings["index_factory"], metric, device=device, _cpu_index=cpu_index, **options)


def _skip_polysemous_training(index, faiss) -> None:
    """index_factory turns on polysemous training for IVF-PQ: a slow code-reordering
    step that only serves Hamming-threshold filtering, which search never enables."""
    candidates = [faiss.downcast_index(index)]
    try:
        candidates.append(faiss.downcast_index(faiss.extract_index_ivf(index)))
    except RuntimeError:
        pass
    for candidate in candidates:
        if hasattr(candidate, "do_polysemous_training"):
            candidate.do_polysemous_training = False


def _ivf_cells(index, faiss) -> int:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        return 0


def _suggest_cells(n: int) -> int:
    """A power of two near sqrt(n) -- the usual IVF rule of thumb -- and <= n / 39."""
    cells = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    while cells > 1 and cells * 39 > n:
        cells //= 2
    return cells


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "Error" in line or "error" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_index(cfg: KnnConfig, dim: int) -> NearestNeighborIndex:
    """An empty index of dimension ``dim`` as configured: backend auto = faiss when
    installed, else the exact torch backend (which only does ``Flat``)."""
    backend = cfg.backend
    if backend == "auto":
        backend = "faiss" if import_faiss() is not None else "torch"
    if backend == "faiss":
        return FaissIndex(dim, cfg.index_factory, cfg.metric, nprobe=cfg.nprobe, ef_search=cfg.ef_search, device=cfg.device)
    if cfg.index_factory != "Flat":
        why = "faiss is not installed and the torch backend" if cfg.backend == "auto" else "the torch backend"
        raise ConfigError(
            f"knn.index_factory={cfg.index_factory} needs faiss: {why} only does exact search. "
            "Fix: `pip install faiss-cpu` (or faiss-gpu-cu12) and use knn.backend=auto, or set knn.index_factory=Flat."
        )
    return TorchExactIndex(dim, cfg.metric, device=cfg.device)
