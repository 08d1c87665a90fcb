"""Load, validate and audit sentiment classification data (ChnSentiCorp layout by default).

Every split becomes a `datasets.Dataset` with exactly two columns, `text` (str) and `label` (int64).
Files are read strictly: a bad row is an error naming file, line, column and value, or, with
`on_bad_rows="skip"`, a line in a rejects JSONL file. Nothing is ever dropped silently.

    python -m sft.data audit --data_dir /path/to/chnsenticorp --json audit.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from sft.artifacts import REJECTS_FILE

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_STEMS = {"train": ("train",), "validation": ("dev", "validation"), "test": ("test",)}
SUPPORTED = (".tsv", ".csv", ".jsonl", ".json", ".parquet")
TEXT_COLUMNS = ("text", "text_a", "review", "sentence")
LABEL_COLUMNS = ("label", "labels")
# The project's one list of label spellings. Read from files when no raw label names are configured (class i also
# accepts "i"); the first spelling is the default verbalizer (template.py), the second the plots' English name.
DEFAULT_LABEL_NAMES = (("负面", "negative", "neg"), ("正面", "positive", "pos"))
MAX_LISTED = 10  # bad rows listed in one exception message
FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})


class DataError(ValueError):
    """A problem with the input data; the message says where (file:line) and what, one line per problem."""


@dataclass
class DataArguments:
    """Where the data comes from and how strictly it is checked (a block of the YAML recipe)."""

    dataset_name: str | None = field(default="lansinuote/ChnSentiCorp", metadata={
        "help": "Hugging Face hub dataset id; used only when no data_dir or *_file is given (the recipes read the "
                "copy shipped in data/chnsenticorp)."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Directory with train.*, dev.* (or validation.*) and test.*; any of .tsv/.csv/.jsonl/.json/.parquet."})
    train_file: str | None = field(default=None, metadata={"help": "Train split file (overrides data_dir)."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation split file (overrides data_dir)."})
    test_file: str | None = field(default=None, metadata={"help": "Test split file (overrides data_dir)."})
    raw_label_names: list[str] | None = field(default=None, metadata={
        "help": "Label values as written in the files, position i = class i (e.g. neg pos). "
                "Default: 0/负面/negative/neg and 1/正面/positive/pos."})
    on_bad_rows: str = field(default="error", metadata={
        "help": "Bad row: 'error' stops with file:line messages; 'skip' writes it to the rejects file.",
        "choices": ["error", "skip"]})
    rejects_file: str | None = field(default=None, metadata={
        "help": "JSONL file for skipped rows (default: rejected_rows.jsonl in the current directory)."})
    drop_duplicates: bool = field(default=False, metadata={"help": "Drop repeated texts from train (keep first)."})
    drop_eval_overlap: bool = field(default=False, metadata={
        "help": "Leak guard: drop train rows whose text also appears in dev or test."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N train rows."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Keep only the first N validation and test rows."})


# ----------------------------------------------------------------------------- labels


def normalize_label(raw: Any, label_names: Sequence[str] | None = None) -> int | None:
    """Map a raw label ('    0', 1, '正面', 'Positive', ...) to its class index, or None if unknown."""
    names = [(n,) for n in label_names] if label_names else DEFAULT_LABEL_NAMES
    if isinstance(raw, bool) or raw is None:  # True/None are never labels, even though bool is an int
        return None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, int):
        return raw if 0 <= raw < len(names) else None
    if not isinstance(raw, str):
        return None
    value = raw.strip().casefold()
    for i, spellings in enumerate(names):  # names first: configured names may themselves be digits
        if value in (s.casefold() for s in spellings):
            return i
    return int(value) if value.isascii() and value.isdigit() and int(value) < len(names) else None


def expected_labels(label_names: Sequence[str] | None = None) -> str:
    """Human-readable list of accepted label values, for error messages."""
    names = [(n,) for n in label_names] if label_names else DEFAULT_LABEL_NAMES
    groups = [[str(i) for i in range(len(names))]] + [list(col) for col in zip(*names, strict=True)]
    return ", ".join("/".join(g) for g in groups)


# ----------------------------------------------------------------------------- reading files


@dataclass
class _Row:
    """One record as read from a file, before validation. `problem` is set for structural errors."""

    line: int
    raw: str
    text: Any = None
    label: Any = None
    text_col: str = "text"
    label_col: str = "label"
    problem: str | None = None


def _short(value: Any, limit: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 4] + "...'"


def _pick(columns: Sequence[str], aliases: Sequence[str]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[a] for a in aliases if a in lowered), None)


def _locate(columns: Sequence[str], what: str = "column", labelled: bool = True) -> tuple[str, str, str | None]:
    """Pick the text and label columns by alias; the third item says what is missing, if anything."""
    text_col, label_col = _pick(columns, TEXT_COLUMNS), _pick(columns, LABEL_COLUMNS)
    needed = ((label_col, "label", LABEL_COLUMNS),) if labelled else ()
    for col, kind, aliases in (*needed, (text_col, "text", TEXT_COLUMNS)):
        if col is None:
            found = ", ".join(repr(c) for c in columns) or "none"
            hint = " (wrong delimiter?)" if len(columns) == 1 and any(d in columns[0] for d in ";,\t|") else ""
            return "", "", f"no {kind} {what} (expected one of {'/'.join(aliases)}; found {what}s: {found}){hint}"
    return text_col or "", label_col or "", None


def _decode(path: Path) -> str:
    """UTF-8 (with or without BOM); a bad byte is reported with its line and byte offset."""
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data[:offset].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[offset]:02x} at byte offset {offset}); "
                        "re-save the file as UTF-8") from e


def _read_delimited(path: Path, text: str, labelled: bool = True) -> Iterator[_Row]:
    """TSV (ERNIE layout, no quoting: reviews contain quotes) or CSV (normal quoting). Header is line 1."""
    tsv = path.suffix.lower() == ".tsv"
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    # strict: an unclosed quote is an error, not a field that silently swallows the rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",", quoting=quoting,
                        strict=not tsv)
    end = 0
    try:
        header = next(reader, [])
        text_col, label_col, missing = _locate(header, labelled=labelled)
        if missing:
            raise DataError(f"{path}:1: {missing}")
        ti, li = header.index(text_col), header.index(label_col) if label_col else None
        end = reader.line_num
        for fields in reader:
            line, end = end + 1, reader.line_num  # first physical line of this record
            raw = ("\t" if tsv else ",").join(fields)
            if not fields:  # a blank line holds no data; skipping it drops nothing
                continue
            if len(fields) != len(header):
                hint = " (stray tab in the text?)" if tsv and len(fields) > len(header) else ""
                problem = (f"expected {len(header)} fields ({', '.join(header)}) but found {len(fields)}{hint}: "
                           f"{_short(raw)}")
                yield _Row(line, raw, problem=problem)
                continue
            yield _Row(line, raw, fields[ti], None if li is None else fields[li], text_col, label_col)
    except csv.Error as e:
        raise DataError(f"{path}:{end + 1}: malformed CSV ({e})") from e


def _json_row(line: int, raw: str, obj: Any, labelled: bool = True) -> _Row:
    if not isinstance(obj, dict):
        return _Row(line, raw, problem=f"expected a JSON object, got {type(obj).__name__}: {_short(raw)}")
    text_col, label_col, missing = _locate(list(obj), "key", labelled)
    if missing:
        return _Row(line, raw, problem=missing)
    return _Row(line, raw, obj[text_col], obj.get(label_col), text_col, label_col)


def _read_json(path: Path, text: str, labelled: bool = True) -> Iterator[_Row]:
    """JSON lines (one object per line), or for .json also one JSON array of objects."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        yield from _read_json_array(path, text, labelled)
        return
    for line, raw in enumerate(text.split("\n"), 1):
        raw = raw.rstrip("\r")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            yield _Row(line, raw, problem=f"malformed JSON ({e.msg} at column {e.colno}): {_short(raw)}")
            continue
        yield _json_row(line, raw, obj, labelled)


def _read_json_array(path: Path, text: str, labelled: bool = True) -> Iterator[_Row]:
    """Decode the array one element at a time so that every object keeps the line it starts on."""
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\r\n]*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, last = 1, 0  # line number at position `last`, advanced incrementally
    while not text.startswith("]", pos):
        line, last = line + text.count("\n", last, pos), pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
        yield _json_row(line, text[pos:end], obj, labelled)
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise DataError(f"{path}:{line + text.count(chr(10), last, pos)}: malformed JSON array "
                            "(expected ',' or ']' after an element)")
    if text[pos + 1 :].strip():
        raise DataError(f"{path}: malformed JSON array (data after the closing ']')")


def _read_columns(source: str, columns: dict[str, list], labelled: bool = True) -> Iterator[_Row]:
    """Column-oriented data (parquet, hub datasets); 'line' is the 1-based row number."""
    text_col, label_col, missing = _locate(list(columns), labelled=labelled)
    if missing:
        raise DataError(f"{source}: {missing}")
    labels = columns[label_col] if label_col else [None] * len(columns[text_col])
    for i, (text, label) in enumerate(zip(columns[text_col], labels, strict=True), 1):
        raw = json.dumps({text_col: text, label_col: label}, ensure_ascii=False, default=str)
        yield _Row(i, raw, text, label, text_col, label_col)


def _check(row: _Row, label_names: Sequence[str] | None) -> tuple[int | None, str | None]:
    """Validate one row: (class index, None) or (None, reason)."""
    if row.problem:
        return None, row.problem
    label = normalize_label(row.label, label_names)
    if label is None:
        return None, f"column '{row.label_col}': unknown label {_short(row.label)} " \
                     f"(expected one of {expected_labels(label_names)})"
    if not isinstance(row.text, str):
        return None, f"column '{row.text_col}': text must be a string, got {_short(row.text)}"
    if not row.text.strip():
        kind = "empty text" if not row.text else f"whitespace-only text {_short(row.text)}"
        return None, f"column '{row.text_col}': {kind}"
    return label, None


def _validate(source: str, rows: Iterator[_Row], label_names: Sequence[str] | None, on_bad_rows: str,
              unit: str = "") -> tuple[list[dict], list[dict]]:
    """Split rows into examples and rejects; in error mode, raise listing the first bad rows."""
    examples, rejects, padded = [], [], []
    for row in rows:
        label, reason = _check(row, label_names)
        if reason is None:
            examples.append({"text": row.text, "label": label})
            if isinstance(row.label, str) and row.label != row.label.strip():
                padded.append(f"{unit}{row.line} {row.label!r}")
        else:
            rejects.append({"file": source, "line": row.line, "reason": reason, "raw": row.raw})
    if padded:  # accepted, but a wart worth knowing about (ChnSentiCorp's test.tsv has one)
        logger.warning("%s: %d label(s) with surrounding whitespace, read as the stripped value (line %s)", source,
                       len(padded), ", ".join(padded[:MAX_LISTED]))
    if rejects and on_bad_rows != "skip":
        lines = [f"{r['file']}:{unit}{r['line']}: {r['reason']}" for r in rejects[:MAX_LISTED]]
        if len(rejects) > MAX_LISTED:
            lines.append(f"... and {len(rejects) - MAX_LISTED} more bad rows in {source}")
        raise DataError("\n".join(lines))
    if not examples:
        what = f"all {len(rejects)} rows were rejected" if rejects else "no data rows"
        raise DataError(f"{source}: {what}")
    return examples, rejects


def _file_rows(path: Path, labelled: bool = True) -> Iterator[_Row]:
    """The records of one file in any supported format (.txt too when no labels are wanted: a text per line)."""
    ext = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    supported = SUPPORTED if labelled else (*SUPPORTED, ".txt")
    if ext not in supported:
        raise DataError(f"{path}: unsupported file extension '{ext}' (supported: {', '.join(supported)})")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            return _read_columns(str(path), pq.read_table(path).to_pydict(), labelled)
        except Exception as e:  # pyarrow raises several types; none should escape as a bare traceback
            raise DataError(f"{path}: cannot read parquet file ({type(e).__name__}: {e})") from e
    text = _decode(path)
    if ext == ".txt":
        return iter([_Row(n, line, line) for n, line in enumerate(text.splitlines(), 1)])
    if not text.strip():
        raise DataError(f"{path}: file is empty (only whitespace)")
    return _read_delimited(path, text, labelled) if ext in (".tsv", ".csv") else _read_json(path, text, labelled)


def read_examples(path: str | Path, label_names: Sequence[str] | None = None,
                  on_bad_rows: str = "error") -> tuple[list[dict], list[dict]]:
    """Read one data file into ([{text, label}], [rejected {file, line, reason, raw}])."""
    path = Path(path)
    rows = _file_rows(path)
    return _validate(str(path), rows, label_names, on_bad_rows, "row " if path.suffix.lower() == ".parquet" else "")


def read_texts(path: str | Path) -> tuple[list[tuple[int, str]], int]:
    """Texts to classify, labels not needed: ([(line, text)], blank entries skipped). The same readers and column
    names as training data; a malformed record is an error naming file:line, a blank text a counted skip."""
    rows = list(_file_rows(Path(path), labelled=False))
    for row in rows:
        if row.problem or not isinstance(row.text, str):
            raise DataError(f"{path}:{row.line}: {row.problem or f'text must be a string, got {_short(row.text)}'}")
    kept = [(row.line, row.text) for row in rows if row.text.strip()]
    return kept, len(rows) - len(kept)


# ----------------------------------------------------------------------------- splits


def resolve_files(args: DataArguments) -> dict[str, Path]:
    """Split -> local file found via data_dir and/or explicit *_file (which wins). Empty: no local data."""
    found: dict[str, Path] = {}
    if args.data_dir:
        root = Path(args.data_dir)
        if not root.is_dir():
            raise DataError(f"data_dir '{root}' does not exist or is not a directory")
        for split, stems in SPLIT_STEMS.items():
            hits = [root / f"{s}{e}" for s in stems for e in SUPPORTED if (root / f"{s}{e}").is_file()]
            if len(hits) > 1:
                raise DataError(f"{root}: more than one {split} file ({', '.join(h.name for h in hits)}); keep one")
            if hits:
                found[split] = hits[0]
    for split, name in zip(SPLITS, (args.train_file, args.validation_file, args.test_file), strict=True):
        if name:
            found[split] = Path(name)
    return found


def _missing_split(args: DataArguments, split: str) -> DataError:
    wanted = "/".join(f"{s}.*" for s in SPLIT_STEMS[split])
    if args.data_dir:
        listing = ", ".join(sorted(p.name for p in Path(args.data_dir).iterdir())) or "nothing"
        return DataError(f"data_dir '{args.data_dir}' has no {split} split (looked for {wanted}; found: {listing})")
    return DataError(f"no {split} split: set data_dir or {split}_file")


def _load_hub(name: str, splits: Sequence[str], label_names: Sequence[str] | None,
              on_bad_rows: str) -> tuple[dict[str, list[dict]], list[dict]]:
    from sft.sources import go_offline_if_unreachable

    go_offline_if_unreachable()  # an unreachable hub fails now, not after ~25 s of retries
    try:
        hub = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown id, auth...: all end up as one actionable line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"cannot load dataset '{name}' from the hub ({type(e).__name__}: {first}); "
                        "if offline, pass data_dir or train_file/validation_file/test_file") from e
    out, rejects = {}, []
    for split in splits:
        hub_split = next((s for s in ((split, "dev") if split == "validation" else (split,)) if s in hub), None)
        if hub_split is None:
            raise DataError(f"hub dataset '{name}' has no {split} split (found: {', '.join(hub)})")
        source = f"{name}[{hub_split}]"
        out[split], rj = _validate(source, _read_columns(source, hub[hub_split].to_dict()), label_names, on_bad_rows,
                                 "row ")
        rejects += rj
    return out, rejects


def apply_train_filters(dsd: datasets.DatasetDict, drop_duplicates: bool,
                        drop_eval_overlap: bool) -> tuple[datasets.DatasetDict, dict[str, int]]:
    """Drop repeated train texts (keep first), then train texts also in validation/test (leak guard)."""
    report = {"train_rows_before": 0, "duplicates_dropped": 0, "eval_overlap_dropped": 0, "train_rows_after": 0}
    if "train" not in dsd:
        return dsd, report
    eval_texts = {t for s in ("validation", "test") if s in dsd for t in dsd[s]["text"]}
    if drop_eval_overlap and not eval_texts:
        logger.warning("drop_eval_overlap is on but there is no validation/test split to compare against")
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(dsd["train"]["text"]):
        if drop_duplicates and text in seen:
            report["duplicates_dropped"] += 1
            continue
        seen.add(text)
        if drop_eval_overlap and text in eval_texts:
            report["eval_overlap_dropped"] += 1
            continue
        keep.append(i)
    report["train_rows_before"], report["train_rows_after"] = len(dsd["train"]), len(keep)
    out = datasets.DatasetDict(dsd)
    if len(keep) < len(dsd["train"]):
        out["train"] = dsd["train"].select(keep)
        logger.info("train filters: %s", report)
    return out, report


def write_rejects_file(path: str | Path, rejects: list[dict]) -> None:
    """Skipped rows, one JSON object per line (file, line, reason, raw)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), encoding="utf-8")
    logger.warning("skipped %d bad rows; see %s", len(rejects), out)


def load_splits(args: DataArguments, splits: Sequence[str] = SPLITS, rejects_path: str | None = None,
                write_rejects: bool = True) -> datasets.DatasetDict:
    """Load, validate and filter the requested splits into a DatasetDict(text: str, label: int64).

    The load report (files, rejected rows, filter counts) is attached as `dsd.load_report`. With
    `write_rejects=False` the skipped rows stay in the report (`rejects`) for the caller to write later.
    """
    if unknown := [s for s in splits if s not in SPLITS]:
        raise DataError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    if args.on_bad_rows not in ("error", "skip"):
        raise DataError(f"on_bad_rows must be 'error' or 'skip', got {args.on_bad_rows!r}")
    files = resolve_files(args)
    # the leak guard needs the eval splits even when only train is requested
    guard = ("validation", "test") if args.drop_eval_overlap and "train" in splits else ()
    rows: dict[str, list[dict]] = {}
    rejects: list[dict] = []
    if files or args.data_dir:
        for split in splits:
            if split not in files:
                raise _missing_split(args, split)
        for split in dict.fromkeys([*splits, *(s for s in guard if s in files)]):
            rows[split], rj = read_examples(files[split], args.raw_label_names, args.on_bad_rows)
            rejects += rj
    elif args.dataset_name:
        rows, rejects = _load_hub(args.dataset_name, list(splits), args.raw_label_names, args.on_bad_rows)
    else:
        raise DataError("no data source: set data_dir, train_file/validation_file/test_file or dataset_name")

    report: dict[str, Any] = {"files": {s: str(p) for s, p in files.items() if s in rows}, "rejected_rows": 0}
    if rejects:
        out = Path(rejects_path or args.rejects_file or REJECTS_FILE)
        report.update(rejected_rows=len(rejects), rejects_file=str(out))
        if write_rejects:
            write_rejects_file(out, rejects)
        else:  # the caller writes them once its own checks have passed
            report["rejects"] = rejects

    dsd = datasets.DatasetDict({s: datasets.Dataset.from_list(r, features=FEATURES) for s, r in rows.items()})
    dsd, report["filters"] = apply_train_filters(dsd, args.drop_duplicates, args.drop_eval_overlap)
    for split, cap in (("train", args.max_train_samples), ("validation", args.max_eval_samples),
                       ("test", args.max_eval_samples)):
        if cap is not None and split in dsd and len(dsd[split]) > cap:
            logger.info("%s: keeping the first %d of %d rows", split, cap, len(dsd[split]))
            dsd[split] = dsd[split].select(range(cap))
    dsd = datasets.DatasetDict({s: dsd[s] for s in splits})
    dsd.load_report = report
    return dsd


# ----------------------------------------------------------------------------- audit


def _percentiles(values: list[int]) -> dict[str, int | None]:
    """Nearest-rank percentiles: the smallest value with at least p% of the values at or below it."""
    v = sorted(values)
    pick = (lambda p: v[max(math.ceil(p / 100 * len(v)), 1) - 1]) if v else (lambda p: None)
    return {"p50": pick(50), "p90": pick(90), "p99": pick(99), "max": pick(100)}


def audit(dsd: datasets.DatasetDict, tokenizer: Any = None) -> dict[str, Any]:
    """Sizes, label balance, duplicates, lengths, train overlap and label conflicts (texts compared exactly)."""
    report: dict[str, Any] = {"splits": {}}
    for name, ds in dsd.items():
        texts, labels = list(ds["text"]), list(ds["label"])
        stats = {"rows": len(texts), "labels": {str(k): n for k, n in sorted(Counter(labels).items())},
                 "duplicates": len(texts) - len(set(texts)), "chars": _percentiles([len(t) for t in texts])}
        if tokenizer is not None:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            stats["tokens"] = _percentiles([len(x) for x in ids])
        report["splits"][name] = stats
    train = set(dsd["train"]["text"]) if "train" in dsd else None
    report["overlap"] = {
        key: sum(t in train for t in dsd[split]["text"]) if train is not None and split in dsd else None
        for key, split in (("test_in_train", "test"), ("dev_in_train", "validation"))
    }
    by_text: dict[str, set[int]] = defaultdict(set)
    for ds in dsd.values():
        for text, label in zip(ds["text"], ds["label"], strict=True):
            by_text[text].add(label)
    conflicts = [{"text": t, "labels": sorted(ls)} for t, ls in by_text.items() if len(ls) > 1]
    report["conflicting_labels"] = len(conflicts)
    report["conflicting_examples"] = conflicts[:5]
    return report


def format_audit(report: dict[str, Any]) -> str:
    """The audit as a plain-text table."""
    def q(d: dict | None) -> str:
        return "/".join("-" if d[k] is None else str(d[k]) for k in ("p50", "p90", "p99", "max")) if d else "-"

    lines = [f"{'split':<11}{'rows':>7}  {'labels':<18}{'dups':>6}  {'chars p50/p90/p99/max':<24}tokens"]
    for name, s in report["splits"].items():
        labels = " ".join(f"{k}:{v}" for k, v in s["labels"].items())
        lines.append(f"{name:<11}{s['rows']:>7}  {labels:<18}{s['duplicates']:>6}  {q(s['chars']):<24}"
                     f"{q(s.get('tokens'))}")
    o = report["overlap"]
    lines.append(f"test rows whose text is in train: {o['test_in_train']}; dev rows: {o['dev_in_train']}")
    lines.append(f"distinct texts with conflicting labels: {report['conflicting_labels']}")
    if "rejected_rows" in report:
        lines.insert(-1, f"bad rows skipped (on_bad_rows=skip): {report['rejected_rows']}")
    lines += [f"  {c['labels']} {_short(c['text'])}" for c in report["conflicting_examples"]]
    return "\n".join(lines)


def _load_tokenizer(name: str) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as e:
        raise DataError(f"cannot load tokenizer '{name}' ({type(e).__name__})") from e


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("audit", help="print data statistics and write them as JSON")
    for name in ("data_dir", "train_file", "validation_file", "test_file", "rejects_file"):
        p.add_argument(f"--{name}")
    p.add_argument("--dataset_name", default=DataArguments.dataset_name)
    p.add_argument("--raw_label_names", nargs="+")
    p.add_argument("--on_bad_rows", choices=["error", "skip"], default="error")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--tokenizer", help="tokenizer path or hub id, to add token-length percentiles")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = DataArguments(**{k: v for k, v in vars(ns).items() if k not in ("command", "json", "tokenizer")})
        splits = [s for s in SPLITS if s in resolve_files(args)] or list(SPLITS)
        dsd = load_splits(args, splits)
        report = audit(dsd, _load_tokenizer(ns.tokenizer) if ns.tokenizer else None)
        report["rejected_rows"] = dsd.load_report["rejected_rows"]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_audit(report))
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return 0


def audit_main(argv: Sequence[str] | None = None) -> int:
    """The `sentiment-audit` console command: `python -m sft.data audit` without the subcommand word."""
    return main(["audit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
