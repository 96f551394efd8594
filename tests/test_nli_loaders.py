"""NLI loaders: the real offline pack (skipped when absent), official-format fixtures, bad files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fastif.data.nli import LABEL_NAMES, load_nli, shared_nli_dir
from fastif.errors import ConfigError, InputError

FIXTURES = Path(__file__).parent / "fixtures" / "nli"
SCHEMA = ["id", "premise", "hypothesis", "label", "label_name"]


def check_schema(df: pd.DataFrame, label_map: str) -> None:
    assert list(df.columns[:5]) == SCHEMA
    assert df["id"].is_unique
    assert df["label"].dtype == np.int64
    names = LABEL_NAMES[label_map]
    assert set(df["label"]) <= set(range(len(names)))
    assert (df["label_name"] == np.asarray(names, dtype=object)[df["label"].to_numpy()]).all()
    for column in ("id", "premise", "hypothesis"):
        assert df[column].map(lambda v: isinstance(v, str) and v == v.strip() and v != "").all()


# --------------------------------------------------------------------------------------------------
# The real offline pack (../shared/data/nli): counts from its README
# --------------------------------------------------------------------------------------------------

PACK = shared_nli_dir()
needs_pack = pytest.mark.skipif(PACK is None, reason="shared NLI data pack (shared/data/nli) not found")

# file -> (name, rows, {3-way label counts} or None for HANS, entailment count)
PACK_FILES = {
    "mnli_train_10k.jsonl": ("mnli", 9999, {"entailment": 3408, "neutral": 3313, "contradiction": 3278}),
    "mnli_dev_matched.jsonl": ("mnli", 9815, {"entailment": 3479, "neutral": 3123, "contradiction": 3213}),
    "anli_r1_dev.jsonl": ("anli", 1000, {"entailment": 334, "neutral": 333, "contradiction": 333}),
    "anli_r2_dev.jsonl": ("anli", 1000, {"entailment": 334, "neutral": 333, "contradiction": 333}),
    "anli_r3_dev.jsonl": ("anli", 1198, {"entailment": 402, "neutral": 400, "contradiction": 396}),
    "hans_eval_generated.jsonl": ("hans", 3000, None),
    "hans_train_generated.jsonl": ("hans", 3000, None),
}


@pytest.fixture(scope="module")
def pack_2way() -> dict[str, pd.DataFrame]:
    return {f: load_nli(name, PACK / f, "2way") for f, (name, _, _) in PACK_FILES.items()}


@needs_pack
@pytest.mark.parametrize("file_name", [f for f, spec in PACK_FILES.items() if spec[2] is not None])
def test_pack_three_way_counts(file_name):
    name, rows, counts = PACK_FILES[file_name]
    df = load_nli(name, PACK / file_name, "3way")
    check_schema(df, "3way")
    assert len(df) == rows
    assert df["label_name"].value_counts().to_dict() == counts
    assert df["label"].value_counts().to_dict() == {0: counts["entailment"], 1: counts["neutral"], 2: counts["contradiction"]}


@needs_pack
def test_pack_two_way_merge(pack_2way):
    for file_name, (name, rows, counts) in PACK_FILES.items():
        df = pack_2way[file_name]
        check_schema(df, "2way")
        assert len(df) == rows, file_name
        entail = counts["entailment"] if counts else 1500
        assert (df["label"] == 0).sum() == entail, file_name
        assert (df["label"] == 1).sum() == rows - entail, file_name
    # ids are unique across the whole pack, so pools and anchors can be told apart by id
    everything = pd.concat(pack_2way.values(), ignore_index=True)
    assert everything["id"].is_unique and len(everything) == 9999 + 9815 + 1000 + 1000 + 1198 + 3000 + 3000


@needs_pack
def test_pack_extras(pack_2way):
    hans = pack_2way["hans_eval_generated.jsonl"]
    assert hans["heuristic"].nunique() == 3 and hans["subcase"].nunique() == 30
    assert (hans.groupby("heuristic")["label"].agg(["size", "sum"]).to_numpy() == [[1000, 500]] * 3).all()
    assert (hans["subcase"].value_counts() == 100).all()
    assert hans["id"].iloc[0] == "hans_gen_eval-ex0" and hans["pairID"].iloc[0] == "ex0"
    assert hans["premise"].iloc[0] == "The lawyer recognized the tourists ."
    for r in (1, 2, 3):
        anli = pack_2way[f"anli_r{r}_dev.jsonl"]
        assert (anli["round"] == r).all() and anli["uid"].is_unique
    dev = pack_2way["mnli_dev_matched.jsonl"]
    assert dev["id"].iloc[-1] == "mnli_dev_matched-9814" and dev["n_bert_correct"].between(0, 100).all()
    assert set(pack_2way["mnli_train_10k.jsonl"]["ppft_split"]) == {"train", "dev"}


@needs_pack
def test_pack_hans_round_trips_through_official_tsv(tmp_path, pack_2way):
    """The pack keeps the official HANS columns: written as the 11-column TSV, they read back the same."""
    source = pd.read_json(PACK / "hans_eval_generated.jsonl", lines=True, dtype=False)
    official = ["gold_label", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse",
                "sentence1", "sentence2", "pairID", "heuristic", "subcase", "template"]
    path = tmp_path / "heuristics_evaluation_set.txt"
    source[official].to_csv(path, sep="\t", index=False, quoting=3)
    from_tsv = load_nli("hans", path)
    from_pack = pack_2way["hans_eval_generated.jsonl"]
    assert from_tsv["id"].iloc[0] == "hans_heuristics_evaluation_set-ex0"
    for column in ("premise", "hypothesis", "label", "pairID", "heuristic", "subcase", "template"):
        assert from_tsv[column].tolist() == from_pack[column].tolist(), column


# --------------------------------------------------------------------------------------------------
# Official formats (hand-written fixtures)
# --------------------------------------------------------------------------------------------------


def test_glue_mnli_dev_tsv_keeps_literal_quotes():
    df = load_nli("mnli", FIXTURES / "dev_matched.tsv", "3way")
    check_schema(df, "3way")
    assert df["id"].tolist() == ["mnli_dev_matched-" + p for p in ("40101n", "2277e", "13388c", "77921e", "6105n", "98554c")]
    assert df["label_name"].tolist() == ["neutral", "entailment", "contradiction", "entailment", "neutral", "contradiction"]
    # an unbalanced quotation mark stays literal and does not swallow the following lines
    assert df["premise"].iloc[1] == 'He said "wait here and tell nobody, not even the cook.'
    assert df["premise"].iloc[2] == "The museum closes at noon on Sundays."  # outer whitespace stripped
    assert df["genre"].tolist()[:2] == ["government", "fiction"] and df["pairID"].iloc[0] == "40101n"
    assert "sentence1_parse" not in df.columns and "label1" not in df.columns


def test_glue_mnli_train_tsv_two_way():
    df = load_nli("mnli", FIXTURES / "train.tsv")
    check_schema(df, "2way")
    assert df["label"].tolist() == [1, 0, 0, 1]
    assert df["label_name"].tolist() == ["non-entailment", "entailment", "entailment", "non-entailment"]
    assert df["premise"].iloc[2] == 'The "guest" turned out to be her brother.'


def test_official_hans_txt():
    df = load_nli("hans", FIXTURES / "heuristics_evaluation_set.txt")
    check_schema(df, "2way")
    assert df["label"].tolist() == [1, 1, 1, 0, 0, 0]
    assert df["heuristic"].tolist() == ["lexical_overlap", "subsequence", "constituent"] * 2
    assert df["subcase"].iloc[1] == "sn_PP_on_subject" and df["template"].iloc[5] == "temp59"
    assert df["id"].iloc[3] == "hans_heuristics_evaluation_set-ex3" and df["pairID"].iloc[3] == "ex3"
    assert df["hypothesis"].iloc[0] == "The artist saw the senator ."


def test_hans_refuses_three_way():
    with pytest.raises(ConfigError, match="2way"):
        load_nli("hans", FIXTURES / "heuristics_evaluation_set.txt", "3way")


def test_official_anli_jsonl_with_letter_labels():
    df = load_nli("anli", FIXTURES / "anli_R1_dev.jsonl", "3way")
    check_schema(df, "3way")
    assert df["label_name"].tolist() == ["contradiction", "entailment", "neutral", "entailment"]
    assert df["premise"].iloc[0].startswith("The Harbour Bridge in Port Ellen")  # from 'context'
    assert df["id"].iloc[0] == "anli_R1_dev-0a1b2c3d-0000-4000-8000-000000000001"
    assert (df["round"] == 1).all() and df["uid"].iloc[3].endswith("0004") and df["reason"].iloc[1].startswith("She won")
    assert load_nli("anli", FIXTURES / "anli_R1_dev.jsonl")["label"].tolist() == [1, 0, 1, 0]


def test_snli_jsonl_drops_rows_without_gold_label(caplog):
    with caplog.at_level(logging.INFO, logger="fastif.data.nli"):
        df = load_nli("snli", FIXTURES / "snli_1.0_dev.jsonl", "3way")
    check_schema(df, "3way")
    assert len(df) == 4 and df.attrs["n_dropped_no_gold"] == 2
    assert "dropped 2 of 6 rows" in caplog.text
    assert df["pairID"].tolist() == ["4705552913.jpg#2r1n", "4705552913.jpg#2r1e", "4705552913.jpg#2r1c", "3637013.jpg#0r1e"]
    assert df["id"].iloc[0] == "snli_1.0_dev-4705552913.jpg#2r1n"
    assert df["label"].tolist() == [1, 0, 2, 0]


def test_original_multinli_jsonl():
    df = load_nli("mnli", FIXTURES / "multinli_1.0_dev_matched.jsonl")
    check_schema(df, "2way")
    assert df["pairID"].tolist() == ["63735n", "91383c", "111338e", "84781e"]  # '-' row 1735n dropped
    assert df["label"].tolist() == [1, 1, 0, 0]
    assert df["genre"].tolist() == ["slate", "government", "telephone", "fiction"]
    assert df.attrs["n_dropped_no_gold"] == 1


def test_csv_with_column_map_and_multiline_fields():
    column_map = {"premise": "text_a", "hypothesis": "text_b", "label": "verdict", "id": "pair_id", "domain": "source"}
    df = load_nli("files", FIXTURES / "custom_pairs.csv", "3way", column_map=column_map)
    check_schema(df, "3way")
    assert df["id"].tolist() == [f"files_custom_pairs-p-00{k}" for k in range(1, 6)]
    assert df["premise"].iloc[0] == "A child, holding a kite, runs along the beach."
    assert df["premise"].iloc[1] == "The report was late.\nIt arrived on Friday instead of Monday."
    assert df["premise"].iloc[2] == 'Prices rose "sharply" last year.'
    assert df["label"].tolist() == [0, 2, 0, 1, 2]
    assert df["domain"].tolist() == ["photo", "news", "news", "memo", "review"] and "source" not in df.columns
    numbered = load_nli("files", FIXTURES / "custom_pairs.csv", column_map={**column_map, "id": None})
    assert numbered["id"].tolist() == [f"files_custom_pairs-{k}" for k in range(5)]


def test_parquet_with_integer_labels_and_no_gold(tmp_path):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({
        "premise": ["A cat sleeps.", "A dog barks.", "Rain falls.", "Snow melts."],
        "hypothesis": ["An animal rests.", "A cat barks.", "It is wet.", "It is cold."],
        "label": [0, 2, -1, 1],
    }).to_parquet(path)
    df = load_nli("snli", path, "3way")
    check_schema(df, "3way")
    assert df["label_name"].tolist() == ["entailment", "contradiction", "neutral"]
    assert df["id"].tolist() == ["snli_pairs-0", "snli_pairs-1", "snli_pairs-3"]  # source row index, -1 row dropped
    assert load_nli("files", path)["label"].tolist() == [0, 1, 1]


def test_hub_split_is_converted(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_dict({
            "uid": ["u1", "u2", "u3"], "premise": ["P one.", "P two.", "P three."],
            "hypothesis": ["H one.", "H two.", "H three."], "label": [2, 0, 1], "reason": ["", "", ""],
        })

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    df = load_nli("anli", "dev_r2", "3way")
    assert calls == [("facebook/anli", "dev_r2")]
    check_schema(df, "3way")
    assert df["id"].tolist() == ["anli_dev_r2-u1", "anli_dev_r2-u2", "anli_dev_r2-u3"]
    assert df["label_name"].tolist() == ["contradiction", "entailment", "neutral"] and (df["round"] == 2).all()


def test_hub_hans_and_snli_integer_conventions(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = {"premise": ["A saw B .", "C ran .", "D sat ."], "hypothesis": ["B saw A .", "C ran .", "E sat ."]}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split=None: datasets.Dataset.from_dict({**rows, "label": [1, 0, 1]}))
    hans = load_nli("hans", "validation")
    assert hans["label_name"].tolist() == ["non-entailment", "entailment", "non-entailment"]
    assert hans["id"].tolist() == ["hans_validation-0", "hans_validation-1", "hans_validation-2"]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split=None: datasets.Dataset.from_dict({**rows, "label": [-1, 0, 2]}))
    snli = load_nli("snli", "test", "3way")
    assert snli["label_name"].tolist() == ["entailment", "contradiction"] and snli.attrs["n_dropped_no_gold"] == 1


def test_offline_hub_names_dataset_and_local_fix(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/multi_nli' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError) as info:
        load_nli("mnli", "validation_matched")
    message = str(info.value)
    assert "nyu-mll/multi_nli" in message and "validation_matched" in message and "local file" in message


def test_missing_file_is_not_sent_to_the_hub(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub must not be asked for a path"))
    for target in (tmp_path / "nope" / "dev.jsonl", "mnli_dev.jsonl"):
        with pytest.raises(InputError, match="no such file"):
            load_nli("mnli", target)
    with pytest.raises(InputError, match="no such file"):
        load_nli("files", "validation")


def test_bad_arguments():
    with pytest.raises(ConfigError, match="mnli, hans, anli, snli, files"):
        load_nli("qnli", FIXTURES / "train.tsv")
    with pytest.raises(ConfigError, match="2way"):
        load_nli("mnli", FIXTURES / "train.tsv", "4way")
    with pytest.raises(ConfigError, match="label_name"):
        load_nli("mnli", FIXTURES / "train.tsv", column_map={"label_name": "gold_label"})


def test_shared_nli_dir_search_and_override(monkeypatch, tmp_path):
    pack = tmp_path / "shared" / "data" / "nli"
    pack.mkdir(parents=True)
    work = tmp_path / "repo" / "sub"
    work.mkdir(parents=True)
    monkeypatch.delenv("FASTIF_NLI_DIR", raising=False)
    monkeypatch.chdir(work)
    assert shared_nli_dir() == pack
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.setenv("FASTIF_NLI_DIR", str(other))
    assert shared_nli_dir() == other.resolve()
    monkeypatch.setenv("FASTIF_NLI_DIR", str(tmp_path / "missing"))
    assert shared_nli_dir() is None


# --------------------------------------------------------------------------------------------------
# Malformed files: refused with file, line (or row) and column in the message
# --------------------------------------------------------------------------------------------------


def edited_copy(tmp_path: Path, fixture: str, edit, name: str | None = None) -> Path:
    lines = (FIXTURES / fixture).read_text(encoding="utf-8").split("\n")
    edit(lines)
    path = tmp_path / (name or fixture)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def refused(exc_type, name, path, *, label_map="2way", column_map=None, expect=()):
    with pytest.raises(exc_type) as info:
        load_nli(name, path, label_map, column_map)
    message = str(info.value)
    assert Path(path).name in message, message
    for part in expect:
        assert part in message, f"{part!r} not in: {message}"
    return message


def test_missing_column_lists_columns_and_column_map_fix(tmp_path):
    path = edited_copy(tmp_path, "dev_matched.tsv", lambda ls: ls.__setitem__(0, ls[0].replace("\tsentence2\t", "\thypothesis_text\t")))
    message = refused(InputError, "mnli", path, expect=("line 1", "['hypothesis']", "hypothesis_text", "column_map"))
    assert "sentence2" in message  # the usual names are listed


def test_column_map_naming_absent_column(tmp_path):
    refused(InputError, "files", FIXTURES / "custom_pairs.csv", column_map={"premise": "text_x"}, expect=("line 1", "'text_x'", "text_a"))


def test_unknown_label_names_value_line_and_allowed(tmp_path):
    path = edited_copy(tmp_path, "heuristics_evaluation_set.txt", lambda ls: ls.__setitem__(3, ls[3].replace("non-entailment", "entailed", 1)))
    refused(InputError, "hans", path, expect=("line 4", "'gold_label'", "'entailed'", "'non-entailment'"))
    path = edited_copy(tmp_path, "anli_R1_dev.jsonl", lambda ls: ls.__setitem__(2, ls[2].replace('"label": "n"', '"label": "x"')))
    refused(InputError, "anli", path, expect=("line 3", "'label'", "'x'", "'e'"))


def test_two_way_file_asked_for_three_way(tmp_path):
    path = tmp_path / "two_way.csv"
    path.write_text("premise,hypothesis,label\nA b.,C d.,entailment\nE f.,G h.,non-entailment\n")
    refused(ConfigError, "files", path, label_map="3way", expect=("line 3", "'label'", "2way"))


def test_empty_and_whitespace_text(tmp_path):
    path = edited_copy(tmp_path, "anli_R1_dev.jsonl", lambda ls: ls.__setitem__(1, ls[1].replace('"hypothesis": "Marta Velasquez has won a stage of a cycling race."', '"hypothesis": "   "')))
    refused(InputError, "anli", path, expect=("line 2", "'hypothesis'", "empty"))
    # the CSV's second record spans lines 3-4, so the fourth record starts on line 6
    path = edited_copy(tmp_path, "custom_pairs.csv", lambda ls: ls.__setitem__(5, ls[5].replace("The team hired two new engineers.", " ")))
    refused(InputError, "files", path, column_map={"premise": "text_a", "hypothesis": "text_b", "label": "verdict"}, expect=("line 6", "'text_a'", "empty"))
    # a GLUE row cut short: the missing fields are empty
    path = edited_copy(tmp_path, "train.tsv", lambda ls: ls.__setitem__(2, "\t".join(ls[2].split("\t")[:9])))
    refused(InputError, "mnli", path, expect=("line 3", "'gold_label'", "label is empty", "9 tab-separated fields but the header has 12"))


def test_missing_key_and_non_text_in_jsonl(tmp_path):
    path = edited_copy(tmp_path, "multinli_1.0_dev_matched.jsonl", lambda ls: ls.__setitem__(2, json.dumps({k: v for k, v in json.loads(ls[2]).items() if k != "sentence1"})))
    refused(InputError, "mnli", path, expect=("line 3", "'sentence1'", "missing"))
    path = edited_copy(tmp_path, "multinli_1.0_dev_matched.jsonl", lambda ls: ls.__setitem__(4, json.dumps({**json.loads(ls[4]), "sentence2": 42})))
    refused(InputError, "mnli", path, expect=("line 5", "'sentence2'", "expected text"))


def test_wrong_delimiter(tmp_path):
    csv_as_tsv = tmp_path / "pairs.tsv"
    shutil.copy(FIXTURES / "custom_pairs.csv", csv_as_tsv)
    refused(InputError, "files", csv_as_tsv, expect=("line 1", "'pair_id,text_a,text_b,verdict,source'", "looks comma-separated", ".csv extension"))
    tsv_as_csv = tmp_path / "heuristics.csv"
    shutil.copy(FIXTURES / "heuristics_evaluation_set.txt", tsv_as_csv)
    refused(InputError, "hans", tsv_as_csv, expect=("line 1", "looks tab-separated", "use a .tsv"))


def test_stray_tab_gives_field_count(tmp_path):
    path = edited_copy(tmp_path, "dev_matched.tsv", lambda ls: ls.__setitem__(4, ls[4].replace("yeah we went", "yeah\twe went")))
    refused(InputError, "mnli", path, expect=("line 5", "column 17", "17 tab-separated fields", "header has 16"))


def test_duplicate_ids(tmp_path):
    path = edited_copy(tmp_path, "heuristics_evaluation_set.txt", lambda ls: ls.__setitem__(5, ls[5].replace("\tex4\t", "\tex1\t")))
    refused(InputError, "hans", path, expect=("line 6", "'pairID'", "'ex1'", "first seen at line 3", "{'id': None}"))


def test_malformed_json_line(tmp_path):
    path = edited_copy(tmp_path, "snli_1.0_dev.jsonl", lambda ls: ls.__setitem__(2, ls[2][:-1]))
    refused(InputError, "snli", path, expect=("line 3", "malformed JSON", "character"))
    path = edited_copy(tmp_path, "snli_1.0_dev.jsonl", lambda ls: ls.__setitem__(1, "[1, 2]"))
    refused(InputError, "snli", path, expect=("line 2", "JSON object"))


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"premise": ["A.", "B.", "C."], "hypothesis": ["D.", "E.", "F."], "label": ["neutral", "entailment", "maybe"]}).to_parquet(path)
    refused(InputError, "files", path, expect=("row 3", "'label'", "'maybe'"))


def test_blank_lines_are_skipped_without_shifting_line_numbers(tmp_path):
    path = edited_copy(tmp_path, "train.tsv", lambda ls: (ls.insert(2, ""), ls.__setitem__(4, ls[4].replace("\tentailment\tentailment", "\tentailment\tunsure"))))
    refused(InputError, "mnli", path, expect=("line 5", "'gold_label'", "'unsure'"))
    lines = (FIXTURES / "snli_1.0_dev.jsonl").read_text().split("\n")
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text("\n\n".join(lines))
    assert load_nli("snli", spaced)["pairID"].tolist() == load_nli("snli", FIXTURES / "snli_1.0_dev.jsonl")["pairID"].tolist()


def test_gzip_json_array_and_sniffed_formats(tmp_path):
    import gzip

    expected = load_nli("snli", FIXTURES / "snli_1.0_dev.jsonl")
    packed = tmp_path / "snli_1.0_dev.jsonl.gz"
    packed.write_bytes(gzip.compress((FIXTURES / "snli_1.0_dev.jsonl").read_bytes()))
    assert load_nli("snli", packed)["id"].tolist() == expected["id"].tolist()
    records = [json.loads(line) for line in (FIXTURES / "snli_1.0_dev.jsonl").read_text().splitlines()]
    array = tmp_path / "snli_1.0_dev.json"
    array.write_text(json.dumps(records))
    assert load_nli("snli", array)["premise"].tolist() == expected["premise"].tolist()
    no_extension = tmp_path / "heuristics_dump"
    shutil.copy(FIXTURES / "heuristics_evaluation_set.txt", no_extension)
    assert load_nli("hans", no_extension)["subcase"].tolist() == load_nli("hans", FIXTURES / "heuristics_evaluation_set.txt")["subcase"].tolist()
