"""Models: device choice, the demo BERT, loading checkpoints, trainable slices, double backward."""

from __future__ import annotations

import pytest
import torch

from fastif.config import ModelConfig
from fastif.data.demo import generate_split
from fastif.data.encoding import encode
from fastif.errors import ConfigError, InputError
from fastif.models import apply_trainable, build_demo_model, load_classifier, resolve_device


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread and tokenizer: conftest.py


@pytest.fixture(scope="module")
def batch(tokenizer):
    return encode(generate_split("dev", 16, seed=0), tokenizer, 48).batch(range(16))


# ---------------------------------------------------------------- resolve_device


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device") as info:
        resolve_device("cuda")
    assert "device=cpu" in str(info.value)
    with pytest.raises(ConfigError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


# ---------------------------------------------------------------- build_demo_model


def test_build_demo_model_follows_the_config(tokenizer):
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, max_length=48)
    model = build_demo_model(cfg, tokenizer)
    c = model.config
    assert type(model).__name__ == "BertForSequenceClassification"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (32, 3, 4, 48)
    assert c.vocab_size == len(tokenizer) and c.pad_token_id == tokenizer.pad_token_id
    assert c.num_labels == 2 and c.id2label == {0: "entailment", 1: "non-entailment"}
    assert c._attn_implementation == "eager"
    assert model.bert.embeddings.word_embeddings.weight.shape == (len(tokenizer), 32)


def test_build_demo_model_is_seeded_and_leaves_global_rng_alone(tokenizer):
    state = torch.random.get_rng_state()
    a = build_demo_model(ModelConfig(init_seed=3), tokenizer)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_demo_model(ModelConfig(init_seed=3), tokenizer)
    c = build_demo_model(ModelConfig(init_seed=4), tokenizer)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_alignment_init_makes_hypothesis_words_attend_to_the_premise(tokenizer):
    enc = tokenizer("The doctor helped the lawyer.", "The lawyer slept.", return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    hyp_lawyer = tokens.index("lawyer", tokens.index("[SEP]"))
    premise_lawyer = tokens.index("lawyer")

    def attention_of_hypothesis_lawyer(alignment_init):
        model = build_demo_model(ModelConfig(alignment_init=alignment_init), tokenizer).eval()
        with torch.no_grad():
            return model(**enc, output_attentions=True).attentions[0][0].mean(0)[hyp_lawyer]

    aligned = attention_of_hypothesis_lawyer(1.0)
    assert int(aligned.argmax()) == premise_lawyer and aligned[premise_lawyer] > 0.3
    random_init = attention_of_hypothesis_lawyer(0.0)
    assert random_init[premise_lawyer] < 0.25

    model = build_demo_model(ModelConfig(alignment_init=2.0), tokenizer)
    query = model.bert.encoder.layer[0].attention.self.query.weight
    key = model.bert.encoder.layer[0].attention.self.key.weight
    assert torch.allclose(query, 2.0 * torch.eye(64))
    # key = 2 * (I - 2uu^T): a reflection, so key^T key = 4 I, and it flips the token-type direction.
    assert torch.allclose(key.T @ key, 4.0 * torch.eye(64), atol=1e-5)
    types = model.bert.embeddings.token_type_embeddings.weight.detach()
    u = types[0] - types[1]
    u = u - u.mean()
    assert torch.allclose(key @ u, -2.0 * u, atol=1e-5)


def test_demo_model_supports_double_backward_hessian_vector_products(tokenizer, batch):
    """HVP by double backward agrees with a central finite difference of gradients (float64)."""
    model = build_demo_model(ModelConfig(max_length=48), tokenizer).double().eval()
    params = [p for p in model.parameters()]

    def loss_fn():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
        return torch.nn.functional.cross_entropy(out.logits, batch["labels"])

    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)
    hvp = torch.cat([h.flatten() for h in hvp])
    assert torch.isfinite(hvp).all() and hvp.norm() > 0

    eps = 1e-5

    def grad_at(sign):
        with torch.no_grad():
            for p, u in zip(params, v):
                p.add_(sign * eps * u)
        g = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, u in zip(params, v):
                p.sub_(sign * eps * u)
        return torch.cat([x.flatten() for x in g])

    finite_difference = (grad_at(1.0) - grad_at(-1.0)) / (2 * eps)
    assert torch.allclose(hvp, finite_difference, rtol=1e-4, atol=1e-6 * float(hvp.abs().max()))


# ---------------------------------------------------------------- load_classifier


def test_load_classifier_round_trips_a_saved_checkpoint(tokenizer, batch, tmp_path):
    model = build_demo_model(ModelConfig(init_seed=5, max_length=48), tokenizer).eval()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    loaded, loaded_tokenizer = load_classifier(str(ckpt), 2, torch.device("cpu"))
    assert not loaded.training
    assert loaded.config._attn_implementation == "eager"
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, loaded(**inputs).logits, atol=1e-6)
    pair = ("The doctor near the judge slept.", "The judge slept.")
    assert loaded_tokenizer(*pair)["input_ids"] == tokenizer(*pair)["input_ids"]


def test_load_classifier_gives_a_bare_encoder_a_fresh_head(tokenizer, tmp_path):
    encoder = build_demo_model(ModelConfig(), tokenizer).bert
    encoder.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_classifier(str(tmp_path), 3, "cpu")
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert model.config.id2label[2] == "contradiction"
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)


def test_load_classifier_errors_name_the_path_and_the_fix(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(InputError) as info:
        load_classifier("/does/not/exist", 2, "cpu")
    message = str(info.value)
    assert "'/does/not/exist' does not exist" in message and "Fix:" in message and "save_pretrained" in message
    assert "\n" not in message and "Traceback" not in message

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_classifier(str(empty), 2, "cpu")

    model = build_demo_model(ModelConfig(), tokenizer)
    model.save_pretrained(tmp_path / "two")
    tokenizer.save_pretrained(tmp_path / "two")
    with pytest.raises(InputError, match="classifies into 2 labels but 3") as info:
        load_classifier(str(tmp_path / "two"), 3, "cpu")
    assert "model.num_labels=2" in str(info.value)

    with pytest.raises(InputError, match="built and trained"):
        load_classifier("demo", 2, "cpu")

    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore detail")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(InputError) as info:
        load_classifier("some-org/some-model", 2, "cpu")
    message = str(info.value)
    assert "'some-org/some-model'" in message and "hub" in message and "local directory" in message
    assert "\n" not in message


# ---------------------------------------------------------------- apply_trainable


def test_apply_trainable_selects_by_glob_and_regex(tokenizer):
    model = build_demo_model(ModelConfig(), tokenizer)
    names = apply_trainable(model, ["classifier.*", "re:bert\\.encoder\\.layer\\.1\\..*"])
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert "classifier.weight" in names and "classifier.bias" in names
    assert all(n.startswith("classifier.") or n.startswith("bert.encoder.layer.1.") for n in names)
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert len(apply_trainable(model, ["*"])) == len(list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())


def test_apply_trainable_refuses_patterns_that_match_nothing(tokenizer):
    model = build_demo_model(ModelConfig(), tokenizer)
    with pytest.raises(ConfigError) as info:
        apply_trainable(model, ["classifer.*"])
    message = str(info.value)
    assert "classifer.*" in message and "bert.embeddings.word_embeddings.weight" in message
    with pytest.raises(ConfigError, match="regular expression"):
        apply_trainable(model, ["re:(unclosed"])
    with pytest.raises(ConfigError, match="model.trainable"):
        apply_trainable(model, [])
    # A refused call changes nothing.
    assert all(p.requires_grad for p in model.parameters())
