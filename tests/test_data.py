"""Tests for sft/data.py: formats, strict validation, filters, audit and the audit CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest

from sft.data import (
    DataArguments,
    DataError,
    apply_train_filters,
    audit,
    load_splits,
    normalize_label,
    read_examples,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SAMPLE, FORMATS, BROKEN = DATA / "sample", DATA / "formats", DATA / "broken"


def _sample_rows(split: str) -> list[tuple[int, str]]:
    """Parse a sample tsv with plain string operations, independently of sft.data."""
    lines = (SAMPLE / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "label\ttext_a"
    return [(int(label), text) for label, text in (line.split("\t") for line in lines[1:])]


def _dsd(**splits: list[tuple[str, int]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
        for name, rows in splits.items()
    })


# ----------------------------------------------------------------------------- sample data and formats


def test_sample_data_is_balanced_and_disjoint():
    splits = {s: _sample_rows(s) for s in ("train", "dev", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 240, "dev": 60, "test": 60}
    for rows in splits.values():
        assert Counter(y for y, _ in rows) == {0: len(rows) // 2, 1: len(rows) // 2}
    texts = [{t for _, t in rows} for rows in splits.values()]
    assert sum(map(len, texts)) == 360  # no duplicates inside or across splits


def test_sample_files_match_generator(tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample_data", Path(__file__).parent / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(DATA) for p in DATA.rglob("*") if p.is_file())
    assert generated == committed
    for rel in generated:
        if rel.suffix != ".parquet":  # parquet bytes embed the writer version; compared by content below
            assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), f"{rel} is stale: rerun the script"
    assert read_examples(tmp_path / "formats/train.parquet") == read_examples(FORMATS / "train.parquet")


@pytest.mark.parametrize("name", ["train.csv", "train.jsonl", "train.json", "train.parquet"])
def test_every_format_round_trips_the_sample(name):
    expected = [{"text": t, "label": y} for y, t in _sample_rows("train")]
    examples, rejects = read_examples(FORMATS / name)
    assert rejects == []
    assert examples == expected


def test_load_splits_types_and_only_requested_splits():
    dsd = load_splits(DataArguments(data_dir=str(SAMPLE)), splits=("train", "test"))
    assert list(dsd) == ["train", "test"]
    assert dsd["train"].features == datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.Value("int64")})
    assert dsd["train"][0] == {"text": _sample_rows("train")[0][1], "label": _sample_rows("train")[0][0]}


def test_explicit_files_override_data_dir():
    args = DataArguments(data_dir=str(SAMPLE), train_file=str(FORMATS / "train.jsonl"),
                         test_file=str(BROKEN / "bom.tsv"))
    dsd = load_splits(args)
    assert (len(dsd["train"]), len(dsd["validation"]), len(dsd["test"])) == (240, 60, 3)


# ----------------------------------------------------------------------------- broken files

BROKEN_CASES = [
    # file, substrings that must all appear in the one-line message
    ("wrong_delimiter.csv", ["wrong_delimiter.csv:1:", "no label column", "'label;text'"]),
    ("missing_label_column.tsv", ["missing_label_column.tsv:1:", "no label column", "'sentiment'", "'text_a'"]),
    ("missing_text_column.tsv", ["missing_text_column.tsv:1:", "no text column", "'comment'"]),
    ("extra_fields.tsv", ["extra_fields.tsv:3:", "expected 2 fields", "found 3", "非常失望"]),
    ("unknown_label_2.tsv", ["unknown_label_2.tsv:4:", "column 'label'", "unknown label '2'", "0/1"]),
    ("unknown_label_pos_word.tsv", ["unknown_label_pos_word.tsv:2:", "unknown label 'good'", "正面"]),
    ("empty_label.tsv", ["empty_label.tsv:3:", "column 'label'", "unknown label ''"]),
    ("empty_text.tsv", ["empty_text.tsv:2:", "column 'text_a'", "empty text"]),
    ("whitespace_text.tsv", ["whitespace_text.tsv:4:", "column 'text_a'", "whitespace-only text", r"\u3000"]),
    ("non_utf8.tsv", ["non_utf8.tsv:3:", "not valid UTF-8", "byte offset 54"]),
    ("truncated_last_line.tsv", ["truncated_last_line.tsv:4:", "expected 2 fields", "found 1", "'1'"]),
    ("empty.tsv", ["empty.tsv", "empty"]),
    ("unknown.xml", ["unknown.xml", "'.xml'", ".tsv, .csv, .jsonl, .json, .parquet"]),
    ("bad_json.jsonl", ["bad_json.jsonl:2:", "malformed JSON", '"房间很脏"']),
    ("does_not_exist.tsv", ["does_not_exist.tsv", "no such file"]),
]


@pytest.mark.parametrize(("name", "needles"), BROKEN_CASES, ids=[c[0] for c in BROKEN_CASES])
def test_broken_file_message(name, needles):
    with pytest.raises(DataError) as info:
        read_examples(BROKEN / name)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize("name", ["bom.tsv", "crlf.tsv"])
def test_bom_and_crlf_load_cleanly(name):
    examples, _ = read_examples(BROKEN / name)
    assert examples == [{"text": "房间很干净，服务很热情。", "label": 1},
                        {"text": "屏幕有坏点，非常失望。", "label": 0},
                        {"text": "内容很精彩，值得一读。", "label": 1}]


def test_padded_label_is_class_0():
    examples, _ = read_examples(BROKEN / "padded_label.tsv")
    assert examples[1] == {"text": "隔音很差，非常失望。", "label": 0}


def test_directory_without_test_split():
    with pytest.raises(DataError, match=r"no_test_split.*no test split.*found: dev\.tsv, train\.tsv"):
        load_splits(DataArguments(data_dir=str(BROKEN / "no_test_split")))
    dsd = load_splits(DataArguments(data_dir=str(BROKEN / "no_test_split")), splits=("train", "validation"))
    assert len(dsd["validation"]) == 3


@pytest.mark.parametrize("args", [DataArguments(data_dir="no/such/dir"), DataArguments(on_bad_rows="ignore"),
                                  DataArguments(train_file=str(SAMPLE / "train.tsv"))])
def test_bad_arguments(args):
    with pytest.raises(DataError):
        load_splits(args)


def test_many_bad_rows_are_listed_then_counted(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("label\ttext\n" + "".join(f"{i + 2}\treview {i}\n" for i in range(15)) + "1\tok\n")
    with pytest.raises(DataError) as info:
        read_examples(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 11
    assert lines[0].startswith(f"{path}:2: column 'label': unknown label '2'")
    assert lines[-1] == f"... and 5 more bad rows in {path}"


def test_json_array_and_multiline_csv_report_the_starting_line(tmp_path):
    array = tmp_path / "a.json"
    array.write_text('[\n  {"text": "好", "label": 1},\n  {"text": "差",\n   "label": 7}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:3: column 'label': unknown label 7"):
        read_examples(array)
    quoted = tmp_path / "q.csv"
    quoted.write_text('label,review\n1,"好, 很""好""\n真的"\n2,差\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.csv:4: column 'label': unknown label '2'"):
        read_examples(quoted)
    assert read_examples(quoted, on_bad_rows="skip")[0] == [{"text": '好, 很"好"\n真的', "label": 1}]


def test_parquet_problems_are_data_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"garbage\.parquet: cannot read parquet file"):
        read_examples(tmp_path / "garbage.parquet")
    pq.write_table(pa.table({"text": ["好", "差"], "stars": [5, 1]}), tmp_path / "stars.parquet")
    with pytest.raises(DataError, match=r"stars\.parquet: no label column .*found columns: 'text', 'stars'"):
        read_examples(tmp_path / "stars.parquet")
    pq.write_table(pa.table({"text": ["好", None], "label": [1, 0]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet:row 2: column 'text': text must be a string, got None"):
        read_examples(tmp_path / "null.parquet")


def test_skip_mode_writes_rejects(tmp_path, caplog):
    args = DataArguments(train_file=str(BROKEN / "unknown_label_2.tsv"),
                         validation_file=str(BROKEN / "extra_fields.tsv"), test_file=str(BROKEN / "bom.tsv"),
                         on_bad_rows="skip", rejects_file=str(tmp_path / "unused"))
    rejects_path = tmp_path / "out" / "rejects.jsonl"
    with caplog.at_level(logging.WARNING, logger="sft.data"):
        dsd = load_splits(args, rejects_path=str(rejects_path))
    assert (len(dsd["train"]), len(dsd["validation"]), len(dsd["test"])) == (2, 2, 3)
    rejects = [json.loads(line) for line in rejects_path.read_text(encoding="utf-8").splitlines()]
    assert [(Path(r["file"]).name, r["line"]) for r in rejects] == [("unknown_label_2.tsv", 4), ("extra_fields.tsv", 3)]
    assert rejects[0]["raw"] == "2\t中规中矩的一本书。" and "unknown label '2'" in rejects[0]["reason"]
    assert dsd.load_report["rejected_rows"] == 2
    assert "skipped 2 bad rows" in caplog.text
    assert not (tmp_path / "unused").exists()


def test_skip_mode_still_fails_on_file_level_problems():
    for name in ("missing_label_column.tsv", "non_utf8.tsv", "empty.tsv"):
        with pytest.raises(DataError):
            read_examples(BROKEN / name, on_bad_rows="skip")


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize(("raw", "names", "expected"), [
    ("0", None, 0), ("    0", None, 0), (" 1\t", None, 1), (1, None, 1), (0.0, None, 0),
    ("负面", None, 0), ("正面", None, 1), ("Negative", None, 0), ("POS", None, 1), ("neg", None, 0),
    ("2", None, None), (2, None, None), ("", None, None), ("   ", None, None), ("good", None, None),
    (None, None, None), (True, None, None), (-1, None, None), ("01x", None, None),
    ("neg", ["neg", "neu", "pos"], 0), ("2", ["neg", "neu", "pos"], 2), ("NEU", ["neg", "neu", "pos"], 1),
    ("正面", ["neg", "pos"], None), ("3", ["neg", "neu", "pos"], None),
])
def test_normalize_label(raw, names, expected):
    assert normalize_label(raw, names) == expected


def test_configured_label_names_through_load(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("label\ttext_a\nneu\t一般\npos\t好\n", encoding="utf-8")
    assert read_examples(path, ["neg", "neu", "pos"])[0] == [{"text": "一般", "label": 1}, {"text": "好", "label": 2}]
    path.write_text("label\ttext_a\npos\t好\n正面\t好\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.tsv:3: .*unknown label '正面' \(expected one of 0/1/2, neg/neu/pos\)"):
        read_examples(path, ["neg", "neu", "pos"])


# ----------------------------------------------------------------------------- filters


def test_apply_train_filters():
    dsd = _dsd(train=[("a", 1), ("b", 0), ("a", 1), ("c", 0), ("d", 1), ("c", 1)],
               validation=[("c", 0)], test=[("d", 1), ("x", 0)])
    out, report = apply_train_filters(dsd, drop_duplicates=True, drop_eval_overlap=False)
    assert out["train"]["text"][:] == ["a", "b", "c", "d"] and report["duplicates_dropped"] == 2
    out, report = apply_train_filters(dsd, drop_duplicates=False, drop_eval_overlap=True)
    assert out["train"]["text"][:] == ["a", "b", "a"] and report["eval_overlap_dropped"] == 3
    out, report = apply_train_filters(dsd, drop_duplicates=True, drop_eval_overlap=True)
    assert out["train"]["text"][:] == ["a", "b"]
    assert report == {"train_rows_before": 6, "duplicates_dropped": 2, "eval_overlap_dropped": 2, "train_rows_after": 2}
    assert len(dsd["train"]) == 6 and len(out["test"]) == 2  # input untouched, eval splits kept


def test_load_splits_filters_and_caps(tmp_path, caplog):
    train = tmp_path / "train.tsv"
    train.write_text("label\ttext_a\n" + "1\t好\n0\t差\n1\t好\n" + "".join(f"1\t好{i}\n" for i in range(5)), "utf-8")
    (tmp_path / "test.tsv").write_text("label\ttext_a\n0\t差\n1\t好3\n1\t好4\n", encoding="utf-8")
    args = DataArguments(data_dir=str(tmp_path), drop_duplicates=True, drop_eval_overlap=True, max_train_samples=3)
    with caplog.at_level(logging.INFO, logger="sft.data"):
        dsd = load_splits(args, splits=("train",))  # the leak guard reads test.tsv although only train is returned
    assert list(dsd) == ["train"] and dsd["train"]["text"][:] == ["好", "好0", "好1"]
    assert dsd.load_report["filters"]["eval_overlap_dropped"] == 3 and "duplicates_dropped': 1" in caplog.text
    args = DataArguments(data_dir=str(tmp_path), train_file=str(SAMPLE / "train.tsv"), max_eval_samples=2)
    assert len(load_splits(args, splits=("train", "test"))["test"]) == 2


def test_hub_loading_maps_splits_and_wraps_failures(monkeypatch):
    fake = _dsd(train=[("好", 1)], validation=[("差", 0), ("好", 1)], test=[("一般", 0)])
    monkeypatch.setattr(datasets, "load_dataset", lambda name: fake)
    dsd = load_splits(DataArguments())
    assert {s: len(d) for s, d in dsd.items()} == {"train": 1, "validation": 2, "test": 1}

    def offline(name):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="lansinuote/ChnSentiCorp.*pass data_dir"):
        load_splits(DataArguments())


# ----------------------------------------------------------------------------- audit


class CharTokenizer:
    """Stand-in tokenizer: one token per character."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [list(t) + ([0] if add_special_tokens else []) for t in texts]}


def test_audit_handcrafted():
    dsd = _dsd(train=[("aa", 1), ("bbbb", 0), ("aa", 0), ("c", 1)],
               validation=[("aa", 1), ("zz", 1)], test=[("c", 0), ("c", 0), ("bbbb", 0)])
    report = audit(dsd, tokenizer=CharTokenizer())
    train = report["splits"]["train"]
    assert train["rows"] == 4 and train["labels"] == {"0": 2, "1": 2} and train["duplicates"] == 1
    assert train["chars"] == {"p50": 2, "p90": 4, "p99": 4, "max": 4}  # sorted lengths 1,2,2,4 (nearest rank)
    assert train["tokens"] == train["chars"]
    assert report["splits"]["test"]["duplicates"] == 1
    assert report["overlap"] == {"test_in_train": 3, "dev_in_train": 1}
    assert report["conflicting_labels"] == 2  # "aa" (1 and 0 in train) and "c" (1 in train, 0 in test)
    assert {c["text"] for c in report["conflicting_examples"]} == {"aa", "c"}
    assert "tokens" not in audit(dsd)["splits"]["train"]


def test_audit_sample_data():
    report = audit(load_splits(DataArguments(data_dir=str(SAMPLE))))
    for split, name in (("train", "train"), ("dev", "validation"), ("test", "test")):
        rows = _sample_rows(split)
        lengths = sorted(len(t) for _, t in rows)
        stats = report["splits"][name]
        assert stats["rows"] == len(rows)
        assert stats["labels"] == {str(k): v for k, v in sorted(Counter(y for y, _ in rows).items())}
        assert stats["chars"]["max"] == lengths[-1] and stats["chars"]["p50"] == lengths[len(rows) // 2 - 1]
    assert report["overlap"] == {"test_in_train": 0, "dev_in_train": 0} and report["conflicting_labels"] == 0


@pytest.fixture(scope="module")
def real_dir(chnsenticorp_dir) -> Path:
    return chnsenticorp_dir


def test_shipped_data_matches_its_readme(real_dir):
    """data/README.md names each file's sha256 and row counts: the shipped copy is byte-identical to the standard
    splits, warts included."""
    import hashlib
    import re

    table = (real_dir.parent / "README.md").read_text(encoding="utf-8")
    row = r"^\| `chnsenticorp/(\w+)\.tsv` \| ([\d,]+) \| ([\d,]+) / ([\d,]+) \| `([0-9a-f]{64})` \|$"
    rows = re.findall(row, table, re.M)
    assert sorted(r[0] for r in rows) == ["dev", "test", "train"]
    report = audit(load_splits(DataArguments(data_dir=str(real_dir))))
    for split, n, zeros, ones, digest in rows:
        assert hashlib.sha256((real_dir / f"{split}.tsv").read_bytes()).hexdigest() == digest, split
        stats = report["splits"]["validation" if split == "dev" else split]
        assert stats["rows"] == int(n.replace(",", ""))
        assert stats["labels"] == {"0": int(zeros.replace(",", "")), "1": int(ones.replace(",", ""))}


def test_audit_real_data(real_dir):
    report = audit(load_splits(DataArguments(data_dir=str(real_dir))))
    assert {s: v["rows"] for s, v in report["splits"].items()} == {"train": 9600, "validation": 1200, "test": 1200}
    assert report["splits"]["train"]["duplicates"] == 1351
    assert report["overlap"] == {"test_in_train": 331, "dev_in_train": 338}
    assert report["conflicting_labels"] == 40


def test_real_test_line_419_padded_label(real_dir, caplog):
    line = (real_dir / "test.tsv").read_text(encoding="utf-8").split("\n")[418]
    assert line.startswith("    0\t")
    with caplog.at_level("WARNING", logger="sft.data"):
        examples, _ = read_examples(real_dir / "test.tsv")
    assert "1 label(s) with surrounding whitespace" in caplog.text and "419 '    0'" in caplog.text  # reported
    assert examples[417] == {"text": line.split("\t", 1)[1], "label": 0}  # line 1 is the header


# ----------------------------------------------------------------------------- CLI and config


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft.data", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_audit_writes_json(tmp_path):
    out = tmp_path / "audit.json"
    result = _cli("audit", "--data_dir", str(SAMPLE), "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "conflicting" in result.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report == {**audit(load_splits(DataArguments(data_dir=str(SAMPLE)))), "rejected_rows": 0}
    for split in ("train", "validation", "test"):
        assert {"rows", "labels", "duplicates", "chars"} <= set(report["splits"][split])
    assert set(report) >= {"splits", "overlap", "conflicting_labels", "conflicting_examples"}
    assert set(report["overlap"]) == {"test_in_train", "dev_in_train"}


def test_cli_bad_path_exits_2_with_one_line():
    result = _cli("audit", "--data_dir", "no/such/dir")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "no/such/dir" in result.stderr and "Traceback" not in result.stderr


def test_data_arguments_fit_the_trl_parser():
    from transformers import HfArgumentParser, TrainingArguments
    from trl import ModelConfig, SFTConfig

    ours = {f.name for f in dataclasses.fields(DataArguments)}
    for other in (TrainingArguments, SFTConfig, ModelConfig):
        assert not ours & {f.name for f in dataclasses.fields(other)}, other.__name__
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--data_dir", "d", "--raw_label_names", "neg", "pos", "--on_bad_rows", "skip", "--max_train_samples", "8"])
    assert (args.raw_label_names, args.on_bad_rows, args.max_train_samples) == (["neg", "pos"], "skip", 8)
    with pytest.raises(SystemExit):
        HfArgumentParser(DataArguments).parse_args_into_dataclasses(["--on_bad_rows", "ignore"])
