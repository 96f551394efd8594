"""The engine on a tiny BERT classifier: solvers agree with the exact solve, batched scoring
equals the reference per-example loop, and padding / batch composition change nothing."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import fastif
from fastif.engine.gradients import SharedAcrossBatchError, directional_derivatives, per_example_gradients
from fastif.engine.hessian import HessianOperator
from fastif.engine.hf import sequence_classification_loss
from fastif.engine.params import select_parameters
from fastif.engine.reference import reference_scores
from fastif.engine.scoring import query_gradients, score_candidates
from fastif.engine.solvers import CGSolver, ExactSolver, LissaSolver

SELECTION = ["bert.encoder.layer.1.output.LayerNorm.*", "bert.pooler.*", "classifier.*"]


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, **tensors):
        self.tensors = tensors

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


def _make_data(n, length, vocab, seed, pad_to=None):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, length + 1, (n,), generator=gen)
    width = pad_to or length
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, l in enumerate(lengths.tolist()):
        ids[i, :l] = torch.randint(3, vocab, (l,), generator=gen)
        mask[i, :l] = 1
    labels = (ids[:, 1] % 2).long()  # learnable rule: parity of the first real token
    return DictDataset(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=labels)


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=2, attn_implementation="eager")
    model = BertForSequenceClassification(config)
    train = _make_data(96, 12, 40, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        for batch in loader:
            opt.zero_grad()
            sequence_classification_loss(model, batch).mean().backward()
            opt.step()
    model = model.double().eval()
    test = _make_data(6, 12, 40, seed=2)
    return model, train, test


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_iterative_solvers_agree_with_exact(tiny_bert):
    model, train, test = tiny_bert
    sel = select_parameters(model, SELECTION)
    assert 300 < sel.numel < 1000
    op = HessianOperator(model, sequence_classification_loss, train, sel, batch_size=48)
    grads = query_gradients(model, sequence_classification_loss, test, sel)
    exact_solver = ExactSolver()
    # A briefly trained net is not at a minimum: damp past the most negative eigenvalue so H + lambda I is PD.
    min_eig = float(exact_solver.eigendecomposition(op)[0].min())
    damping = max(0.01, -min_eig + 0.05)
    exact = exact_solver.solve(op, grads, damping)
    cg = CGSolver(tol=1e-8).solve(op, grads, damping)
    lissa = LissaSolver(depth=300, batch_size=48, chains=2, seed=0).solve(op, grads, damping)
    assert float(_cosine(cg.vectors, exact.vectors).min()) >= 0.999
    assert float(_cosine(lissa.vectors, exact.vectors).min()) >= 0.99
    assert lissa.chain_vectors.shape == (2, *grads.shape)


def test_batched_scores_equal_reference_loop(tiny_bert):
    model, train, test = tiny_bert
    sel = select_parameters(model, SELECTION)
    s_test = torch.randn(3, sel.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    candidates = torch.randint(0, len(train), (3, 10), generator=torch.Generator().manual_seed(1))
    expected = reference_scores(model, sequence_classification_loss, train, s_test, sel, candidates)
    for strategy in ("hooks", "jvp"):
        got = score_candidates(model, sequence_classification_loss, train, s_test, sel, candidates=candidates, batch_size=7, strategy=strategy)
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (strategy, float((got - expected).abs().max()))


def test_hooked_gradients_cover_all_layer_types(tiny_bert):
    """Every parameter (embeddings, LayerNorms, Linears) gets the per-example gradient of its own loss,
    except position embeddings, which BERT applies without a batch dimension: those are refused."""
    model, train, _ = tiny_bert
    with pytest.raises(SharedAcrossBatchError):
        per_example_gradients(model, sequence_classification_loss, torch.utils.data.default_collate([train[0], train[1]]), select_parameters(model, ["*"]), "hooks")
    sel = select_parameters(model, ["re:(?!.*position_embeddings).*"])
    batch = torch.utils.data.default_collate([train[i] for i in range(5)])
    got = per_example_gradients(model, sequence_classification_loss, batch, sel, "hooks")
    for j in range(5):
        single = {k: v[j : j + 1] for k, v in batch.items()}
        loss = sequence_classification_loss(model, single).sum()
        expected = sel.flatten(list(torch.autograd.grad(loss, sel.tensors(model))))
        assert torch.allclose(got[j], expected, atol=1e-9), float((got[j] - expected).abs().max())


def test_padding_and_batch_composition_do_not_change_scores(tiny_bert):
    model, train, _ = tiny_bert
    sel = select_parameters(model, SELECTION)
    s_test = torch.randn(2, sel.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    base = score_candidates(model, sequence_classification_loss, train, s_test, sel, batch_size=96)
    for batch_size in (1, 5, 32):
        other = score_candidates(model, sequence_classification_loss, train, s_test, sel, batch_size=batch_size)
        assert torch.allclose(other, base, atol=1e-10)
    padded = DictDataset(**{k: (torch.nn.functional.pad(v, (0, 9)) if v.dim() == 2 else v) for k, v in train.tensors.items()})
    assert torch.allclose(score_candidates(model, sequence_classification_loss, padded, s_test, sel, batch_size=17), base, atol=1e-10)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(4))
    shuffled = DictDataset(**{k: v[perm] for k, v in train.tensors.items()})
    got = score_candidates(model, sequence_classification_loss, shuffled, s_test, sel, batch_size=13)
    assert torch.allclose(got, base[:, perm], atol=1e-10)


def test_influence_scores_candidates_are_a_slice_of_the_full_scan(tiny_bert):
    model, train, test = tiny_bert
    full = fastif.influence_scores(model, sequence_classification_loss, train, test, params=SELECTION, solver="exact", damping=0.01)
    assert full.shape == (len(test), len(train))
    candidates = torch.stack([torch.randperm(len(train), generator=torch.Generator().manual_seed(i))[:8] for i in range(len(test))])
    sliced = fastif.influence_scores(model, sequence_classification_loss, train, test, params=SELECTION, solver="exact", damping=0.01, candidates=candidates)
    assert torch.allclose(sliced, torch.gather(full, 1, candidates), atol=1e-10)


def test_anchor_group_gradient_is_mean_of_members(tiny_bert):
    model, _, test = tiny_bert
    sel = select_parameters(model, SELECTION)
    each = query_gradients(model, sequence_classification_loss, test, sel)
    groups = query_gradients(model, sequence_classification_loss, test, sel, groups=[[0, 1, 2], [3, 4, 5]])
    assert torch.allclose(groups[1], each[3:].mean(0))


def test_directional_derivatives_strategies_agree(tiny_bert):
    model, train, _ = tiny_bert
    sel = select_parameters(model, SELECTION)
    batch = torch.utils.data.default_collate([train[i] for i in range(9)])
    dirs = torch.randn(4, sel.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    hooks = directional_derivatives(model, sequence_classification_loss, batch, sel, dirs, "hooks")
    jvp = directional_derivatives(model, sequence_classification_loss, batch, sel, dirs, "jvp")
    assert torch.allclose(hooks, jvp, atol=1e-10)


def test_few_directions_layerwise_scoring_equals_materialised_gradients(tiny_bert):
    """For one or two directions hooks score layer by layer; it must equal per-example gradients . v."""
    model, train, _ = tiny_bert
    sel = select_parameters(model, ["re:(?!.*position_embeddings).*"])
    batch = torch.utils.data.default_collate([train[i] for i in range(7)])
    grads = per_example_gradients(model, sequence_classification_loss, batch, sel, "hooks")
    dirs = torch.randn(2, sel.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for t in (1, 2):
        got = directional_derivatives(model, sequence_classification_loss, batch, sel, dirs[:t], "hooks")
        assert torch.allclose(got, grads @ dirs[:t].T, atol=1e-9)
