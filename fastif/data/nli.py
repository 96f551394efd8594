"""Real NLI datasets (MNLI, HANS, ANLI, SNLI, local files) read into one schema.

Every loader returns a pandas DataFrame with the columns

    id (str, unique), premise (str), hypothesis (str), label (int), label_name (str)

followed by the extras the source has (``genre``, ``heuristic``, ``subcase``, ``template``,
``round``, ``uid``, ``pairID``, ...). The single entry point is :func:`load_nli`; it reads a local
file when given an existing path and otherwise asks the Hugging Face hub for a split.

Labels follow a label map: ``'3way'`` (entailment=0, neutral=1, contradiction=2) or ``'2way'``
(entailment=0, non-entailment=1; neutral and contradiction merged, as for HANS evaluation).

Ids: a column named ``id`` is kept verbatim (it is assumed to be unique already, as in the shared
data pack). Native per-file ids (``pairID``, ``uid``, or a column mapped to ``id``) are prefixed with
``<source>_<file stem>-`` because they repeat across files (HANS pairIDs restart in every file);
the raw value stays in its own column. Files without ids get ``<source>_<file stem>-<row index>``.

Text is stripped of leading and trailing whitespace; nothing else is changed. Rows whose gold label
is ``'-'`` or ``-1`` (no annotator consensus, MNLI/SNLI) are dropped and counted in the log and in
``df.attrs['n_dropped_no_gold']``. Any other problem raises :class:`fastif.errors.InputError` naming
the file, the line (or row) and the column, and no partial result is returned.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from fastif.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

__all__ = ["load_nli", "shared_nli_dir", "LABEL_NAMES", "HUB_IDS", "SOURCES", "SHARED_NLI_ENV"]

SOURCES = ("mnli", "hans", "anli", "snli", "files")

LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "2way": ("entailment", "non-entailment"),
    "3way": ("entailment", "neutral", "contradiction"),
}

HUB_IDS = {
    "mnli": "nyu-mll/multi_nli",
    "hans": "hans",
    "anli": "facebook/anli",
    "snli": "stanfordnlp/snli",
}

SHARED_NLI_ENV = "FASTIF_NLI_DIR"

# Column names tried, in order, for each schema field the column_map does not name. Together they
# cover the shared pack and hub copies (premise/hypothesis/label/id), the official MNLI, SNLI and
# HANS files (sentence1/sentence2/gold_label/pairID) and the official ANLI jsonl (context/uid).
_FIELD_CANDIDATES: dict[str, tuple[str, ...]] = {
    "premise": ("premise", "sentence1", "context"),
    "hypothesis": ("hypothesis", "sentence2"),
    "label": ("label", "gold_label"),
    "id": ("id", "pairID", "uid"),
}
_REQUIRED = ("premise", "hypothesis", "label")
_SCHEMA = ("id", "premise", "hypothesis", "label", "label_name")

# Extras kept for the named sources (for 'files' every unmapped column is kept). Parse trees and
# individual annotator labels are left out: nothing downstream uses them and they triple the size.
_NAMED_SOURCE_EXTRAS = (
    "genre", "promptID", "pairID", "uid", "heuristic", "subcase", "template",
    "round", "reason", "tags", "tag", "n_bert_correct", "ppft_split",
)

# Raw label (lower-cased text; integers as their decimal text) -> class name. Integer labels follow
# the hub copies: 0=entailment, 1=neutral, 2=contradiction; HANS: 0=entailment, 1=non-entailment.
_THREE_WAY_RAW = {
    "entailment": "entailment", "neutral": "neutral", "contradiction": "contradiction",
    "e": "entailment", "n": "neutral", "c": "contradiction",
    "0": "entailment", "1": "neutral", "2": "contradiction",
}
_HANS_RAW = {"entailment": "entailment", "non-entailment": "non-entailment", "0": "entailment", "1": "non-entailment"}
_FILES_RAW = {
    **_THREE_WAY_RAW,
    "non-entailment": "non-entailment", "non_entailment": "non-entailment", "not_entailment": "non-entailment",
}
_RAW_LABELS = {"mnli": _THREE_WAY_RAW, "anli": _THREE_WAY_RAW, "snli": _THREE_WAY_RAW, "hans": _HANS_RAW, "files": _FILES_RAW}
_NO_GOLD = ("-", "-1")  # MNLI/SNLI files: '-'; hub copies: -1

_FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".csv": "csv", ".tsv": "tsv", ".txt": "tsv",
    ".parquet": "parquet", ".pq": "parquet",
}

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def load_nli(name: str, path_or_split: PathLike, label_map: str = "2way", column_map: Optional[dict] = None) -> pd.DataFrame:
    """Load one NLI split as a DataFrame in the common schema (see the module docstring).

    name: 'mnli', 'hans', 'anli', 'snli' or 'files' (any local file; needs a path).
    path_or_split: an existing local file (.jsonl/.json/.csv/.tsv/.txt/.parquet, optionally .gz for
        text formats; the official GLUE MNLI TSV and HANS ``heuristics_*_set.txt`` included), or a
        hub split name such as 'validation_matched' (mnli), 'dev_r1' (anli), 'validation' (hans).
    label_map: '2way' (entailment / non-entailment) or '3way' (not for HANS).
    column_map: schema field -> source column, e.g. {'premise': 'sentence1', 'hypothesis':
        'sentence2', 'label': 'gold_label', 'id': 'pairID'}; {'id': None} numbers the rows instead of
        reading ids; other keys rename a source column into an extra, e.g. {'genre': 'domain'}.
        Fields not named are found under their usual names (premise/sentence1/context, ...).
    """
    name = _check_name(name)
    _check_label_map(name, label_map)
    column_map = _check_column_map(column_map)
    raw, origin = _read_source(name, path_or_split)
    return _to_schema(raw, origin, name, label_map, column_map)


def shared_nli_dir() -> Optional[Path]:
    """The offline NLI data pack (``shared/data/nli``) if it can be found, else None.

    ``$FASTIF_NLI_DIR`` overrides the search. Otherwise the working directory, the package location
    and each of their parents are searched for a ``shared/data/nli`` folder (the pack lives next to
    the repository: ``<repo>/../shared/data/nli``).
    """
    override = os.environ.get(SHARED_NLI_ENV)
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            return path.resolve()
        logger.warning("%s=%s is not a folder; no shared NLI data used", SHARED_NLI_ENV, override)
        return None
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data" / "nli"
            if candidate.is_dir():
                return candidate
    return None


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in SOURCES:
        raise ConfigError(f"Unknown NLI dataset name {name!r}. Fix: use one of {', '.join(SOURCES)} ('files' for any local file).")
    return name.lower()


def _check_label_map(name: str, label_map: str) -> None:
    if label_map not in LABEL_NAMES:
        raise ConfigError(f"Unknown label_map {label_map!r}. Fix: use '2way' (entailment / non-entailment) or '3way' (entailment / neutral / contradiction).")
    if name == "hans" and label_map == "3way":
        raise ConfigError(
            "HANS has only two labels (entailment, non-entailment), so label_map='3way' cannot apply to it. "
            "Fix: use label_map='2way' (in configs: data.label_map=2way); models trained 3-way are scored on "
            "HANS by merging their neutral and contradiction predictions."
        )


def _check_column_map(column_map: Optional[dict]) -> dict:
    if column_map is None:
        return {}
    if not isinstance(column_map, dict) and not hasattr(column_map, "items"):
        raise ConfigError(f"column_map must be a mapping of schema field -> source column, got {type(column_map).__name__}. Fix: e.g. column_map={{'premise': 'sentence1', 'hypothesis': 'sentence2', 'label': 'gold_label'}}.")
    checked = {}
    for field, column in dict(column_map).items():
        if field == "label_name":
            raise ConfigError("column_map cannot set 'label_name': it is derived from the label. Fix: map the source's label column with 'label' instead.")
        if column is None and field != "id":
            raise ConfigError(f"column_map[{field!r}] is None; only 'id' may be None (number the rows). Fix: name the source column for {field!r}.")
        if column is not None and not isinstance(column, str):
            raise ConfigError(f"column_map[{field!r}] must be a column name (str), got {column!r}. Fix: give the source column's name as text.")
        checked[str(field)] = column
    return checked


# --------------------------------------------------------------------------------------------------
# Reading: every reader returns the raw frame (RangeIndex) and where each of its rows came from.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """Where raw rows came from, for ids and error messages."""

    label: str  # a file path, or "hub dataset 'x', split 'y'"
    stem: str  # used in generated and prefixed ids
    unit: str  # "line" for text files, "row" for parquet, JSON arrays and hub splits
    positions: np.ndarray  # per raw row: 1-based line number, or 1-based row number
    header: str  # where the column names are, for messages
    round_hint: Optional[int] = None  # ANLI round from the split name or path
    tsv_columns: Optional[int] = None  # header width of a tab-separated file, to explain short lines

    def where(self, i: int) -> str:
        return f"{self.label}, {self.unit} {int(self.positions[i])}"

    def short_line_note(self, i: int) -> str:
        """' (the line has k fields ...)' when row i's line has fewer tab-separated fields than the header.

        Pandas fills missing trailing fields with '' silently; this is looked up only on the error path.
        """
        if self.tsv_columns is None:
            return ""
        line_number = int(self.positions[i])
        with open(self.label, encoding="utf-8-sig", newline="") as handle:
            for number, line in enumerate(handle, 1):
                if number == line_number:
                    fields = line.rstrip("\r\n").count("\t") + 1
                    if fields < self.tsv_columns:
                        return f" (the line has {fields} tab-separated fields but the header has {self.tsv_columns}; the missing ones read as empty)"
                    return ""
        return ""


def _read_source(name: str, path_or_split: PathLike) -> tuple[pd.DataFrame, _Origin]:
    text = os.fspath(path_or_split)
    path = Path(text).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.exists():
        raise InputError(f"{path} is a folder, not a data file. Fix: pass one file, e.g. {path}/dev.jsonl.")
    if name == "files" or _looks_like_path(text):
        hint = f" The shared offline NLI pack is at {shared_nli_dir()}." if shared_nli_dir() else ""
        raise InputError(f"{path}: no such file. Fix: check the path (relative paths start at {Path.cwd()}).{hint}")
    return _read_hub(name, text)


def _looks_like_path(text: str) -> bool:
    suffixes = [s for s in Path(text).suffixes if s != ".gz"]
    return os.sep in text or "/" in text or (bool(suffixes) and suffixes[-1].lower() in _FORMAT_BY_SUFFIX)


def _read_file(path: Path) -> tuple[pd.DataFrame, _Origin]:
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    if compressed:
        suffixes = suffixes[:-1]
    fmt = _FORMAT_BY_SUFFIX.get(suffixes[-1] if suffixes else "")
    if fmt is None or fmt == "json":
        fmt = _sniff_format(path, compressed, fmt)
    stem = _file_stem(path)
    if fmt == "parquet":
        raw = _read_parquet(path)
        return raw, _Origin(str(path), stem, "row", np.arange(1, len(raw) + 1), "columns", _round_hint(str(path)))
    if fmt == "json_array":
        raw = _read_json_array(path, compressed)
        return raw, _Origin(str(path), stem, "row", np.arange(1, len(raw) + 1), "keys", _round_hint(str(path)))
    if fmt == "jsonl":
        raw, lines = _read_jsonl(path, compressed)
        return raw, _Origin(str(path), stem, "line", lines, "keys", _round_hint(str(path)))
    sep = "\t" if fmt == "tsv" else ","
    raw, lines = _read_delimited(path, sep)
    tsv_columns = raw.shape[1] if sep == "\t" and not compressed else None
    return raw, _Origin(str(path), stem, "line", lines, "header (line 1)", _round_hint(str(path)), tsv_columns)


def _file_stem(path: Path) -> str:
    """File name without the compression and format suffixes: 'snli_1.0_dev.jsonl.gz' -> 'snli_1.0_dev'."""
    stem = path.name
    for suffix in (".gz", *sorted(_FORMAT_BY_SUFFIX, key=len, reverse=True)):
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "file"


def _open_bytes(path: Path, compressed: bool) -> bytes:
    try:
        return gzip.open(path).read() if compressed else path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc}). Fix: check the file's permissions and, for .gz, that it is gzip-compressed.") from exc


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}, line {line}: not valid UTF-8 ({exc.reason} at byte {exc.start}). Fix: re-save the file as UTF-8.") from exc


def _sniff_format(path: Path, compressed: bool, hint: Optional[str]) -> str:
    head = _open_bytes(path, compressed)[:65536]
    if head.startswith(b"PAR1"):
        return "parquet"
    first = head.lstrip().split(b"\n", 1)[0]
    if first.startswith(b"["):
        return "json_array"
    if first.startswith(b"{"):
        return "jsonl"
    if hint == "json":
        raise InputError(f"{path}, line 1: a .json file must hold JSON lines (one object per line) or a JSON array. Fix: convert it, or give it the extension of its real format (.csv, .tsv).")
    if b"\t" in first:
        return "tsv"
    if b"," in first:
        return "csv"
    raise InputError(
        f"{path}: cannot tell the file format from its extension or its first line. "
        "Fix: use one of the extensions .jsonl, .csv, .tsv (or .txt for tab-separated), .parquet."
    )


def _round_hint(text: str) -> Optional[int]:
    """ANLI round from a split name ('dev_r1') or a path ('R2/dev.jsonl', 'anli_r3_dev.jsonl')."""
    found = set(re.findall(r"(?:^|[/\\_.\-])[rR]([123])(?=$|[/\\_.\-\[])", text))
    return int(found.pop()) if len(found) == 1 else None


def _read_jsonl(path: Path, compressed: bool) -> tuple[pd.DataFrame, np.ndarray]:
    text = _decode(path, _open_bytes(path, compressed))
    # split on '\n' only: str.splitlines would also split on U+2028 etc., which JSON strings may hold raw.
    numbered = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not numbered:
        raise InputError(f"{path}: the file is empty. Fix: pass a file with one JSON object per line.")
    loads = json.loads
    try:
        records = [loads(line) for _, line in numbered]
    except json.JSONDecodeError:
        for n, line in numbered:
            try:
                loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{path}, line {n}, character {exc.colno}: malformed JSON ({exc.msg}). "
                    "Fix: repair that line; each line must be one complete JSON object."
                ) from exc
        raise  # pragma: no cover - the loop above always finds the line
    for k, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}, line {numbered[k][0]}: expected a JSON object {{...}}, got {type(record).__name__}. Fix: write one object per line with premise, hypothesis and label keys.")
    lines = np.fromiter((n for n, _ in numbered), dtype=np.int64, count=len(numbered))
    return pd.DataFrame(records), lines


def _read_json_array(path: Path, compressed: bool) -> pd.DataFrame:
    text = _decode(path, _open_bytes(path, compressed))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}, line {exc.lineno}, character {exc.colno}: malformed JSON ({exc.msg}). Fix: repair the file, or write it as JSON lines (.jsonl).") from exc
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a non-empty JSON array of objects. Fix: write one object per example, or use JSON lines (.jsonl).")
    for k, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}, row {k + 1}: expected a JSON object {{...}}, got {type(record).__name__}. Fix: make every array element an object with premise, hypothesis and label.")
    return pd.DataFrame(records)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        raw = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise InputError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc}). Fix: rewrite it with DataFrame.to_parquet, or give it the extension of its real format.") from exc
    if len(raw) == 0:
        raise InputError(f"{path}: the file has no rows. Fix: pass a file with examples.")
    return raw.reset_index(drop=True)


def _read_delimited(path: Path, sep: str) -> tuple[pd.DataFrame, np.ndarray]:
    kind = "tab" if sep == "\t" else "comma"
    options = dict(
        sep=sep, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False,
        index_col=False, encoding="utf-8-sig",
    )
    if sep == "\t":
        # GLUE and HANS TSVs hold literal quotation marks; quote handling would merge lines.
        options["quoting"] = csv.QUOTE_NONE
    try:
        raw = pd.read_csv(path, **options)
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{path}: the file is empty. Fix: pass a file with a header line and examples.") from exc
    except UnicodeDecodeError as exc:
        _decode(path, path.read_bytes())  # raises with the line number
        raise InputError(f"{path}: not valid UTF-8. Fix: re-save the file as UTF-8.") from exc
    except pd.errors.ParserError as exc:
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if found and found.group(1) == "1":
            with open(path, encoding="utf-8-sig", errors="replace") as handle:
                raise _single_column_error(path, sep, handle.readline().rstrip("\r\n")) from exc
        if found:
            expected, line, saw = found.groups()
            stray = "a tab inside the text" if sep == "\t" else "an unquoted comma inside the text (quote such fields)"
            raise InputError(
                f"{path}, line {line}, column {int(expected) + 1}: {saw} {kind}-separated fields but the header has {expected}. "
                f"Fix: that line probably holds {stray}; repair it."
            ) from exc
        raise InputError(f"{path}: cannot be parsed as {kind}-separated text ({exc}). Fix: check the file's format and extension.") from exc
    if raw.shape[1] == 1:
        raise _single_column_error(path, sep, str(raw.columns[0]))
    if len(raw) == 0:
        raise InputError(f"{path}: the file has a header but no examples. Fix: pass a file with examples.")
    lines = np.arange(2, len(raw) + 2, dtype=np.int64)
    if sep == ",":
        # Quoted CSV fields may span lines; shift later rows by the newlines inside earlier ones.
        inner = np.zeros(len(raw), dtype=np.int64)
        for column in raw.columns:
            inner += raw[column].str.count("\n").to_numpy(dtype=np.int64)
        lines += np.cumsum(inner) - inner
    blank = (raw == "").all(axis=1).to_numpy()
    if blank.any():
        raw = raw.loc[~blank].reset_index(drop=True)
        lines = lines[~blank]
    return raw, lines


def _single_column_error(path: Path, sep: str, header: str) -> InputError:
    kind = "tab" if sep == "\t" else "comma"
    if sep == "\t" and "," in header:
        advice = "it looks comma-separated; use a .csv extension or save it tab-separated"
    elif sep == "," and "\t" in header:
        advice = "it looks tab-separated; use a .tsv (or .txt) extension or save it comma-separated"
    else:
        advice = f"the file is not {kind}-separated; save it with {kind}s between the columns or use the extension of its real format"
    shown = header if len(header) <= 80 else header[:77] + "..."
    return InputError(f"{path}, line 1, column {shown!r}: the header splits into a single column, so {advice}.")


def _read_hub(name: str, split: str) -> tuple[pd.DataFrame, _Origin]:
    hub_id = HUB_IDS[name]
    try:
        import datasets

        dataset = datasets.load_dataset(hub_id, split=split)
        raw = dataset.to_pandas()
    except Exception as exc:  # offline, unknown split, missing package: all need the same fix
        shared = shared_nli_dir()
        pack = f" The offline pack at {shared} has MNLI, ANLI and HANS-format files." if shared else ""
        detail = str(exc).strip().replace("\n", " ")[:300]
        raise InputError(
            f"Could not load split {split!r} of the {name.upper()} hub dataset '{hub_id}' ({type(exc).__name__}: {detail}). "
            f"'{split}' is not a local file, so it was taken as a hub split name, and the hub is unreachable or has no such split. "
            f"Fix: pass a local file instead (jsonl, csv, tsv or parquet), e.g. load_nli('{name}', 'path/to/{name}_dev.jsonl').{pack}"
        ) from exc
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_") or "split"
    origin = _Origin(f"hub dataset '{hub_id}', split '{split}'", stem, "row", np.arange(1, len(raw) + 1), "columns", _round_hint(split))
    if len(raw) == 0:
        raise InputError(f"{origin.label}: the split is empty. Fix: choose another split.")
    return raw.reset_index(drop=True), origin


# --------------------------------------------------------------------------------------------------
# Normalisation into the schema
# --------------------------------------------------------------------------------------------------


def _to_schema(raw: pd.DataFrame, origin: _Origin, name: str, label_map: str, column_map: dict) -> pd.DataFrame:
    raw.columns = [str(c) for c in raw.columns]
    mapping = _resolve_columns(raw, origin, name, column_map)

    classes, keep, n_no_gold = _parse_labels(raw, origin, name, label_map, mapping["label"])
    if not keep.any():
        raise InputError(f"{origin.label}: every row lacks a gold label ('-' or -1), so nothing is left. Fix: pass a split with gold labels.")
    premise = _text_column(raw, origin, mapping["premise"], keep)
    hypothesis = _text_column(raw, origin, mapping["hypothesis"], keep)
    ids = _id_column(raw, origin, name, mapping["id"], keep)

    names = LABEL_NAMES[label_map]
    if label_map == "2way":
        labels = (classes[keep] != "entailment").to_numpy(dtype=np.int64)
    else:
        labels = classes[keep].map({c: i for i, c in enumerate(names)}).to_numpy(dtype=np.int64)
    out = pd.DataFrame({
        "id": ids,
        "premise": premise,
        "hypothesis": hypothesis,
        "label": labels,
        "label_name": np.asarray(names, dtype=object)[labels],
    })
    for extra, column in _extra_columns(raw, name, mapping, column_map):
        out[extra] = raw[column].to_numpy()[keep]
    if name == "anli" and "round" not in out.columns and origin.round_hint is not None:
        out["round"] = np.int64(origin.round_hint)
    out.attrs["source"] = origin.label
    out.attrs["n_dropped_no_gold"] = n_no_gold
    if n_no_gold:
        logger.info("%s: dropped %d of %d rows without a gold label ('-' or -1)", origin.label, n_no_gold, len(raw))
    return out


def _resolve_columns(raw: pd.DataFrame, origin: _Origin, name: str, column_map: dict) -> dict:
    found = list(raw.columns)
    mapping: dict[str, Optional[str]] = {}
    for field, column in column_map.items():
        if column is not None and column not in raw.columns:
            raise InputError(
                f"{origin.label}, {origin.header}, column {column!r}: column_map maps {field!r} to {column!r}, "
                f"but there is no such column; found {found}. Fix: correct column_map[{field!r}] to one of those."
            )
        mapping[field] = column
    for field, candidates in _FIELD_CANDIDATES.items():
        if field not in mapping:
            mapping[field] = next((c for c in candidates if c in raw.columns), None)
    missing = [f for f in _REQUIRED if mapping[f] is None]
    if missing:
        where = f"{origin.label}, {origin.unit} {int(origin.positions[0])}" if origin.unit == "line" and origin.header == "keys" else f"{origin.label}, {origin.header}"
        usual = "; ".join(f"{f}: {' / '.join(_FIELD_CANDIDATES[f])}" for f in missing)
        example = ", ".join(f"'{f}': '<column>'" for f in missing)
        raise InputError(
            f"{where}, column(s) {missing}: missing; the {name} loader needs premise, hypothesis and label "
            f"but found columns {found}. Usual names ({usual}) are not there. "
            f"Fix: rename the columns, or pass column_map={{{example}}} naming the file's columns."
        )
    return mapping


def _label_keys(values: pd.Series) -> pd.Series:
    """Labels as lower-cased text; integral numbers as their decimal text ('0', '-1')."""
    if pd.api.types.is_bool_dtype(values):
        return values.astype(str).str.lower()
    if pd.api.types.is_float_dtype(values):
        finite = values.dropna()
        if (finite == np.round(finite)).all():
            values = values.astype("Int64")
    return values.astype(str).str.strip().str.lower()


def _parse_labels(raw: pd.DataFrame, origin: _Origin, name: str, label_map: str, column: str) -> tuple[pd.Series, np.ndarray, int]:
    values = raw[column]
    missing = values.isna().to_numpy()
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise InputError(f"{origin.where(i)}, column {column!r}: the label is missing ({int(missing.sum())} rows in all). Fix: give every row a label, or drop those rows.")
    keys = _label_keys(values)
    empty = (keys == "").to_numpy()
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise InputError(f"{origin.where(i)}, column {column!r}: the label is empty{origin.short_line_note(i)} ({int(empty.sum())} rows in all). Fix: give every row a label, or drop those rows.")
    vocabulary = _RAW_LABELS[name]
    classes = keys.map(vocabulary)
    no_gold = keys.isin(_NO_GOLD).to_numpy()
    unknown = classes.isna().to_numpy() & ~no_gold
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        allowed = ", ".join(repr(v) for v in vocabulary)
        raise InputError(
            f"{origin.where(i)}, column {column!r}: unknown label {values.iloc[i]!r} ({int(unknown.sum())} rows in all). "
            f"Allowed for {name}: {allowed}; '-' or -1 marks a row without a gold label (dropped). "
            "Fix: correct those labels, map the right column with column_map={'label': ...}, or use the dataset name that matches the file "
            "(HANS files: 'hans'; other label sets: 'files')."
        )
    if label_map == "3way":
        two_way = (classes == "non-entailment").to_numpy()
        if two_way.any():
            i = int(np.flatnonzero(two_way)[0])
            raise ConfigError(
                f"{origin.where(i)}, column {column!r}: label {values.iloc[i]!r} has no 3-way class "
                f"({int(two_way.sum())} rows are 2-way labels). Fix: use label_map='2way' for this file."
            )
    keep = ~no_gold
    return classes, keep, int(no_gold.sum())


def _text_column(raw: pd.DataFrame, origin: _Origin, column: str, keep: np.ndarray) -> np.ndarray:
    values = raw[column]
    missing = values.isna().to_numpy() & keep
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise InputError(f"{origin.where(i)}, column {column!r}: the text is missing ({int(missing.sum())} rows in all). Fix: give every row a premise and a hypothesis, or drop those rows.")
    if not pd.api.types.is_string_dtype(values) or pd.api.types.infer_dtype(values, skipna=True) != "string":
        not_text = ~values.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool) & keep
        if not_text.any():
            i = int(np.flatnonzero(not_text)[0])
            raise InputError(f"{origin.where(i)}, column {column!r}: expected text, got {type(values.iloc[i]).__name__} {values.iloc[i]!r}. Fix: write the text as a string (quoted in JSON).")
    stripped = values.astype(str).str.strip()
    empty = (stripped == "").to_numpy() & keep
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise InputError(f"{origin.where(i)}, column {column!r}: the text is empty or whitespace{origin.short_line_note(i)} ({int(empty.sum())} rows in all). Fix: fill in the text or drop those rows.")
    return stripped.to_numpy(dtype=object)[keep]


def _id_column(raw: pd.DataFrame, origin: _Origin, name: str, column: Optional[str], keep: np.ndarray) -> np.ndarray:
    # 'anli_R1_dev' already names its source; 'heuristics_evaluation_set' does not.
    prefix = f"{origin.stem}-" if origin.stem.lower().startswith(name) else f"{name}_{origin.stem}-"
    if column is None:
        # Row index within the source (before dropping rows without gold labels): stable under filtering.
        return (prefix + pd.Series(np.flatnonzero(keep)).astype(str)).to_numpy(dtype=object)
    values = raw[column]
    missing = values.isna().to_numpy() & keep
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise InputError(f"{origin.where(i)}, column {column!r}: the id is missing ({int(missing.sum())} rows in all). Fix: give every row an id, or pass column_map={{'id': None}} to number the rows.")
    text = _label_keys(values) if pd.api.types.is_numeric_dtype(values) else values.astype(str).str.strip()
    empty = (text == "").to_numpy() & keep
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise InputError(f"{origin.where(i)}, column {column!r}: the id is empty{origin.short_line_note(i)} ({int(empty.sum())} rows in all). Fix: give every row an id, or pass column_map={{'id': None}} to number the rows.")
    kept = text[keep].reset_index(drop=True)
    duplicated = kept.duplicated().to_numpy()
    if duplicated.any():
        rows = np.flatnonzero(keep)
        j = int(np.flatnonzero(duplicated)[0])
        first = int(np.flatnonzero((kept == kept.iloc[j]).to_numpy())[0])
        raise InputError(
            f"{origin.where(int(rows[j]))}, column {column!r}: duplicate id {kept.iloc[j]!r}, first seen at "
            f"{origin.unit} {int(origin.positions[rows[first]])} ({int(duplicated.sum())} duplicate rows in all). "
            "Fix: make the ids unique, or pass column_map={'id': None} to number the rows instead."
        )
    if column == "id":
        return kept.to_numpy(dtype=object)
    return (prefix + kept).to_numpy(dtype=object)


def _extra_columns(raw: pd.DataFrame, name: str, mapping: dict, column_map: dict) -> list[tuple[str, str]]:
    """(output name, source column) for the extras kept next to the schema columns."""
    consumed = {mapping["premise"], mapping["hypothesis"], mapping["label"]}
    if mapping["id"] == "id":
        consumed.add("id")
    extras: list[tuple[str, str]] = [(field, column) for field, column in column_map.items() if field not in _SCHEMA and column is not None]
    renamed_sources = {column for _, column in extras}
    if name == "files":
        candidates = [c for c in raw.columns if c not in consumed]
    else:
        candidates = [c for c in _NAMED_SOURCE_EXTRAS if c in raw.columns and c not in consumed]
    taken = {field for field, _ in extras}
    for column in candidates:
        if column in _SCHEMA or column in taken or column in renamed_sources:
            continue
        extras.append((column, column))
        taken.add(column)
    return extras
