"""The embedded demo data: determinism, labels, the shortcut, the challenge split, tokenizer, encoding."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
from torch.utils.data import default_collate

from fastif.config import DataConfig
from fastif.data import load_splits
from fastif.data.demo import (
    COLUMNS,
    HEURISTICS,
    LABEL_NAMES,
    NOUNS,
    demo_tokenizer,
    demo_vocabulary,
    generate_split,
    word_overlap,
)
from fastif.data.encoding import EncodedDataset, encode
from fastif.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


@pytest.fixture(scope="module")
def train_8k():
    return generate_split("train", 8000, seed=0)


@pytest.fixture(scope="module")
def challenge():
    return generate_split("challenge", 600, seed=0)


def _words(text: str) -> list:
    return text.lower().replace(",", " ").replace(".", " ").split()


# ---------------------------------------------------------------- determinism and schema


@pytest.mark.parametrize("split", ["train", "dev", "challenge"])
def test_same_seed_gives_identical_frames_and_other_seeds_differ(split):
    a = generate_split(split, 300, seed=7)
    b = generate_split(split, 300, seed=7)
    pd.testing.assert_frame_equal(a, b)
    c = generate_split(split, 300, seed=8)
    assert (a["premise"] + a["hypothesis"] != c["premise"] + c["hypothesis"]).mean() > 0.9


def test_splits_are_independent_streams():
    train = generate_split("train", 300, seed=0)
    dev = generate_split("dev", 300, seed=0)
    assert (train["premise"] != dev["premise"]).mean() > 0.9


def test_schema_ids_and_label_names(train_8k, challenge):
    for split, df in (("train", train_8k), ("challenge", challenge)):
        assert list(df.columns) == list(COLUMNS)
        assert df["id"].is_unique
        assert all(re.fullmatch(rf"demo-{split}-\d{{6}}", i) for i in df["id"])
        assert df["id"].iloc[123] == f"demo-{split}-000123"
        assert df["label"].dtype == "int64"
        assert set(df["label"]) == {0, 1}
        assert (df["label_name"] == df["label"].map(dict(enumerate(LABEL_NAMES)))).all()
        assert LABEL_NAMES == ("entailment", "non-entailment")
        assert df["premise"].str.match(r"^[A-Z].*\.$").all() and df["hypothesis"].str.match(r"^[A-Z].*\.$").all()


def test_label_balance(train_8k, challenge):
    assert 0.45 <= train_8k["label"].mean() <= 0.55
    assert challenge["label"].mean() == 0.5
    per_heuristic = challenge.groupby("heuristic")["label"].agg(["mean", "size"])
    assert list(per_heuristic.index) == sorted(HEURISTICS)
    assert (per_heuristic["mean"] == 0.5).all() and (per_heuristic["size"] == 200).all()


# ---------------------------------------------------------------- the shortcut


def test_training_split_carries_the_overlap_shortcut(train_8k):
    full = train_8k["overlap"] == 1.0
    assert 0.35 <= full.mean() <= 0.6
    entailed_when_full = 1 - train_8k.loc[full, "label"].mean()
    assert 0.90 <= entailed_when_full <= 0.96  # DataConfig.demo_shortcut = 0.93
    # Lower overlap is mostly non-entailment, but not always (synonyms, 'someone', passives).
    non_entailed_when_partial = train_8k.loc[~full, "label"].mean()
    assert 0.8 <= non_entailed_when_partial <= 0.95
    # Overlap alone would already score high: that is the shortcut a model can take.
    shortcut_accuracy = ((train_8k["overlap"] < 1.0).astype(int) == train_8k["label"]).mean()
    assert shortcut_accuracy > 0.85


def test_shortcut_strength_is_a_knob():
    df = generate_split("train", 4000, seed=0, shortcut=0.5)
    full = df["overlap"] == 1.0
    assert 0.42 <= 1 - df.loc[full, "label"].mean() <= 0.58


def test_challenge_hypotheses_use_only_premise_words(challenge):
    assert (challenge["overlap"] == 1.0).all()
    for premise, hypothesis in zip(challenge["premise"], challenge["hypothesis"]):
        assert set(_words(hypothesis)) <= set(_words(premise)), (premise, hypothesis)
    # HANS naming: <first letter of heuristic><e|n>_<name>, the middle letter giving the label.
    first = {"lexical_overlap": "l", "subsequence": "s", "constituent": "c"}
    for heuristic, subcase, label in zip(challenge["heuristic"], challenge["subcase"], challenge["label"]):
        assert subcase[0] == first[heuristic]
        assert subcase[1] == ("e" if label == 0 else "n")
    assert challenge.groupby("heuristic")["subcase"].nunique().min() >= 5


def test_word_overlap():
    assert word_overlap("The doctor slept, and the judge ran.", "The judge ran.") == 1.0
    assert word_overlap("The doctor slept.", "The judge slept.") == pytest.approx(2 / 3)


# ---------------------------------------------------------------- labels are right (spot checks by construction)


def test_edited_pairs_follow_their_reasons(train_8k):
    df = train_8k
    base = df["subcase"].str.replace("+synonym", "", regex=False)
    for row in df[base == "hypernym"].itertuples():
        assert "someone" in _words(row.hypothesis) and row.label == 0
    for row in df[base == "other_noun"].itertuples():
        foreign = set(_words(row.hypothesis)) - set(_words(row.premise))
        assert foreign & set(NOUNS) and row.label == 1, row
    for row in df[base == "negation"].itertuples():
        # The hypothesis negates a clause of the premise, or drops the premise's negation.
        assert ("not" in _words(row.hypothesis) or "not" in _words(row.premise)) and row.label == 1, row
    for row in df[base == "unrelated"].itertuples():
        assert not (set(_words(row.hypothesis)) & set(NOUNS) & set(_words(row.premise))) and row.label == 1
    for row in df[df["subcase"] == "le_passive"].itertuples():
        # "The N1 was V by the N2." -> "The N2 V the N1."
        p, h = _words(row.premise), _words(row.hypothesis)
        assert set(h) <= set(p) and "was" not in h and row.label == 0
        assert [w for w in h if w in NOUNS] == [w for w in p if w in NOUNS][::-1]
    for row in df[df["subcase"] == "ln_subject/object_swap"].itertuples():
        p, h = _words(row.premise), _words(row.hypothesis)
        assert set(h) <= set(p) and row.label == 1
        assert [w for w in h if w in NOUNS] == [w for w in p if w in NOUNS][::-1]


def test_challenge_examples_by_construction(challenge):
    rows = {r.subcase: r for r in challenge.itertuples()}
    r = rows["cn_embedded_under_if"]
    assert _words(r.premise)[0] in ("if", "unless")
    r = rows["ce_adverb"]
    assert _words(r.premise)[1:] == _words(r.hypothesis)
    r = rows["cn_adverb"]
    assert _words(r.premise)[1:] == _words(r.hypothesis) and r.label == 1
    r = rows["sn_PP_on_subject"]
    p, h = _words(r.premise), _words(r.hypothesis)
    assert p[2] in ("near", "behind", "beside") and h == p[3:]


# ---------------------------------------------------------------- tokenizer


def test_every_generated_word_is_in_the_vocabulary(tokenizer, train_8k, challenge):
    unk = tokenizer.unk_token_id
    for df in (train_8k.iloc[:2000], challenge):
        ids = tokenizer(df["premise"].tolist(), df["hypothesis"].tolist())["input_ids"]
        assert not any(unk in row for row in ids)
    assert len(tokenizer) == 5 + len(demo_vocabulary())


def test_tokenizer_pair_layout_and_round_trip(tokenizer, tmp_path):
    enc = tokenizer("If the doctor slept, the judge ran.", "The doctor slept.")
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == ["[CLS]", "if", "the", "doctor", "slept", ",", "the", "judge", "ran", ".", "[SEP]", "the", "doctor", "slept", ".", "[SEP]"]
    assert enc["token_type_ids"] == [0] * 11 + [1] * 5
    text = "The tall doctor near the lawyer did not help the judge."
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text.lower()
    assert tokenizer.convert_ids_to_tokens(tokenizer("the astronaut slept")["input_ids"])[2] == "[UNK]"

    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    pair = ("Since the nurse quit, the president stopped.", "The nurse quit.")
    assert loaded(*pair) == tokenizer(*pair)
    assert loaded.pad_token_id == tokenizer.pad_token_id == 0
    assert len(loaded) == len(tokenizer)


# ---------------------------------------------------------------- encoding


def test_encode_pads_and_segments(tokenizer):
    df = generate_split("train", 40, seed=3)
    data = encode(df, tokenizer, max_length=48)
    assert isinstance(data, EncodedDataset) and len(data) == 40 and data.ids == df["id"].tolist()
    t = data.tensors
    assert t["input_ids"].shape == t["attention_mask"].shape == t["token_type_ids"].shape == (40, 48)
    assert t["labels"].tolist() == df["label"].tolist()
    for i in range(40):
        n = len(tokenizer(df["premise"].iloc[i], df["hypothesis"].iloc[i])["input_ids"])
        assert t["attention_mask"][i].tolist() == [1] * n + [0] * (48 - n)
        assert (t["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        seps = (t["input_ids"][i] == tokenizer.sep_token_id).nonzero().flatten().tolist()
        assert t["token_type_ids"][i, : seps[0] + 1].eq(0).all() and t["token_type_ids"][i, seps[0] + 1 : n].eq(1).all()
    item = data[5]
    assert set(item) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert item["labels"].shape == () and item["input_ids"].dtype == torch.long
    collated = default_collate([data[i] for i in (3, 1, 4)])
    for key, value in data.batch([3, 1, 4]).items():
        assert torch.equal(collated[key], value)
    sub = data.subset([4, 0])
    assert sub.ids == [data.ids[4], data.ids[0]] and torch.equal(sub.tensors["input_ids"][1], t["input_ids"][0])


def test_encode_truncates_to_max_length(tokenizer):
    df = generate_split("train", 20, seed=0)
    data = encode(df, tokenizer, max_length=8)
    assert data.tensors["input_ids"].shape == (20, 8)
    assert (data.tensors["input_ids"][:, -1] == tokenizer.sep_token_id).all()


def test_encode_rejects_frames_without_the_schema(tokenizer):
    df = pd.DataFrame({"sentence1": ["a"], "sentence2": ["b"], "label": [0]})
    with pytest.raises(InputError, match="premise") as info:
        encode(df, tokenizer, 16)
    assert "Fix" in str(info.value)


# ---------------------------------------------------------------- load_splits


def test_load_splits_demo_sizes_and_max_train():
    cfg = DataConfig(demo_train_size=50, demo_eval_size=30, seed=2, max_train=20)
    splits = load_splits(cfg)
    assert set(splits) == {"train", "eval", "challenge"}
    assert len(splits["train"]) == 20 and len(splits["eval"]) == 30 and len(splits["challenge"]) == 30
    full = generate_split("train", 50, seed=2)
    pd.testing.assert_frame_equal(splits["train"], full.iloc[:20])
    assert splits["eval"]["id"].iloc[0] == "demo-dev-000000"
    assert (splits["challenge"]["overlap"] == 1.0).all()
    assert "challenge" not in load_splits(DataConfig(demo_train_size=10, demo_eval_size=10, challenge=None))


def test_load_splits_demo_errors():
    with pytest.raises(ConfigError, match="no split 'test'"):
        load_splits(DataConfig(eval="test"))
    with pytest.raises(ConfigError, match="2way"):
        load_splits(DataConfig(label_map="3way"))
    with pytest.raises(ConfigError, match="Unknown dataset") as info:
        load_splits(DataConfig(name="imagenet"))
    assert "demo" in str(info.value) and "mnli" in str(info.value)


def test_load_splits_dispatches_real_datasets(monkeypatch):
    import fastif.data.nli as nli

    calls = []

    def fake_load_nli(name, path_or_split, label_map="2way", column_map=None):
        calls.append((name, path_or_split, label_map))
        n = 5
        return pd.DataFrame({"id": [f"{name}-{i}" for i in range(n)], "premise": ["p"] * n, "hypothesis": ["h"] * n,
                             "label": [0] * n, "label_name": ["entailment"] * n})

    monkeypatch.setattr(nli, "load_nli", fake_load_nli)
    cfg = DataConfig(name="mnli", train="train", eval="validation_matched", challenge="hans:validation", label_map="3way", max_train=3)
    splits = load_splits(cfg)
    assert calls == [("mnli", "train", "3way"), ("mnli", "validation_matched", "3way"), ("hans", "validation", "3way")]
    assert len(splits["train"]) == 3 and len(splits["eval"]) == 5
