"""Benchmark of the kNN backends: build and search times, and recall of the approximate
indexes against exact search, on synthetic vectors.

    python scripts/bench_knn.py            # N = 100k and 1M, dim 128, 1,000 queries, k = 100
    python scripts/bench_knn.py --quick    # N = 20k only (a smoke run, ~1 min)
    python scripts/bench_knn.py --data gaussian --sizes 100000

Data: ``mixture`` (default) is a Gaussian mixture of 1,000 clusters whose spread
equals the spacing of the centres -- closer to model features than pure noise;
``gaussian`` is i.i.d. N(0, 1), the worst case for approximate indexes. Queries
are held-out draws from the same distribution.

Times are wall-clock seconds on this machine; "vs torch" is the search-time ratio
to the exact torch backend measured in the same run (> 1 = faster). recall@10 is
the fraction of the exact 10 nearest neighbours found in the first 10 results.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from fastif.config import KnnConfig
from fastif.knn import TorchExactIndex, import_faiss, make_index


def synthetic(n: int, dim: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, dim, generator=g)
    centers = torch.randn(1000, dim, generator=g)
    return centers[torch.randint(0, 1000, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def ivf_cells(n: int) -> int:
    """Power of two near 4 sqrt(N), the usual IVF rule (100k -> 1024, 1M -> 4096)."""
    return 2 ** round(math.log2(4 * math.sqrt(n)))


def recall_at(found: torch.Tensor, exact: torch.Tensor, k: int = 10) -> float:
    hits = [len(set(a[:k].tolist()) & set(b[:k].tolist())) for a, b in zip(found, exact)]
    return float(np.mean(hits)) / k


def run_one(name: str, index, db: torch.Tensor, queries: torch.Tensor, k: int):
    started = time.perf_counter()
    index.add(db)
    build = time.perf_counter() - started
    index.search(queries[:10], k)  # warm-up (thread pools, lazy allocations)
    started = time.perf_counter()
    ids, _ = index.search(queries, k)
    search = time.perf_counter() - started
    return {"backend": name, "build_s": build, "search_s": search, "ids": ids}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 20k only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="database sizes N")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--data", choices=["mixture", "gaussian"], default="mixture")
    parser.add_argument("--nprobe", type=int, default=KnnConfig().nprobe)
    parser.add_argument("--ef-search", type=int, default=KnnConfig().ef_search)
    parser.add_argument("--skip-hnsw", action="store_true", help="HNSW builds are the slowest part on few cores")
    args = parser.parse_args(argv)
    sizes = [20_000] if args.quick else args.sizes

    faiss = import_faiss()
    print(f"# kNN backends: dim {args.dim}, {args.queries} queries, k={args.k}, data={args.data}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"faiss {getattr(faiss, '__version__', 'absent')}, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    print(f"# IVF: nprobe={args.nprobe}; HNSW: efSearch={args.ef_search}\n")
    print("| N | backend | index | build (s) | search (s) | queries/s | vs torch | recall@10 |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for n in sizes:
        data = synthetic(n + args.queries, args.dim, args.data, seed=n)
        db, queries = data[:n], data[n:]
        exact = run_one("torch", TorchExactIndex(args.dim), db, queries, args.k)
        results = [(exact, "Flat")]
        if faiss is not None:
            factories = ["Flat", f"IVF{ivf_cells(n)},Flat"] + ([] if args.skip_hnsw else ["HNSW32"])
            for factory in factories:
                cfg = KnnConfig(backend="faiss", index_factory=factory, nprobe=args.nprobe, ef_search=args.ef_search)
                results.append((run_one("faiss", make_index(cfg, args.dim), db, queries, args.k), factory))
                gc.collect()
        for result, factory in results:
            ratio = exact["search_s"] / result["search_s"]
            recall = recall_at(result["ids"], exact["ids"])
            print(f"| {n:,} | {result['backend']} | {factory} | {result['build_s']:.2f} | {result['search_s']:.3f} | "
                  f"{args.queries / result['search_s']:,.0f} | {ratio:.2f}x | {recall:.3f} |", flush=True)
        del data, db, queries, results, exact
        gc.collect()
    if faiss is None:
        print("\n(faiss is not installed: only the torch backend was measured)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
