"""Training and evaluation: learning beyond chance, determinism, schedules, metrics, the demo's shortcut."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from fastif.config import DataConfig, ModelConfig, TrainConfig
from fastif.data import load_splits
from fastif.data.demo import generate_split
from fastif.data.encoding import encode
from fastif.errors import ConfigError, InputError
from fastif.models import apply_trainable, build_demo_model
from fastif.training import evaluate, predict, train_classifier

MAX_LENGTH = 48


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread and tokenizer: conftest.py


@pytest.fixture(scope="module")
def small(tokenizer):
    train_df = generate_split("train", 3000, seed=1)
    dev_df = generate_split("dev", 400, seed=1)
    return train_df, encode(train_df, tokenizer, MAX_LENGTH), dev_df, encode(dev_df, tokenizer, MAX_LENGTH)


def _model(tokenizer, **overrides):
    return build_demo_model(ModelConfig(max_length=MAX_LENGTH, **overrides), tokenizer)


def test_short_training_learns_beyond_chance(tokenizer, small):
    _, train, dev_df, dev = small
    model = _model(tokenizer)
    before = evaluate(model, dev, 256, "cpu")
    result = train_classifier(model, train, TrainConfig(epochs=3), "cpu", seed=0, progress=False)
    after = evaluate(model, dev, 256, "cpu")
    assert set(result) == {"steps", "seconds", "final_loss"}
    assert result["steps"] == 3 * 94 and result["seconds"] > 0
    majority = max(dev_df["label"].mean(), 1 - dev_df["label"].mean())
    assert after["accuracy"] >= majority + 0.1, (before, after)
    assert after["loss"] < before["loss"] and after["loss"] < np.log(2)
    assert result["final_loss"] < np.log(2)
    assert not model.training


def test_training_is_deterministic_in_the_seed(tokenizer, small):
    train = small[1].subset(range(256))
    cfg = TrainConfig(epochs=1, batch_size=32)
    models, results = [], []
    for seed in (0, 0, 1):
        model = _model(tokenizer, dropout=0.1)  # dropout draws random numbers too
        results.append(train_classifier(model, train, cfg, "cpu", seed=seed, progress=False))
        models.append(model)
    assert results[0]["final_loss"] == results[1]["final_loss"]
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), name
    assert results[0]["final_loss"] != results[2]["final_loss"]
    assert not torch.equal(models[0].classifier.weight, models[2].classifier.weight)


def test_fractional_epochs_and_frozen_parameters(tokenizer, small):
    train = small[1].subset(range(100))
    model = _model(tokenizer)
    apply_trainable(model, ["classifier.*", "bert.pooler.*"])
    frozen = model.bert.embeddings.word_embeddings.weight.detach().clone()
    head = model.classifier.weight.detach().clone()
    result = train_classifier(model, train, TrainConfig(epochs=0.45, batch_size=10), "cpu", seed=0, progress=True)
    assert result["steps"] == 5  # ceil(0.45 * 10 batches)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, frozen)
    assert not torch.equal(model.classifier.weight, head)


def test_training_refuses_impossible_setups(tokenizer, small):
    model = _model(tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="No model parameter is trainable"):
        train_classifier(model, small[1].subset(range(10)), TrainConfig(), "cpu", 0, False)
    with pytest.raises(InputError, match="empty"):
        train_classifier(_model(tokenizer), small[1].subset([]), TrainConfig(), "cpu", 0, False)


def test_half_precision_on_cpu_falls_back_to_fp32(tokenizer, small, caplog):
    model = _model(tokenizer)
    with caplog.at_level(logging.WARNING, logger="fastif.training"):
        result = train_classifier(model, small[1].subset(range(64)), TrainConfig(epochs=1, precision="bf16"), "cpu", 0, False)
    assert result["steps"] == 2 and np.isfinite(result["final_loss"])
    assert "needs CUDA" in caplog.text
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_predict_and_evaluate_agree_with_a_manual_computation(tokenizer, small):
    _, _, dev_df, dev = small
    model = _model(tokenizer, init_seed=2)
    model.train()
    probs, losses = predict(model, dev, 37, "cpu")  # batch size that does not divide n
    assert model.training  # mode restored
    assert probs.shape == (len(dev), 2) and losses.shape == (len(dev),)
    model.eval()
    with torch.no_grad():
        batch = dev.batch(range(len(dev)))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.softmax(logits, -1).numpy()
    assert np.allclose(probs, expected, atol=1e-5)
    labels = dev_df["label"].to_numpy()
    assert np.allclose(losses, -np.log(expected[np.arange(len(labels)), labels]), atol=1e-4)

    groups = dev_df["heuristic"].where(dev_df["heuristic"] != "none")  # some NaN groups on purpose
    result = evaluate(model, dev, 64, "cpu", groups=groups)
    correct = expected.argmax(1) == labels
    assert result["n"] == len(dev)
    assert result["accuracy"] == pytest.approx(correct.mean())
    assert result["loss"] == pytest.approx(losses.mean(), rel=1e-5)
    for name, stats in result["groups"].items():
        mask = (groups == name).to_numpy()
        assert stats == {"accuracy": pytest.approx(correct[mask].mean()), "n": int(mask.sum())}
    assert set(result["groups"]) == set(groups.dropna())
    assert evaluate(model, dev, 64, "cpu")["groups"] == {}


def test_evaluate_accepts_any_dict_dataset(tokenizer, small):
    dev = small[3].subset(range(20))

    class Plain(Dataset):
        def __len__(self):
            return len(dev)

        def __getitem__(self, i):
            return dev[i]

    model = _model(tokenizer)
    assert evaluate(model, Plain(), 8, "cpu") == evaluate(model, dev, 8, "cpu")


def test_evaluate_errors(tokenizer, small):
    model = _model(tokenizer)
    dev = small[3]
    with pytest.raises(InputError, match="group labels"):
        evaluate(model, dev, 64, "cpu", groups=pd.Series(["a"] * 3))
    with pytest.raises(InputError, match="empty"):
        evaluate(model, dev.subset([]), 64, "cpu")


@pytest.mark.slow
def test_demo_defaults_learn_the_task_and_the_shortcut(tokenizer):
    """The issue's must-show, from Python: high accuracy in distribution, the shortcut on the challenge.

    Default DataConfig / TrainConfig / ModelConfig (demo sizes), max_length as in configs/model/tiny_bert.yaml.
    """
    splits = load_splits(DataConfig())
    data = {k: encode(v, tokenizer, MAX_LENGTH) for k, v in splits.items()}
    model = _model(tokenizer)
    train_cfg = TrainConfig()
    train_classifier(model, data["train"], train_cfg, "cpu", seed=0, progress=False)
    dev = evaluate(model, data["eval"], train_cfg.eval_batch_size, "cpu")
    challenge = splits["challenge"]
    by_label = evaluate(model, data["challenge"], train_cfg.eval_batch_size, "cpu", groups=challenge["label_name"])["groups"]
    assert dev["accuracy"] >= 0.9
    assert by_label["entailment"]["accuracy"] >= 0.9
    assert by_label["non-entailment"]["accuracy"] <= 0.6
