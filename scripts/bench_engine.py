"""Benchmark of the influence engine against the reference FastIF loop, in one run.

(a) scoring K candidates for T=1 and T=16 test points: fastif's batched scoring vs the
    reference per-example loop (batch size 1, create_graph=True, one loop per test
    point) with the same s_test (scores asserted equal), and a batched forward-only
    pass over the candidates as the floor;
(b) s_test for T=16 test points: one multi-RHS LiSSA solve vs 16 sequential solves;
(c) accuracy of cg and lissa against the exact solve (small selection).

Models: a BERT-shaped classifier (2 layers, hidden 128, seq 64) with FastIF's
selection (top layer + pooler + classifier), and the demo model. Prints a markdown
table of ratios (``--markdown``) for README's performance section.

    python scripts/bench_engine.py            # both models, K=512
    python scripts/bench_engine.py --quick    # smaller K, for a smoke run
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from fastif.data.encoding import EncodedDataset
from fastif.engine.hessian import HessianOperator, smallest_eigenvalue
from fastif.engine.hf import classifier_logits, sequence_classification_loss
from fastif.engine.params import select_parameters
from fastif.engine.reference import reference_scores
from fastif.engine.scoring import query_gradients, score_candidates
from fastif.engine.solvers import CGSolver, ExactSolver, LissaSolver


def random_text_data(n: int, length: int, vocab: int, seed: int) -> EncodedDataset:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, l in enumerate(lengths.tolist()):
        ids[i, :l] = torch.randint(5, vocab, (l,), generator=gen)
        mask[i, :l] = 1
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": ids[:, 1] % 2}
    return EncodedDataset(tensors, [f"random-{i}" for i in range(n)])


def bert_shaped():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                        max_position_embeddings=128, num_labels=2, attn_implementation="eager")
    model = BertForSequenceClassification(config).eval()
    patterns = ["bert.encoder.layer.1.*", "bert.pooler.*", "classifier.*"]
    return "BERT-shaped (2x128, seq 64)", model, random_text_data(2048, 64, 1000, 1), random_text_data(16, 64, 1000, 2), patterns


def demo_model():
    from fastif.config import DataConfig, ModelConfig
    from fastif.data import load_splits
    from fastif.data.demo import demo_tokenizer
    from fastif.data.encoding import encode
    from fastif.models import build_demo_model

    model_cfg = ModelConfig()
    tokenizer = demo_tokenizer()
    model = build_demo_model(model_cfg, tokenizer).eval()
    splits = load_splits(DataConfig())
    train = encode(splits["train"], tokenizer, model_cfg.max_length)
    test = encode(splits["challenge"].head(16), tokenizer, model_cfg.max_length)
    last = model_cfg.num_hidden_layers - 1
    patterns = [f"bert.encoder.layer.{last}.*", "bert.pooler.*", "classifier.*"]
    return "demo (untrained weights)", model, train, test, patterns


def emit(rows, row):
    """Record a result row and show it at once (the whole table is printed at the end)."""
    rows.append(row)
    print(" | ".join(str(x) for x in row), flush=True)


def timed(fn, repeats: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def forward_floor(model, train, indices, batch_size):
    def run():
        with torch.inference_mode():
            for start in range(0, len(indices), batch_size):
                batch = torch.utils.data.default_collate([train[i] for i in indices[start : start + batch_size]])
                classifier_logits(model, batch)

    return timed(run, repeats=2)[1]


def bench(name, model, train, test, patterns, k: int, reference_t: int):
    rows = []
    sel = select_parameters(model, patterns)
    loss = sequence_classification_loss
    gen = torch.Generator().manual_seed(0)
    candidates_all = torch.randperm(len(train), generator=gen)[:k]
    floor = forward_floor(model, train, candidates_all.tolist(), 128)
    emit(rows, (name, f"forward-only pass over K={k} candidates (floor)", floor, 1.0))
    grads = query_gradients(model, loss, test, sel)
    s_test = grads / grads.norm(dim=1, keepdim=True)  # any fixed s_test: scoring cost does not depend on it
    for t in (1, 16):
        cands = candidates_all.expand(t, k)
        fast, fast_s = timed(lambda: score_candidates(model, loss, train, s_test[:t], sel, candidates=cands, batch_size=128), repeats=2)
        # The reference loop is timed on `reference_t` test points and scaled: it is linear in T by construction.
        ref_t = min(t, reference_t)
        ref, ref_s = timed(lambda: reference_scores(model, loss, train, s_test[:ref_t], sel, cands[:ref_t]))
        ref_s *= t / ref_t
        diff = float((fast[:ref_t] - ref).abs().max())
        scale = float(ref.abs().max())
        assert diff <= 1e-4 * max(scale, 1.0), f"scores differ from the reference loop by {diff}"
        emit(rows, (name, f"T={t}: reference loop (bs 1, create_graph)", ref_s, ref_s / floor))
        emit(rows, (name, f"T={t}: fastif batched scoring (max diff {diff:.1e})", fast_s, fast_s / floor))
        emit(rows, (name, f"T={t}: speed-up vs reference", ref_s / fast_s, None))
    op = HessianOperator(model, loss, train, sel, batch_size=64)
    # Damp past any negative curvature (an untrained model has plenty), estimated once outside the timing.
    damping = max(0.01, -1.5 * smallest_eigenvalue(op))
    lissa = LissaSolver(scale=None, depth=100, batch_size=8, seed=0, tail_average=0.0)
    lissa.scale = lissa.resolve_scale(op, damping)
    _, multi_s = timed(lambda: lissa.solve(op, grads[:16], damping))
    _, seq_s = timed(lambda: [lissa.solve(op, grads[i : i + 1], damping) for i in range(16)])
    emit(rows, (name, "s_test T=16: 16 sequential LiSSA solves (depth 100, bs 8)", seq_s, None))
    emit(rows, (name, "s_test T=16: one multi-RHS LiSSA solve", multi_s, None))
    emit(rows, (name, "s_test T=16: speed-up multi-RHS vs sequential", seq_s / multi_s, None))
    # The ceiling of that speed-up: one minibatch HVP for 16 vectors at once vs for 1 vector. Only the
    # forward and the first backward are shared; each vector still costs its own double backward.
    idx = list(range(lissa.batch_size))
    _, hvp_1 = timed(lambda: op.minibatch_matvec(grads[:1], idx), repeats=5)
    _, hvp_16 = timed(lambda: op.minibatch_matvec(grads[:16], idx), repeats=5)
    emit(rows, (name, f"one minibatch HVP (bs {lissa.batch_size}): 1 vector", hvp_1, None))
    emit(rows, (name, f"one minibatch HVP (bs {lissa.batch_size}): 16 vectors at once", hvp_16, None))
    emit(rows, (name, "s_test T=16: speed-up ceiling 16 x HVP(1) / HVP(16)", 16 * hvp_1 / hvp_16, None))
    return rows


def bench_accuracy(name, model, train, test, patterns_small):
    rows = []
    sel = select_parameters(model, patterns_small)
    op = HessianOperator(model, sequence_classification_loss, train, sel, batch_size=32)
    grads = query_gradients(model, sequence_classification_loss, test, sel)
    exact_solver = ExactSolver()
    evals, _ = exact_solver.eigendecomposition(op)
    damping = max(0.01, -float(evals.min()) + 0.01)
    exact = exact_solver.solve(op, grads, damping)
    for label, solver in (("cg (tol 1e-6)", CGSolver(tol=1e-6)), ("lissa (depth 300, bs 32, 2 chains)", LissaSolver(depth=300, batch_size=32, chains=2))):
        res, secs = timed(lambda: solver.solve(op, grads, damping))
        cos = torch.nn.functional.cosine_similarity(res.vectors, exact.vectors, dim=1)
        emit(rows, (name, f"{label}: min cosine with exact over {len(grads)} test points = {float(cos.min()):.4f} (P={sel.numel})", secs, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=512, help="candidates per test point")
    parser.add_argument("--reference-t", type=int, default=2, help="test points the reference loop actually runs (scaled linearly to T)")
    parser.add_argument("--quick", action="store_true", help="K=64, for a smoke run")
    parser.add_argument("--models", default="bert,demo", help="comma list of bert,demo")
    args = parser.parse_args()
    k = 64 if args.quick else args.k
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for key in args.models.split(","):
        name, model, train, test, patterns = bert_shaped() if key == "bert" else demo_model()
        rows += bench(name, model, train, test, patterns, k, args.reference_t)
        last = "bert.encoder.layer.1" if key == "bert" else f"bert.encoder.layer.{model.config.num_hidden_layers - 1}"
        rows += bench_accuracy(name, model, train, test, [f"{last}.output.LayerNorm.*", "classifier.*"])
    print("\n| model | measurement | seconds or ratio | x forward floor |\n|---|---|---:|---:|")
    for model_name, what, value, ratio in rows:
        shown = f"{value:.2f}x" if "speed-up" in what else f"{value:.3f} s"
        print(f"| {model_name} | {what} | {shown} | {'' if ratio is None else f'{ratio:.2f}'} |")


if __name__ == "__main__":
    main()
