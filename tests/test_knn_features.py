"""Feature extraction for the kNN prefilter, checked against features computed by hand."""

import pytest
import torch
from torch import nn

from fastif.config import KnnConfig
from fastif.errors import ConfigError, InputError
from fastif.knn import FeatureSpec, extract_features, find_classifier_layer

SEQ_LEN = 12


def _bert(num_labels=3, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config)


def _dataset(n=13, seed=1):
    """HF-style items: padded to SEQ_LEN with varying real lengths."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = 3 + i % (SEQ_LEN - 3)
        ids = torch.zeros(SEQ_LEN, dtype=torch.long)
        ids[:length] = torch.randint(1, 60, (length,), generator=g)
        mask = (torch.arange(SEQ_LEN) < length).long()
        types = ((torch.arange(SEQ_LEN) >= length // 2) & (mask == 1)).long()
        items.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": torch.tensor(i % 3)})
    return items


def _stack(items):
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture(scope="module")
def bert():
    return _bert()


@pytest.fixture(scope="module")
def data():
    return _dataset()


def test_pooled_features_are_the_classifier_input(bert, data):
    feats = extract_features(bert, data, FeatureSpec("pooled"), device="cpu", batch_size=4)
    with torch.no_grad():
        bert.eval()
        expected = bert.bert(**_stack(data)).pooler_output
    assert feats.dtype == torch.float32 and feats.shape == (13, 16)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    # and the classifier applied to them gives the model's logits
    logits = bert(**_stack(data)).logits
    torch.testing.assert_close(bert.classifier(feats), logits, atol=1e-5, rtol=1e-5)


def test_features_do_not_depend_on_batch_size(bert, data):
    spec = FeatureSpec("pooled+probs")
    reference = extract_features(bert, data, spec, device="cpu", batch_size=1)
    for batch_size in (4, 5, 64):
        torch.testing.assert_close(extract_features(bert, data, spec, device="cpu", batch_size=batch_size), reference, atol=1e-5, rtol=1e-5)


def test_normalised_features_have_unit_norm_and_same_direction(bert, data):
    raw = extract_features(bert, data, FeatureSpec("pooled"), device="cpu", batch_size=8)
    unit = extract_features(bert, data, FeatureSpec("pooled", normalize=True), device="cpu", batch_size=8)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(13), atol=1e-5, rtol=0)
    torch.testing.assert_close(unit, raw / raw.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(13), atol=1e-2)


def test_mean_features_are_the_masked_mean_of_the_last_hidden_state(bert, data):
    feats = extract_features(bert, data, FeatureSpec("mean"), device="cpu", batch_size=5)
    batch = _stack(data)
    with torch.no_grad():
        hidden = bert.bert(**batch).last_hidden_state
    expected = torch.stack([hidden[i, : int(batch["attention_mask"][i].sum())].mean(dim=0) for i in range(13)])
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_pooled_plus_probs_appends_scaled_probabilities(bert, data, weight):
    feats = extract_features(bert, data, FeatureSpec("pooled+probs", probs_weight=weight), device="cpu", batch_size=6)
    pooled = extract_features(bert, data, FeatureSpec("pooled"), device="cpu", batch_size=6)
    assert feats.shape == (13, 16 + 3)
    torch.testing.assert_close(feats[:, :16], pooled)
    with torch.no_grad():
        probs = torch.softmax(bert(**_stack(data)).logits, dim=-1)
    torch.testing.assert_close(feats[:, 16:], weight * pooled.norm(dim=1, keepdim=True) * probs, atol=1e-5, rtol=1e-5)


def test_training_mode_is_restored_and_dropout_is_off():
    model = _bert()
    model.config.hidden_dropout_prob = 0.5
    model.train()
    data = _dataset(6)
    a = extract_features(model, data, FeatureSpec(), device="cpu", batch_size=3)
    b = extract_features(model, data, FeatureSpec(), device="cpu", batch_size=3)
    assert model.training
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_spec_from_config_and_round_trip():
    cfg = KnnConfig(features="pooled+probs", normalize=True, classifier_module="classifier", probs_weight=0.5)
    spec = FeatureSpec.from_config(cfg)
    assert spec == FeatureSpec("pooled+probs", True, "classifier", 0.5)
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="knn.features"):
        FeatureSpec("cls")


class _PlainClassifier(nn.Module):
    """A non-HF model: embedding mean -> hidden Linear -> head Linear; returns a tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(60, 8)
        self.hidden = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = torch.tanh(self.hidden((self.embed(input_ids) * mask).sum(1) / mask.sum(1)))
        return self.head(pooled)


def test_plain_module_uses_its_last_linear_and_ignores_unknown_kwargs(data):
    model = _PlainClassifier()
    name, layer = find_classifier_layer(model)
    assert name == "head" and layer is model.head
    feats = extract_features(model, data, FeatureSpec(), device="cpu", batch_size=4)  # token_type_ids is not accepted: dropped
    batch = _stack(data)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.tanh(model.hidden((model.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)))
    torch.testing.assert_close(feats, expected.detach(), atol=1e-6, rtol=1e-6)


def test_wrong_classifier_module_is_refused(data):
    model = _PlainClassifier()
    with pytest.raises(ConfigError, match="no module named 'nope'"):
        extract_features(model, data, FeatureSpec(classifier_module="nope"), device="cpu", batch_size=4)
    # 'hidden' is a Linear but not the one producing the logits (6 outputs vs 3 logits)
    with pytest.raises(ConfigError, match="outputs 6 values but the logits have 3"):
        extract_features(model, data, FeatureSpec(classifier_module="hidden"), device="cpu", batch_size=4)
    with pytest.raises(ConfigError, match="features=mean needs"):
        extract_features(model, data, FeatureSpec("mean"), device="cpu", batch_size=4)


def test_head_module_resolves_to_its_last_linear():
    class Head(nn.Module):  # like RobertaClassificationHead: dense -> out_proj
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(4, 4)
            self.out_proj = nn.Linear(4, 2)

    model = nn.Module()
    model.body = nn.Linear(4, 4)
    model.classifier = Head()
    assert find_classifier_layer(model)[0] == "classifier.out_proj"


class _DecoderStyle(nn.Module):
    """HF *ForSequenceClassification decoder style: `score` runs on every position and
    the logits of the last real token are returned (in an object with .logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(60, 8)
        self.score = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask, **kwargs):
        hidden = torch.cumsum(self.embed(input_ids), dim=1)
        logits = self.score(hidden)
        last = attention_mask.sum(1) - 1
        return type("Out", (), {"logits": logits[torch.arange(len(last)), last]})()


def test_decoder_style_score_head_takes_the_selected_position(data):
    model = _DecoderStyle()
    feats = extract_features(model, data, FeatureSpec(), device="cpu", batch_size=5)
    batch = _stack(data)
    hidden = torch.cumsum(model.embed(batch["input_ids"]), dim=1)
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(feats, hidden[torch.arange(13), last].detach(), atol=1e-6, rtol=1e-6)


def test_bad_inputs_are_refused(bert):
    with pytest.raises(InputError, match="empty dataset"):
        extract_features(bert, [], FeatureSpec(), device="cpu", batch_size=4)
    with pytest.raises(InputError, match="dicts of tensors"):
        extract_features(bert, [torch.zeros(3, dtype=torch.long)] * 2, FeatureSpec(), device="cpu", batch_size=4)


def test_features_to_saved_index_round_trip(bert, data, tmp_path):
    """What `fastif index` composes: features -> index -> save with provenance -> load checked -> search."""
    from fastif.errors import IndexMismatchError
    from fastif.knn import build_index, dataset_fingerprint, load_index, state_dict_hash

    spec = FeatureSpec("pooled", normalize=True)
    feats = extract_features(bert, data, spec, device="cpu", batch_size=4)
    ids = [f"train-{i}" for i in range(len(data))]
    provenance = {"model_hash": state_dict_hash(bert), "dataset_fingerprint": dataset_fingerprint(ids, {"input_ids": _stack(data)["input_ids"]})}
    build_index(feats, ids, KnnConfig(backend="torch", normalize=True)).save(tmp_path / "index", provenance)
    index = load_index(tmp_path / "index", expect={**provenance, "feature_spec": spec.to_dict()})
    positions, distances = index.search(feats, 3)
    assert positions[:, 0].tolist() == list(range(len(data)))  # every example is its own nearest neighbour
    torch.testing.assert_close(distances[:, 0], torch.zeros(len(data)), atol=1e-5, rtol=0)
    other = _bert(seed=1)
    with pytest.raises(IndexMismatchError, match="model checkpoint differs"):
        load_index(tmp_path / "index", expect={**provenance, "model_hash": state_dict_hash(other)})
