"""kNN backends and saved indexes: exact agreement, ANN recall, persistence, provenance checks,
the no-faiss fallback and GPU selection logic."""

import json
import sys

import numpy as np
import pytest
import torch

from fastif.config import KnnConfig
from fastif.errors import ConfigError, IndexMismatchError, InputError
from fastif.knn import (
    FaissIndex,
    FeatureSpec,
    NearestNeighborIndex,
    TorchExactIndex,
    build_index,
    checkpoint_hash,
    dataset_fingerprint,
    load_index,
    make_index,
    state_dict_hash,
)
from fastif.knn import backends

faiss = backends.import_faiss()
needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss is not installed")


def _gaussian(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _mixture(n, d, clusters, spread, seed):
    """Gaussian mixture: features of a trained model are clustered, unlike pure noise."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    return centers[torch.randint(0, clusters, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)


def _brute_force(db, q, k, metric):
    if metric == "l2":
        d = torch.cdist(q.double(), db.double()) ** 2
        vals, ids = d.topk(k, dim=1, largest=False)
    else:
        vals, ids = (q.double() @ db.double().T).topk(k, dim=1)
    return ids, vals.float()


def _recall_at(found, exact, k=10):
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(found, exact)]))


# -- exact search ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torch_exact_matches_brute_force_across_chunks(metric):
    db, q = _gaussian(3000, 24, 0), _gaussian(70, 24, 1)
    index = TorchExactIndex(24, metric, device="cpu", query_batch_size=16, chunk_size=333)  # many partial blocks
    index.add(db[:1000])
    index.add(db[1000:])
    ids, dists = index.search(q, 25)
    want_ids, want_dists = _brute_force(db, q, 25, metric)
    assert ids.dtype == torch.int64 and dists.dtype == torch.float32 and ids.shape == (70, 25)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(dists, want_dists, rtol=1e-4, atol=1e-3)
    # ordering convention: l2 squared distances ascending, ip descending
    steps = dists[:, 1:] - dists[:, :-1]
    assert (steps >= 0).all() if metric == "l2" else (steps <= 0).all()


@needs_faiss
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_flat_and_torch_exact_agree(metric):
    db, q = _gaussian(5000, 32, 2), _gaussian(200, 32, 3)
    flat = FaissIndex(32, "Flat", metric, device="cpu")
    exact = TorchExactIndex(32, metric, device="cpu", chunk_size=1234, query_batch_size=64)
    flat.add(db)
    exact.add(db)
    ids_f, d_f = flat.search(q, 20)
    ids_t, d_t = exact.search(q, 20)
    assert torch.equal(ids_f, ids_t)
    torch.testing.assert_close(d_f, d_t, rtol=1e-4, atol=1e-4)
    if metric == "l2":  # squared L2, not L2
        torch.testing.assert_close(d_t[:, 0], ((q - db[ids_t[:, 0]]) ** 2).sum(1), rtol=1e-4, atol=1e-4)


def test_search_input_checks():
    index = TorchExactIndex(4, device="cpu")
    with pytest.raises(InputError, match="empty"):
        index.search(torch.zeros(1, 4), 1)
    index.add(torch.randn(10, 4))
    with pytest.raises(InputError, match="k=11"):
        index.search(torch.zeros(1, 4), 11)
    with pytest.raises(InputError, match="dimension 5"):
        index.search(torch.zeros(1, 5), 1)
    with pytest.raises(InputError, match="NaN"):
        index.add(torch.full((2, 4), float("nan")))
    with pytest.raises(ConfigError, match="metric"):
        TorchExactIndex(4, "cosine")


# -- approximate search ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered_200k():
    """200k clustered vectors of dim 128, 300 held-out queries and their exact 10 nearest."""
    n, d = 200_000, 128
    x = _mixture(n + 300, d, clusters=1000, spread=1.0, seed=0)
    exact = TorchExactIndex(d, device="cpu")
    exact.add(x[:n])
    truth, _ = exact.search(x[n:], 10)
    return x[:n], x[n:], truth


def _ann_recall(factory, data):
    db, queries, truth = data
    index = make_index(KnnConfig(index_factory=factory, backend="faiss"), db.shape[1])
    # the documented defaults: nprobe=16 cells (IVF), efSearch=128 (HNSW)
    assert (index.nprobe, index.ef_search) == (KnnConfig().nprobe, KnnConfig().ef_search) == (16, 128)
    index.add(db)
    found, _ = index.search(queries, 10)
    return _recall_at(found, truth)


@needs_faiss
def test_ivf_reaches_recall_09_on_200k_vectors_with_default_nprobe(clustered_200k):
    assert _ann_recall("IVF1024,Flat", clustered_200k) >= 0.9


@needs_faiss
@pytest.mark.slow  # the HNSW graph build takes 15-45 s on 2 cores
def test_hnsw_reaches_recall_09_on_200k_vectors_with_default_ef_search(clustered_200k):
    assert _ann_recall("HNSW32", clustered_200k) >= 0.9


@needs_faiss
def test_ivf_pq_trains_and_finds_neighbours():
    # faiss' PQ training is slow on low-dimensional sub-vectors: keep the pool small
    x = _mixture(6_300, 32, clusters=50, spread=0.5, seed=1)
    db, q = x[:6_000], x[6_000:]
    index = make_index(KnnConfig(index_factory="IVF32,PQ8", backend="faiss", nprobe=8), 32)
    assert not index.is_trained
    index.add(db)
    assert index.is_trained and index.ntotal == 6_000
    found, _ = index.search(q, 10)
    truth, _ = _brute_force(db, q, 10, "l2")
    assert _recall_at(found, truth) >= 0.5


@needs_faiss
def test_ivf_pads_missing_results_with_minus_one_and_inf():
    x = _mixture(2000, 8, clusters=16, spread=0.1, seed=2)
    index = FaissIndex(8, "IVF16,Flat", "l2", nprobe=1, device="cpu")
    index.add(x)
    ids, dists = index.search(x[:5], 1000)  # one cell holds far fewer than 1000 vectors
    missing = ids < 0
    assert missing.any() and (~missing[:, 0]).all()
    assert torch.isinf(dists[missing]).all() and torch.isfinite(dists[~missing]).all()


@needs_faiss
def test_faiss_configuration_errors_name_the_fix():
    with pytest.raises(ConfigError, match="IVF64,Flat"):
        index = FaissIndex(8, "IVF4096,Flat", device="cpu")
        index.add(torch.randn(3000, 8))  # too few vectors for 4096 cells: suggests fewer
    with pytest.raises(ConfigError, match="index_factory 'Bogus12'"):
        FaissIndex(8, "Bogus12", device="cpu")


# -- backend selection ------------------------------------------------------------------------


@needs_faiss
def test_auto_backend_is_faiss_when_installed():
    assert isinstance(make_index(KnnConfig(), 8), FaissIndex)
    assert isinstance(make_index(KnnConfig(backend="torch", metric="ip"), 8), TorchExactIndex)
    with pytest.raises(ConfigError, match="only does exact search.*index_factory=Flat"):
        make_index(KnnConfig(backend="torch", index_factory="HNSW32"), 8)


def test_everything_works_without_faiss(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    assert backends.import_faiss() is None
    index = make_index(KnnConfig(), 8)
    assert isinstance(index, TorchExactIndex)
    with pytest.raises(ConfigError, match="pip install faiss-cpu"):
        make_index(KnnConfig(backend="faiss"), 8)
    with pytest.raises(ConfigError, match="faiss is not installed.*index_factory=Flat"):
        make_index(KnnConfig(index_factory="IVF64,Flat"), 8)
    feats = _gaussian(50, 8, 4)
    built = build_index(feats, [f"t{i}" for i in range(50)], KnnConfig())
    built.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    ids, dists = loaded.search(feats[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2] and torch.allclose(dists, torch.zeros(3, 1), atol=1e-4)


@needs_faiss
def test_faiss_index_cannot_load_without_faiss(monkeypatch, tmp_path):
    build_index(_gaussian(20, 4, 0), range(20), KnnConfig(backend="faiss")).save(tmp_path / "idx")
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ConfigError, match="built with faiss.*knn.backend=torch"):
        load_index(tmp_path / "idx")


class _FakeGpu:
    """Stands in for faiss' GPU transfer functions: records calls, keeps the CPU index."""

    def __init__(self, monkeypatch, gpus, fail=False):
        self.to_gpu = 0
        self.to_cpu = 0
        # faiss-cpu lacks the GPU functions: raising=False adds them for the test
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: gpus)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self._to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", self._to_cpu, raising=False)
        self.fail = fail

    def _to_gpu(self, index):
        self.to_gpu += 1
        if self.fail:
            raise RuntimeError("Error: This index type is not implemented on GPU.")
        return index

    def _to_cpu(self, index):
        self.to_cpu += 1
        return index


@needs_faiss
def test_faiss_moves_to_gpu_only_when_one_is_seen_and_saves_a_cpu_index(monkeypatch, tmp_path):
    fake = _FakeGpu(monkeypatch, gpus=1)
    index = FaissIndex(8, "Flat")  # device=auto
    assert index.on_gpu and fake.to_gpu == 1
    index.add(_gaussian(3000, 8, 5))
    index.search(_gaussian(2, 8, 6), 10)
    assert fake.to_cpu == 0
    index.search(_gaussian(2, 8, 6), backends.GPU_MAX_K + 1)  # beyond GPU k-selection: CPU copy
    assert fake.to_cpu == 1
    index.save(tmp_path / "idx")
    assert fake.to_cpu == 2 and (tmp_path / "idx" / "index.faiss").is_file()
    cpu = FaissIndex(8, "Flat", device="cpu")
    assert not cpu.on_gpu and fake.to_gpu == 1


@needs_faiss
def test_faiss_stays_on_cpu_without_gpus_or_gpu_support(monkeypatch):
    fake = _FakeGpu(monkeypatch, gpus=0)
    assert not FaissIndex(8, "Flat").on_gpu and fake.to_gpu == 0
    with pytest.raises(ConfigError, match="faiss sees no GPU"):
        FaissIndex(8, "Flat", device="cuda")
    fake = _FakeGpu(monkeypatch, gpus=2, fail=True)  # e.g. HNSW has no GPU implementation
    index = FaissIndex(8, "HNSW8")
    assert not index.on_gpu and fake.to_gpu == 1
    index.add(_gaussian(100, 8, 7))
    assert index.search(_gaussian(1, 8, 8), 5)[0].shape == (1, 5)


def test_torch_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    index = TorchExactIndex(8)  # device=auto; nothing touches CUDA before search
    assert index.device.type == "cuda" and index.chunk_size == 262_144
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TorchExactIndex(8).device.type == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        TorchExactIndex(8, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_exact_on_cuda_matches_cpu():
    db, q = _gaussian(20_000, 64, 9), _gaussian(300, 64, 10)
    results = []
    for device in ("cpu", "cuda"):
        index = TorchExactIndex(64, device=device)
        index.add(db)
        results.append(index.search(q, 50))
    assert (results[0][0] == results[1][0]).float().mean() > 0.999
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-3)


# -- saved indexes --------------------------------------------------------------------------------


BACKENDS = ["torch"] + (["faiss"] if faiss is not None else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip(tmp_path, backend):
    feats, ids = _gaussian(300, 16, 11), [f"ex{i}" for i in range(300)]
    cfg = KnnConfig(backend=backend, metric="ip", features="mean", normalize=True)
    built = build_index(feats, ids, cfg)
    meta = built.metadata
    assert (meta["n_vectors"], meta["dim"], meta["backend"], meta["index_factory"], meta["metric"]) == (300, 16, backend, "Flat", "ip")
    assert meta["feature_spec"] == FeatureSpec("mean", normalize=True).to_dict() and meta["build_seconds"] >= 0
    out = built.save(tmp_path / "run" / "index", {"model_hash": "a" * 64, "dataset_fingerprint": "b" * 64})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["index"]  # no temporary leftovers
    loaded = load_index(out, expect={"model_hash": "a" * 64})
    assert loaded.ids == ids and loaded.ntotal == 300 and loaded.dim == 16
    assert loaded.metadata["fastif_version"] and loaded.metadata["model_hash"] == "a" * 64
    q = _gaussian(7, 16, 12)
    for a, b in zip(built.search(q, 9), loaded.search(q, 9)):
        assert torch.equal(a, b)
    # saving again replaces the directory atomically
    build_index(feats[:10], ids[:10], cfg).save(out)
    assert load_index(out).ntotal == 10
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["index"]


def test_backend_settings_are_stored(tmp_path):
    index = TorchExactIndex(4, "ip", device="cpu")
    index.add(torch.randn(5, 4))
    index.save(tmp_path)
    settings = json.loads((tmp_path / "backend.json").read_text())
    assert settings["backend"] == "torch" and settings["metric"] == "ip" and settings["ntotal"] == 5
    assert isinstance(NearestNeighborIndex.load(tmp_path), TorchExactIndex)


def test_mismatching_index_is_refused_naming_the_field(tmp_path):
    model_a, model_b = "1" * 12 + "a" * 52, "2" * 12 + "b" * 52
    data_a, data_b = dataset_fingerprint(["x", "y"]), dataset_fingerprint(["x", "z"])
    build_index(torch.randn(2, 4), ["x", "y"], KnnConfig(backend="torch")).save(tmp_path / "idx", {"model_hash": model_a, "dataset_fingerprint": data_a})

    with pytest.raises(IndexMismatchError) as err:
        load_index(tmp_path / "idx", expect={"model_hash": model_b, "dataset_fingerprint": data_a})
    message = str(err.value)
    assert "model checkpoint differs" in message and f"expected {model_b[:12]}, found {model_a[:12]}" in message
    assert "dataset" not in message and "knn.rebuild=true" in message and "fastif index" in message

    with pytest.raises(IndexMismatchError) as err:
        load_index(tmp_path / "idx", expect={"model_hash": model_a, "dataset_fingerprint": data_b})
    message = str(err.value)
    assert "training dataset differs" in message and data_b[:12] in message and data_a[:12] in message
    assert "model checkpoint" not in message

    with pytest.raises(IndexMismatchError, match="model checkpoint differs.*training dataset differs"):
        load_index(tmp_path / "idx", expect={"model_hash": model_b, "dataset_fingerprint": data_b})
    with pytest.raises(IndexMismatchError, match="feature spec differs"):
        load_index(tmp_path / "idx", expect={"feature_spec": FeatureSpec("mean").to_dict()})

    ok = load_index(tmp_path / "idx", expect={"model_hash": model_a, "dataset_fingerprint": data_a, "feature_spec": FeatureSpec().to_dict()})
    assert ok.ids == ["x", "y"]


def test_load_and_build_input_errors(tmp_path):
    with pytest.raises(InputError, match="No kNN index"):
        load_index(tmp_path / "missing")
    with pytest.raises(InputError, match="3 feature vectors but 2 ids"):
        build_index(torch.randn(3, 4), ["a", "b"], KnnConfig(backend="torch"))
    with pytest.raises(InputError, match="'a' appears more than once"):
        build_index(torch.randn(3, 4), ["a", "b", "a"], KnnConfig(backend="torch"))


# -- fingerprints ---------------------------------------------------------------------------------


def test_dataset_fingerprint_tracks_ids_order_and_content():
    import pandas as pd

    ids = ["a", "b", "c"]
    base = dataset_fingerprint(ids, ["p1 h1", "p2 h2", "p3 h3"])
    assert len(base) == 64 and base == dataset_fingerprint(ids, ["p1 h1", "p2 h2", "p3 h3"])
    assert base != dataset_fingerprint(["a", "c", "b"], ["p1 h1", "p2 h2", "p3 h3"])
    assert base != dataset_fingerprint(ids, ["p1 h1", "p2 h2", "p3 h4"])
    assert base != dataset_fingerprint(ids)
    tensors = {"input_ids": torch.arange(6).view(3, 2), "labels": torch.tensor([0, 1, 0])}
    same = dataset_fingerprint(ids, {"labels": torch.tensor([0, 1, 0]), "input_ids": torch.arange(6).view(3, 2)})
    assert dataset_fingerprint(ids, tensors) == same
    assert dataset_fingerprint(ids, {**tensors, "labels": torch.tensor([0, 1, 1])}) != same
    frame = pd.DataFrame({"premise": ["x", "y", "z"], "label": [0, 1, 0]})
    assert dataset_fingerprint(ids, frame) == dataset_fingerprint(ids, frame.copy())
    assert dataset_fingerprint(ids, frame) != dataset_fingerprint(ids, frame.assign(label=[0, 1, 1]))
    with pytest.raises(InputError, match="Cannot fingerprint"):
        dataset_fingerprint(ids, 3.5)


def test_checkpoint_hash_covers_names_and_contents(tmp_path):
    from fastif.runs import directory_sha256, file_sha256

    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "sub" / "model.bin").write_bytes(b"\x00\x01" * 1000)
    first = checkpoint_hash(ckpt)
    assert first == directory_sha256(ckpt)[0]  # the digest run manifests record for inputs
    (ckpt / ".lock").write_text("pid")  # lock files are ignored
    assert checkpoint_hash(ckpt) == first
    (ckpt / "sub" / "model.bin").write_bytes(b"\x00\x02" * 1000)
    changed = checkpoint_hash(ckpt)
    assert changed != first
    (ckpt / "sub" / "model.bin").rename(ckpt / "sub" / "weights.bin")
    assert checkpoint_hash(ckpt) != changed
    assert checkpoint_hash(ckpt / "config.json") == file_sha256(ckpt / "config.json") != checkpoint_hash(ckpt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="contains no files"):
        checkpoint_hash(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        checkpoint_hash(tmp_path / "nope")


def test_state_dict_hash_changes_with_weights():
    model = torch.nn.Linear(3, 2)
    before = state_dict_hash(model)
    assert before == state_dict_hash(model)
    with torch.no_grad():
        model.bias[0] += 1e-6
    assert state_dict_hash(model) != before
    assert state_dict_hash(model.to(torch.bfloat16)) != state_dict_hash(model.float())
