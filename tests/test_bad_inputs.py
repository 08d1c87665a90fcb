"""Bad inputs, one table: every broken data file, recipe, model, adapter and checkpoint the project must refuse (or
accept), with its exact outcome.

Each `Case` says what the input is (files written into a fresh directory, `{tmp}`, plus arguments), which entry point
gets it (`via`) and what must happen: a `DataError` / one `error: ...` line on stderr naming the file (and the line,
key or value) with exit code 2, or, for inputs that are valid, exactly the rows loaded. Command-line cases also check
that nothing was written (no output directory, nothing in the working directory) and that no model weights were
loaded. A case that shows a bug is marked `bug="BUG: ..."` and runs as a strict xfail.

`docs/reliability.md` renders this table (`python tests/make_reliability_doc.py`); a test keeps it in sync.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
BROKEN, SAMPLE = REPO / "tests" / "data" / "broken", REPO / "tests" / "data" / "sample"
LABELS = "(expected one of 0/1, 负面/正面, negative/positive, neg/pos)"
ANY = "…"  # in an expected message: any text

# The three good rows of the shipped broken files (tests/make_sample_data.py GOOD).
G1, G2, G3 = (1, "房间很干净，服务很热情。"), (0, "屏幕有坏点，非常失望。"), (1, "内容很精彩，值得一读。")

# Entry points. Subprocesses are slow (~8 s of imports each), so only a representative few run as real commands.
SUBPROCESS = {"python sft/train.py": "sft/train.py", "python eval/predict.py": "eval/predict.py",
              "python eval/evaluate.py": "eval/evaluate.py"}
IN_PROCESS_CLI = ("sft.train.main", "eval.predict.main", "eval.evaluate.main")
FUNCTIONS = ("read_examples", "load_splits")
KINDS = {"data": "Data files", "recipe": "Recipes", "model": "Models, adapters and checkpoints"}

# {placeholder} -> (fixture that provides it, how docs/reliability.md shows it)
PLACES = {
    "broken": (None, "tests/data/broken"),
    "sample": (None, "tests/data/sample"),
    "demo": (None, "recipes/demo.yaml"),
    "labels": (None, LABELS),
    "tmp": (None, "<tmp>"),
    "tiny": ("tiny_model_dir", "<tiny>"),
    "narrow": ("narrow_base", "<tiny-hidden32>"),
    "bigvocab": ("bigvocab_base", "<tiny-vocab151700>"),
    "adapter": ("adapter_dir", "<adapter>"),
    "checkpoint": ("trained_checkpoint", "<checkpoint>"),
}
PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACES) + r")\}")


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # data | recipe | model
    input: str  # what is wrong (or unusual) about the input, in words
    via: str  # entry point: a function, an in-process main() or a real command
    args: tuple[str, ...] = ()  # the file (functions) or the command-line arguments, with {placeholders}
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under {tmp} before the run
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of read_examples / load_splits
    error: str | None = None  # the one-line message ("…" = any text); None: the input is valid
    exit: int = 2
    examples: Any = None  # valid input: [(label, text)] (read_examples) or {split: [(label, text)]} (load_splits)
    rejects: tuple[tuple[str, int, str, str], ...] = ()  # skip mode: (file, line, reason, raw) written, in order
    setup: str | None = None  # extra builder in SETUPS
    loads_model: bool = False  # model weights may load before the error (never, for an early check)
    bug: str | None = None  # "BUG: ..." -> strict xfail

    @property
    def is_cli(self) -> bool:
        return self.via in SUBPROCESS or self.via in IN_PROCESS_CLI

    def outcome(self) -> str:
        """The expected outcome in words (the docs/reliability.md column)."""
        if self.error is not None:
            return (f"exit {self.exit}, `error: {self.error}`" if self.is_cli else f"`DataError: {self.error}`")
        if isinstance(self.examples, dict):
            sizes = ", ".join(f"{split} {len(rows)}" for split, rows in self.examples.items())
            return (f"loads {sizes} rows; {len(self.rejects)} rejected rows written to the rejects file (file, line, "
                    f"reason, raw) and counted in `load_report` and the log")
        rows = len(self.examples)
        return f"loads {rows} row{'' if rows == 1 else 's'}, labels {[label for label, _ in self.examples]}"


def cmd(*extra: str) -> tuple[str, ...]:
    """train.py arguments: the demo recipe on the tiny model, writing to {tmp}/out, plus `extra` overrides."""
    return ("{demo}", "--model_name_or_path", "{tiny}", "--output_dir", "{tmp}/out", "--data_dir", "{sample}",
            "--max_train_samples", "16", "--max_eval_samples", "16", *extra)


HEADER = "label\ttext_a\n"
TSV3 = HEADER + "".join(f"{y}\t{t}\n" for y, t in (G1, G2, G3))
RECIPE = "model_name_or_path: {tiny}\n"
RECIPE_ARGS = ("{tmp}/recipe.yaml", "--output_dir", "{tmp}/out", "--data_dir", "{sample}", "--max_train_samples", "16")
NOT_COMPLETE = "not a complete checkpoint (no trainer_state.json); pick another or use auto"
EVAL = ("--adapter", "{adapter}", "--data_dir", "{sample}", "--out", "{tmp}/out", "--no_progress")
NO_SNAPSHOT = ("{tmp}/old/checkpoint-1: no run_snapshot.json, so nothing shows it was trained with this recipe's "
               "model, data, template and LoRA shape; pass --allow_unverified_resume true to resume it anyway")
CASES: list[Case] = [
    # ------------------------------------------------------------------------------------------------ data files
    Case("wrong-delimiter", "data", "CSV separated by `;`", "read_examples", ("{broken}/wrong_delimiter.csv",),
         error="{broken}/wrong_delimiter.csv:1: no label column (expected one of label/labels; found columns: "
               "'label;text') (wrong delimiter?)"),
    Case("missing-label-column", "data", "TSV header without a label column", "read_examples",
         ("{broken}/missing_label_column.tsv",),
         error="{broken}/missing_label_column.tsv:1: no label column (expected one of label/labels; found columns: "
               "'sentiment', 'text_a')"),
    Case("missing-text-column", "data", "TSV header without a text column", "read_examples",
         ("{broken}/missing_text_column.tsv",),
         error="{broken}/missing_text_column.tsv:1: no text column (expected one of text/text_a/review/sentence; "
               "found columns: 'label', 'comment')"),
    Case("missing-label-key-jsonl", "data", "JSONL object without a label key", "read_examples", ("{tmp}/t.jsonl",),
         files={"t.jsonl": '{"text": "好"}\n'},
         error="{tmp}/t.jsonl:1: no label key (expected one of label/labels; found keys: 'text')"),
    Case("extra-fields-tsv", "data", "TSV row with a third field (stray tab in the review)", "read_examples",
         ("{broken}/extra_fields.tsv",),
         error="{broken}/extra_fields.tsv:3: expected 2 fields (label, text_a) but found 3 (stray tab in the text?): "
               "'0\\t屏幕有坏点\\t非常失望。'"),
    Case("extra-fields-csv", "data", "CSV row with an unquoted comma (third field)", "read_examples", ("{tmp}/t.csv",),
         files={"t.csv": "label,text\n1,好\n0,差,极了\n"},
         error="{tmp}/t.csv:3: expected 2 fields (label, text) but found 3: '0,差,极了'"),
    Case("extra-keys-jsonl", "data", "JSONL objects with extra keys (`id`, `source`): ignored", "read_examples",
         ("{tmp}/t.jsonl",), files={"t.jsonl": '{"id": 7, "text": "好", "label": 1, "source": "web"}\n'},
         examples=[(1, "好")]),
    Case("label-2", "data", "label `2` in a binary task", "read_examples", ("{broken}/unknown_label_2.tsv",),
         error="{broken}/unknown_label_2.tsv:4: column 'label': unknown label '2' {labels}"),
    Case("label-unknown-word", "data", "label `good` (not a known spelling)", "read_examples",
         ("{broken}/unknown_label_pos_word.tsv",),
         error="{broken}/unknown_label_pos_word.tsv:2: column 'label': unknown label 'good' {labels}"),
    Case("label-empty", "data", "empty label field", "read_examples", ("{broken}/empty_label.tsv",),
         error="{broken}/empty_label.tsv:3: column 'label': unknown label '' {labels}"),
    Case("label-bool-jsonl", "data", "JSON label `true`", "read_examples", ("{tmp}/t.jsonl",),
         files={"t.jsonl": '{"text": "好", "label": 1}\n{"text": "差", "label": true}\n'},
         error="{tmp}/t.jsonl:2: column 'label': unknown label True {labels}"),
    Case("label-fraction-jsonl", "data", "JSON label `0.5`", "read_examples", ("{tmp}/t.jsonl",),
         files={"t.jsonl": '{"text": "好", "label": 1.0}\n{"text": "差", "label": 0.5}\n'},
         error="{tmp}/t.jsonl:2: column 'label': unknown label 0.5 {labels}"),
    Case("label-outside-raw-label-names", "data", "label `正面` when `raw_label_names: [neg, pos]`", "read_examples",
         ("{tmp}/t.tsv",), files={"t.tsv": HEADER + "pos\t好\n正面\t好\n"}, options={"label_names": ["neg", "pos"]},
         error="{tmp}/t.tsv:3: column 'label': unknown label '正面' (expected one of 0/1, neg/pos)"),
    Case("label-padded", "data", "label `    0` (whitespace-padded, as in ChnSentiCorp test.tsv:419): valid",
         "read_examples", ("{broken}/padded_label.tsv",), examples=[G1, (0, "隔音很差，非常失望。"), G3]),
    Case("label-padded-jsonl", "data", "JSON label `\" 1 \"`: valid", "read_examples", ("{tmp}/t.jsonl",),
         files={"t.jsonl": '{"text": "好", "label": " 1 "}\n{"text": "差", "label": "负面"}\n'},
         examples=[(1, "好"), (0, "差")]),
    Case("text-empty", "data", "empty review", "read_examples", ("{broken}/empty_text.tsv",),
         error="{broken}/empty_text.tsv:2: column 'text_a': empty text"),
    Case("text-whitespace", "data", "review of spaces and an ideographic space only", "read_examples",
         ("{broken}/whitespace_text.tsv",),
         error="{broken}/whitespace_text.tsv:4: column 'text_a': whitespace-only text '  \\u3000 '"),
    Case("text-not-a-string", "data", "JSON text `5`", "read_examples", ("{tmp}/t.jsonl",),
         files={"t.jsonl": '{"text": 5, "label": 1}\n'},
         error="{tmp}/t.jsonl:1: column 'text': text must be a string, got 5"),
    Case("bom", "data", "UTF-8 byte-order mark: valid", "read_examples", ("{broken}/bom.tsv",), examples=[G1, G2, G3]),
    Case("bom-jsonl", "data", "UTF-8 byte-order mark in JSONL: valid", "read_examples", ("{tmp}/t.jsonl",),
         files={"t.jsonl": b"\xef\xbb\xbf" + '{"text": "好", "label": 1}\n'.encode()}, examples=[(1, "好")]),
    Case("crlf", "data", "CRLF line endings: valid", "read_examples", ("{broken}/crlf.tsv",), examples=[G1, G2, G3]),
    Case("crlf-jsonl", "data", "CRLF line endings in JSONL: valid", "read_examples", ("{tmp}/t.jsonl",),
         files={"t.jsonl": '{"text": "好", "label": 1}\r\n{"text": "差", "label": 0}\r\n'},
         examples=[(1, "好"), (0, "差")]),
    Case("non-utf8", "data", "a GBK-encoded row", "read_examples", ("{broken}/non_utf8.tsv",),
         error="{broken}/non_utf8.tsv:3: not valid UTF-8 (byte 0xb7 at byte offset 54); re-save the file as UTF-8"),
    Case("utf16", "data", "file saved as UTF-16 (Windows \"Unicode\")", "read_examples", ("{tmp}/t.tsv",),
         files={"t.tsv": TSV3.encode("utf-16")},
         error="{tmp}/t.tsv:1: not valid UTF-8 (byte 0xff at byte offset 0); re-save the file as UTF-8"),
    Case("truncated-last-line", "data", "TSV cut off in the last row (`1`, no tab)", "read_examples",
         ("{broken}/truncated_last_line.tsv",),
         error="{broken}/truncated_last_line.tsv:4: expected 2 fields (label, text_a) but found 1: '1'"),
    Case("truncated-last-line-jsonl", "data", "JSONL cut off inside the last object", "read_examples",
         ("{tmp}/t.jsonl",), files={"t.jsonl": '{"text": "好", "label": 1}\n{"text": "差", "lab'},
         error="{tmp}/t.jsonl:2: malformed JSON (…column 15): '{\"text\": \"差\", \"lab'"),
    Case("truncated-last-line-csv", "data", "CSV cut off inside a quoted last field (`0,\"差`)", "read_examples",
         ("{tmp}/t.csv",), files={"t.csv": 'label,text\n1,好\n0,"差'},
         error="{tmp}/t.csv:3: malformed CSV (…)"),
    Case("unclosed-quote-csv", "data", "CSV with an unclosed quote on line 2 of 4", "read_examples", ("{tmp}/t.csv",),
         files={"t.csv": 'label,text\n1,"好\n0,差\n1,不错\n'}, error="{tmp}/t.csv:2: malformed CSV (…)"),
    Case("malformed-jsonl", "data", "JSONL line with a missing `}`", "read_examples", ("{broken}/bad_json.jsonl",),
         error="{broken}/bad_json.jsonl:2: malformed JSON (Expecting ',' delimiter at column 28): "
               "'{\"text\": \"房间很脏\", \"label\": 0'"),
    Case("json-array-non-object", "data", "JSON array with a number among the objects", "read_examples",
         ("{tmp}/t.json",), files={"t.json": '[\n  {"text": "好", "label": 1},\n  3\n]\n'},
         error="{tmp}/t.json:3: expected a JSON object, got int: '3'"),
    Case("empty-file", "data", "0-byte file", "read_examples", ("{broken}/empty.tsv",),
         error="{broken}/empty.tsv: file is empty (0 bytes)"),
    Case("whitespace-file", "data", "file of blank lines", "read_examples", ("{tmp}/t.tsv",),
         files={"t.tsv": "\n \n\t\n"}, error="{tmp}/t.tsv: file is empty (only whitespace)"),
    Case("header-only", "data", "header and no rows", "read_examples", ("{tmp}/t.tsv",), files={"t.tsv": HEADER},
         error="{tmp}/t.tsv: no data rows"),
    Case("unknown-extension", "data", "`.xml` file", "read_examples", ("{broken}/unknown.xml",),
         error="{broken}/unknown.xml: unsupported file extension '.xml' (supported: .tsv, .csv, .jsonl, .json, "
               ".parquet)"),
    Case("missing-file", "data", "path that does not exist", "read_examples", ("{tmp}/nope.tsv",),
         error="{tmp}/nope.tsv: no such file"),
    Case("dir-without-test-split", "data", "data_dir with train and dev only, test requested", "load_splits",
         options={"data_dir": "{broken}/no_test_split"},
         error="data_dir '{broken}/no_test_split' has no test split (looked for test.*; found: dev.tsv, train.tsv)"),
    Case("dir-unknown-extension", "data", "data_dir whose train file is `train.txt`", "load_splits",
         files={"d/train.txt": "1\t好\n"}, options={"data_dir": "{tmp}/d", "splits": ["train"]},
         error="data_dir '{tmp}/d' has no train split (looked for train.*; found: train.txt)"),
    Case("dir-two-train-files", "data", "data_dir with both train.tsv and train.csv", "load_splits",
         files={"d/train.tsv": TSV3, "d/train.csv": "label,text\n1,好\n"},
         options={"data_dir": "{tmp}/d", "splits": ["train"]},
         error="{tmp}/d: more than one train file (train.tsv, train.csv); keep one"),
    Case("skip-writes-rejects", "data", "`on_bad_rows: skip` over three files with one bad row each", "load_splits",
         options={"train_file": "{broken}/unknown_label_2.tsv", "validation_file": "{broken}/empty_label.tsv",
                  "test_file": "{broken}/truncated_last_line.tsv", "on_bad_rows": "skip",
                  "rejects_path": "{tmp}/rejects/rejected_rows.jsonl"},
         examples={"train": [G1, G2], "validation": [G1, G3], "test": [G1, G2]},
         rejects=(("{broken}/unknown_label_2.tsv", 4, "column 'label': unknown label '2' {labels}",
                   "2\t中规中矩的一本书。"),
                  ("{broken}/empty_label.tsv", 3, "column 'label': unknown label '' {labels}", "\t还可以吧。"),
                  ("{broken}/truncated_last_line.tsv", 4, "expected 2 fields (label, text_a) but found 1: '1'", "1"))),
    Case("skip-all-rows-bad", "data", "`on_bad_rows: skip` and every row is bad", "read_examples", ("{tmp}/t.tsv",),
         files={"t.tsv": HEADER + "2\t好\n3\t差\n"}, options={"on_bad_rows": "skip"},
         error="{tmp}/t.tsv: all 2 rows were rejected"),
    # the same data errors through the training script: exit 2, one line, before the model and before any write
    Case("train-label-2", "data", "train_file with label `2`", "python sft/train.py",
         cmd("--train_file", "{broken}/unknown_label_2.tsv"),
         error="{broken}/unknown_label_2.tsv:4: column 'label': unknown label '2' {labels}"),
    Case("train-non-utf8", "data", "train_file with a GBK row", "python sft/train.py",
         cmd("--train_file", "{broken}/non_utf8.tsv"),
         error="{broken}/non_utf8.tsv:3: not valid UTF-8 (byte 0xb7 at byte offset 54); re-save the file as UTF-8"),
    Case("train-wrong-delimiter", "data", "train_file separated by `;`", "sft.train.main",
         cmd("--train_file", "{broken}/wrong_delimiter.csv"),
         error="{broken}/wrong_delimiter.csv:1: no label column (expected one of label/labels; found columns: "
               "'label;text') (wrong delimiter?)"),
    Case("train-empty-text-in-dev", "data", "validation_file with an empty review", "sft.train.main",
         cmd("--validation_file", "{broken}/empty_text.tsv"),
         error="{broken}/empty_text.tsv:2: column 'text_a': empty text"),
    Case("train-dir-without-dev-split", "data", "data_dir without dev/validation (training evaluates on dev)",
         "sft.train.main", cmd("--data_dir", "{tmp}/d"), files={"d/train.tsv": TSV3, "d/test.tsv": TSV3},
         error="data_dir '{tmp}/d' has no validation split (looked for dev.*/validation.*; found: test.tsv, "
               "train.tsv)"),
    Case("train-missing-data-dir", "data", "data_dir that does not exist", "sft.train.main",
         cmd("--data_dir", "{tmp}/nope"), error="data_dir '{tmp}/nope' does not exist or is not a directory"),
    Case("train-skip-then-early-failure", "data",
         "`on_bad_rows: skip` with a bad row, then a later early check fails (checkpoint without its snapshot)",
         "sft.train.main",
         cmd("--on_bad_rows", "skip", "--train_file", "{broken}/unknown_label_2.tsv",
             "--resume_from_checkpoint", "{tmp}/old/checkpoint-1", "--eval_strategy", "no"),
         setup="checkpoint_without_snapshot", error=NO_SNAPSHOT),
    Case("evaluate-dir-without-test-split", "data", "evaluate --data_dir without a test file", "eval.evaluate.main",
         ("--adapter", "{adapter}", "--data_dir", "{broken}/no_test_split", "--out", "{tmp}/out", "--no_progress"),
         error="data_dir '{broken}/no_test_split' has no test split (looked for test.*; found: dev.tsv, train.tsv)"),
    Case("evaluate-eval-set-without-name", "data", "`--eval_set PATH` without `NAME=`", "eval.evaluate.main",
         (*EVAL, "--eval_set", "{sample}/dev.tsv"),
         error="--eval_set: expected NAME=PATH with NAME made of letters, digits, _ and -, got '{sample}/dev.tsv'"),
    Case("evaluate-eval-set-name-twice", "data", "`--eval_set test=...`: the name of the split", "eval.evaluate.main",
         (*EVAL, "--eval_set", "test={sample}/dev.tsv"),
         error="--eval_set: the name 'test' is used twice (the split is named 'test')"),
    Case("evaluate-eval-set-missing-file", "data", "--eval_set file that does not exist", "eval.evaluate.main",
         (*EVAL, "--eval_set", "mine={tmp}/nope.csv"), error="{tmp}/nope.csv: no such file"),
    Case("evaluate-eval-set-bad-label", "data", "--eval_set CSV `label,review` with an unknown label",
         "eval.evaluate.main", (*EVAL, "--eval_set", "mine={tmp}/mine.csv"),
         files={"mine.csv": "label,review\npositive,房间很干净\nmaybe,一般般\n"},
         error="{tmp}/mine.csv:3: column 'label': unknown label 'maybe' {labels}"),
    Case("evaluate-calibrate-without-dev", "data", "--calibrate on data without a dev split", "eval.evaluate.main",
         ("--adapter", "{adapter}", "--data_dir", "{tmp}/d", "--calibrate", "--out", "{tmp}/out", "--no_progress"),
         files={"d/train.tsv": TSV3, "d/test.tsv": TSV3},
         error="--calibrate fits the temperature on the validation (dev) split, and the data has none (found: test, "
               "train); pass --validation_file or --data_dir"),
    # ------------------------------------------------------------------------------------------------ recipes
    Case("recipe-unknown-key", "recipe", "misspelt key `learning_rat`", "python sft/train.py",
         RECIPE_ARGS, files={"recipe.yaml": RECIPE + "learning_rat: 1.0e-4\n"},
         error="{tmp}/recipe.yaml: unknown key 'learning_rat'; did you mean learning_rate?"),
    Case("recipe-wrong-type", "recipe", "`lora_r: sixteen`", "python sft/train.py",
         RECIPE_ARGS, files={"recipe.yaml": RECIPE + "lora_r: sixteen\n"},
         error="{tmp}/recipe.yaml: key 'lora_r': invalid value 'sixteen'"),
    Case("recipe-yaml-syntax", "recipe", "YAML syntax error on line 3", "python sft/train.py",
         RECIPE_ARGS,
         files={"recipe.yaml": RECIPE + "learning_rate: 1.0e-4\n  lora_r: 8\n"},
         error="{tmp}/recipe.yaml:3:9: YAML syntax error: mapping values are not allowed here"),
    Case("recipe-missing-file", "recipe", "recipe path that does not exist", "python sft/train.py",
         ("{tmp}/nope.yaml", "--output_dir", "{tmp}/out"), error="{tmp}/nope.yaml: recipe file not found"),
    Case("recipe-list-value", "recipe", "`num_train_epochs: [1, 2]`", "sft.train.main",
         RECIPE_ARGS,
         files={"recipe.yaml": RECIPE + "num_train_epochs: [1, 2]\n"},
         error="{tmp}/recipe.yaml: key 'num_train_epochs': expected a single value, got [1, 2]"),
    Case("recipe-bad-choice", "recipe", "`on_bad_rows: ignore`", "sft.train.main",
         RECIPE_ARGS, files={"recipe.yaml": RECIPE + "on_bad_rows: ignore\n"},
         error="{tmp}/recipe.yaml: key 'on_bad_rows': 'ignore' is not one of ['error', 'skip']"),
    Case("recipe-bool-type", "recipe", "`bf16: 3`", "sft.train.main",
         RECIPE_ARGS, files={"recipe.yaml": RECIPE + "bf16: 3\n"},
         error="{tmp}/recipe.yaml: key 'bf16': expected true/false, got 3"),
    Case("recipe-not-a-mapping", "recipe", "recipe that is a YAML list", "sft.train.main",
         RECIPE_ARGS, files={"recipe.yaml": "- lora_r: 8\n- bf16: true\n"},
         error="{tmp}/recipe.yaml: a recipe must be a mapping of key: value, got list"),
    Case("recipe-duplicate-key", "recipe", "`learning_rate` twice (the first one silently ignored)", "sft.train.main",
         RECIPE_ARGS,
         files={"recipe.yaml": RECIPE + "learning_rate: 1.0e-4\nlearning_rate: 1.0e-3\n"},
         error="{tmp}/recipe.yaml:3…duplicate key 'learning_rate'…"),
    Case("recipe-duplicate-verbalizers", "recipe", "`verbalizers: [好, 好]`", "sft.train.main",
         RECIPE_ARGS,
         files={"recipe.yaml": RECIPE + "verbalizers: [好, 好]\n"},
         error="{tmp}/recipe.yaml: …verbalizers must be distinct non-empty words, got ['好', '好']"),
    Case("cli-unknown-key", "recipe", "override `--lora_rank 8`", "sft.train.main", cmd("--lora_rank", "8"),
         error="command line: unknown key 'lora_rank'; did you mean …lora_r…?"),
    # ------------------------------------------------------------------------------------------------ models
    Case("model-missing-path", "model", "model_name_or_path that does not exist", "sft.train.main",
         ("{demo}", "--model_name_or_path", "{tmp}/no_such_model", "--output_dir", "{tmp}/out",
          "--data_dir", "{sample}"),
         error="{tmp}/no_such_model: model path does not exist"),
    Case("model-missing-relative-path", "model",
         "relative model_name_or_path that does not exist (also a valid-looking hub id)", "sft.train.main",
         ("{demo}", "--model_name_or_path", "no_such_dir/tiny-model", "--output_dir", "{tmp}/out",
          "--data_dir", "{sample}"),
         error="no_such_dir/tiny-model: no such local directory, and the hub could not provide it (…)"),
    Case("model-half-downloaded", "model", "model directory holding only config.json (interrupted download)",
         "sft.train.main",
         ("{demo}", "--model_name_or_path", "{tmp}/half", "--output_dir", "{tmp}/out", "--data_dir", "{sample}"),
         setup="half_download", error="{tmp}/half: …"),
    Case("adapter-missing-predict", "model", "--lora_path that does not exist", "python eval/predict.py",
         ("--lora_path", "{tmp}/no_adapter", "--text", "房间很干净"),
         error="{tmp}/no_adapter: adapter directory does not exist"),
    Case("adapter-missing-evaluate", "model", "--adapter that does not exist", "python eval/evaluate.py",
         ("--adapter", "{tmp}/no_adapter", "--out", "{tmp}/out"),
         error="{tmp}/no_adapter: adapter directory does not exist"),
    Case("adapter-is-a-checkpoint", "model", "--adapter pointing at a checkpoint-N directory (no run_info.json)",
         "eval.evaluate.main", ("--adapter", "{tmp}/run/checkpoint-4", "--out", "{tmp}/out", "--no_progress"),
         files={"run/checkpoint-4/adapter_config.json": "{}", "run/checkpoint-4/trainer_state.json": "{}"},
         error="{tmp}/run/checkpoint-4/run_info.json: missing; {tmp}/run/checkpoint-4 is not an output directory "
               "of sft/train.py"),
    Case("adapter-other-hidden-size-predict", "model", "adapter applied to a base with hidden_size 32 (trained: 64)",
         "eval.predict.main", ("--lora_path", "{adapter}", "--base_model_name", "{narrow}", "--text", "房间很干净"),
         error="{adapter}: adapter was trained on '{tiny}', which does not match --base '{narrow}' "
               "(hidden_size: adapter 64 vs base 32)"),
    Case("adapter-other-hidden-size-evaluate", "model", "adapter evaluated on a base with hidden_size 32",
         "eval.evaluate.main",
         ("--adapter", "{adapter}", "--base", "{narrow}", "--data_dir", "{sample}", "--out", "{tmp}/out",
          "--no_progress"),
         error="{adapter}: adapter was trained on '{tiny}', which does not match --base '{narrow}' "
               "(hidden_size: adapter 64 vs base 32)"),
    Case("adapter-other-vocab-predict", "model", "adapter applied to a base with vocab_size 151700 (trained: 151936)",
         "eval.predict.main", ("--lora_path", "{adapter}", "--base_model_name", "{bigvocab}", "--text", "房间很干净"),
         error="{adapter}: adapter was trained on '{tiny}', which does not match --base '{bigvocab}' "
               "(vocab_size: adapter 151936 vs base 151700)"),
    Case("adapter-without-signature-other-base", "model",
         "adapter whose run_info.json has no base_signature, applied to a base with hidden_size 32",
         "eval.predict.main", ("--lora_path", "{tmp}/old_adapter", "--base_model_name", "{narrow}", "--text", "好"),
         setup="adapter_without_signature", error="{tmp}/old_adapter: …{narrow}…", loads_model=True),
    Case("checkpoint-without-trainer-state", "model", "--resume_from_checkpoint DIR without trainer_state.json",
         "sft.train.main", cmd("--resume_from_checkpoint", "{tmp}/run/checkpoint-4"),
         files={"run/checkpoint-4/adapter_config.json": "{}", "run/checkpoint-4/adapter_model.safetensors": b""},
         error="{tmp}/run/checkpoint-4: " + NOT_COMPLETE),
    Case("checkpoint-missing", "model", "--resume_from_checkpoint DIR that does not exist", "sft.train.main",
         cmd("--resume_from_checkpoint", "{tmp}/run/checkpoint-8"),
         error="{tmp}/run/checkpoint-8: checkpoint to resume from does not exist"),
    Case("checkpoint-without-snapshot", "model",
         "--resume_from_checkpoint DIR: a real checkpoint whose run_snapshot.json was deleted (nothing to check)",
         "sft.train.main", cmd("--resume_from_checkpoint", "{tmp}/old/checkpoint-1", "--eval_strategy", "no"),
         setup="checkpoint_without_snapshot", error=NO_SNAPSHOT),
    Case("checkpoint-of-other-data", "model",
         "--resume_from_checkpoint of a run trained on other rows (same count: only the train fingerprint differs)",
         "sft.train.main",
         cmd("--resume_from_checkpoint", "{checkpoint}", "--train_file", "{sample}/test.tsv", "--eval_strategy", "no"),
         error="{checkpoint}: recipe differs from the checkpoint's run (train_fingerprint: checkpoint '…' vs recipe "
               "'…')"),
    Case("checkpoint-other-lora-shape", "model", "--resume_from_checkpoint of a run trained with lora_r 16, now 8",
         "sft.train.main", cmd("--resume_from_checkpoint", "{checkpoint}", "--lora_r", "8", "--eval_strategy", "no"),
         error="{checkpoint}: recipe differs from the checkpoint's run (lora_r: checkpoint 16 vs recipe 8)"),
    Case("output-dir-is-a-file", "model", "--output_dir naming an existing file", "sft.train.main",
         ("{demo}", "--model_name_or_path", "{tiny}", "--output_dir", "{tmp}/out.txt", "--data_dir", "{sample}"),
         files={"out.txt": "x"},
         error="{tmp}/out.txt: output_dir is not writable ({tmp}/out.txt is not a writable directory)"),
]


# ----------------------------------------------------------------------------------------------- inputs


def _adapter_without_signature(ctx: Context) -> None:
    shutil.copytree(ctx.get("adapter"), ctx.tmp / "old_adapter")
    info_path = ctx.tmp / "old_adapter" / "run_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    del info["base_signature"]
    info_path.write_text(json.dumps(info), encoding="utf-8")


def _half_download(ctx: Context) -> None:
    (ctx.tmp / "half").mkdir()
    shutil.copy(Path(ctx.get("tiny")) / "config.json", ctx.tmp / "half" / "config.json")


def _checkpoint_without_snapshot(ctx: Context) -> None:
    shutil.copytree(ctx.get("checkpoint"), ctx.tmp / "old" / "checkpoint-1")
    (ctx.tmp / "old" / "checkpoint-1" / "run_snapshot.json").unlink()


SETUPS = {"adapter_without_signature": _adapter_without_signature, "half_download": _half_download,
          "checkpoint_without_snapshot": _checkpoint_without_snapshot}


class Context:
    """Resolves {placeholders} (model fixtures only when a case needs them) and writes a case's files into {tmp}."""

    def __init__(self, case: Case, tmp: Path, getfixture):
        self.case, self.tmp, self._getfixture = case, tmp, getfixture
        (tmp / "cwd").mkdir(parents=True, exist_ok=True)  # the working directory of the run: must stay empty

    def get(self, name: str) -> str:
        fixture = PLACES[name][0]
        if fixture is not None:
            return str(self._getfixture(fixture))
        return {"broken": str(BROKEN), "sample": str(SAMPLE), "demo": str(REPO / "recipes" / "demo.yaml"),
                "labels": LABELS, "tmp": str(self.tmp)}[name]

    def fmt(self, text: str) -> str:
        return PLACEHOLDER.sub(lambda m: self.get(m.group(1)), text)

    def prepare(self) -> None:
        for name, content in self.case.files.items():
            path = self.tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(self.fmt(content), encoding="utf-8")
        if self.case.setup:
            SETUPS[self.case.setup](self)


def cli_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_command(argv: list[str], cwd: Path) -> tuple[int, str]:
    result = subprocess.run(argv, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def needs_fixture(case: Case) -> bool:
    """Whether building the case's inputs needs a model fixture (the tiny model, an adapter...)."""
    texts = [*case.args, *(c for c in case.files.values() if isinstance(c, str))]
    return bool(case.setup) or any(PLACES[name][0] for t in texts for name in PLACEHOLDER.findall(t))


def matches(actual: str, expected: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in expected.split(ANY))
    return re.fullmatch(pattern, actual, flags=re.DOTALL) is not None


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def narrow_base(tmp_path_factory) -> Path:
    """A second tiny Qwen2, hidden size 32: an adapter trained on the 64-wide tiny model does not fit it."""
    from sft.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("narrow_base"), hidden_size=32)


@pytest.fixture(scope="module")
def bigvocab_base(tmp_path_factory) -> Path:
    """Same architecture, another vocabulary size (151700 rows instead of Qwen2.5's padded 151936)."""
    from sft.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bigvocab_base"), vocab_size=151700)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory, lora_adapter) -> Path:
    """A LoRA adapter trained on the tiny model (hidden size 64, vocabulary 151936)."""
    return lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "run")


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """checkpoint-1 of a real two-step run (one step would end with the warmup's zero learning rate and an adapter
    the final check refuses) of the table's train.py arguments (`cmd()`): its run_snapshot.json is what a resume
    with those arguments expects, so a case that changes one of them differs in one field."""
    from sft.config import parse_recipe
    from sft.run import train

    out = tmp_path_factory.mktemp("trained") / "run"
    fixed = {"{demo}": str(REPO / "recipes" / "demo.yaml"), "{tiny}": str(tiny_model_dir), "{sample}": str(SAMPLE),
             "{tmp}/out": str(out)}
    train(parse_recipe([fixed.get(a, a) for a in cmd("--max_steps", "2", "--save_steps", "1", "--eval_strategy", "no",
                                                     "--do_predict", "false")]))
    return out / "checkpoint-1"


@pytest.fixture(scope="module")
def background_commands(request, tmp_path_factory):
    """Start the selected subprocess cases now, one at a time in a background thread, so their ~8 s of imports
    each overlap with the in-process cases; a test then only collects its result."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "path", None) == Path(__file__) and getattr(item, "originalname", None) ==
                "test_bad_input" and hasattr(item, "callspec")}
    cases = [c for c in CASES if c.via in SUBPROCESS and c.id in selected]
    pool = ThreadPoolExecutor(max_workers=1)
    runs: dict[str, tuple[Future, Context]] = {}
    for case in sorted(cases, key=needs_fixture):  # these start while the tiny model is being built
        ctx = Context(case, tmp_path_factory.mktemp(case.id), request.getfixturevalue)
        ctx.prepare()  # inputs and fixtures are built here, in the main thread
        guard = [] if case.loads_model else [str(REPO / "tests" / "model_guard.py")]  # exit 97 if a model loads
        argv = [sys.executable, *guard, str(REPO / SUBPROCESS[case.via]), *map(ctx.fmt, case.args)]
        runs[case.id] = (pool.submit(run_command, argv, ctx.tmp / "cwd"), ctx)
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Early checks must fail before any weights load: loading one fails the case (tests/model_guard.py, the guard
    the real commands run under too)."""
    from model_guard import forbid_model_loads

    def fail(message: str) -> None:
        raise AssertionError(f"model_guard: {message}")

    forbid_model_loads(monkeypatch.setattr, fail)


# ----------------------------------------------------------------------------------------------- the table


def run_in_process(case: Case, ctx: Context, argv: list[str], capsys) -> tuple[int, str]:
    """Call the command's main(argv) like the command line would; any exception is a traceback for the user."""
    from eval.evaluate import main as evaluate_main
    from eval.predict import main as predict_main
    from sft.train import main as train_main

    entry = {"sft.train.main": train_main, "eval.predict.main": predict_main, "eval.evaluate.main": evaluate_main}
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(ctx.tmp / "cwd")
    try:
        code = entry[case.via](argv)
    except (Exception, SystemExit) as e:  # SystemExit from argparse counts as a failure too
        pytest.fail(f"{case.via} raised {type(e).__name__} instead of printing one error line: {e}")
    finally:
        os.chdir(cwd)
    return code, capsys.readouterr().err


def check_command(case: Case, ctx: Context, code: int, stderr: str) -> None:
    assert "model_guard:" not in stderr, stderr[-3000:]  # a model loaded before the error (the guard's exit 97)
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one final error line:\n{stderr[-3000:]}"
    expected = "error: " + ctx.fmt(case.error)
    assert matches(errors[0], expected), f"\n  got      {errors[0]}\n  expected {expected}"
    assert code == case.exit
    assert not (ctx.tmp / "out").exists(), "the failed run created its output directory"
    assert list((ctx.tmp / "cwd").iterdir()) == [], "the failed run wrote into the working directory"


def check_function(case: Case, ctx: Context, caplog) -> None:
    from sft.data import DataArguments, DataError, load_splits, read_examples

    ctx.prepare()
    options = {k: (ctx.fmt(v) if isinstance(v, str) else v) for k, v in case.options.items()}
    keywords = {k: options.pop(k) for k in ("splits", "rejects_path") if k in options}

    def call():
        if case.via == "read_examples":
            return read_examples(ctx.fmt(case.args[0]), **options)
        return load_splits(DataArguments(**options), **keywords)

    if case.error is not None:
        with pytest.raises(DataError) as info:
            call()
        expected = ctx.fmt(case.error)
        assert matches(str(info.value), expected), f"\n  got      {info.value}\n  expected {expected}"
        return
    with caplog.at_level(logging.WARNING, logger="sft.data"):
        result = call()
    if case.via == "read_examples":
        assert result == ([{"text": t, "label": y} for y, t in case.examples], [])
        return
    assert {split: list(zip(ds["label"], ds["text"], strict=True)) for split, ds in result.items()} == case.examples
    path = Path(keywords["rejects_path"])
    written = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    expected = [{"file": ctx.fmt(f), "line": n, "reason": ctx.fmt(r), "raw": raw} for f, n, r, raw in case.rejects]
    assert written == expected
    assert result.load_report["rejected_rows"] == len(case.rejects) and result.load_report["rejects_file"] == str(path)
    assert f"skipped {len(case.rejects)} bad rows; see {path}" in caplog.text


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
    return pytest.param(case, id=case.id, marks=marks)


# Table order, except that the real commands come last: they run in the background meanwhile.
@pytest.mark.parametrize("case", [_param(c) for c in sorted(CASES, key=lambda c: c.via in SUBPROCESS)])
def test_bad_input(case, request, tmp_path, capsys, caplog, background_commands):
    if case.via in SUBPROCESS:
        future, ctx = background_commands[case.id]
        check_command(case, ctx, *future.result())
    elif case.via in IN_PROCESS_CLI:
        ctx = Context(case, tmp_path, request.getfixturevalue)
        ctx.prepare()
        argv = [ctx.fmt(a) for a in case.args]  # fixtures (which may train or load models) are built before the guard
        if not case.loads_model:
            request.getfixturevalue("no_model_loads")
        check_command(case, ctx, *run_in_process(case, ctx, argv, capsys))
    else:
        check_function(case, Context(case, tmp_path, request.getfixturevalue), caplog)


def test_case_table_is_well_formed():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    subprocesses = [c.id for c in CASES if c.via in SUBPROCESS]
    assert len(subprocesses) <= 8, f"each subprocess costs ~8 s of imports: {subprocesses}"
    for c in CASES:
        assert c.kind in KINDS and (c.via in SUBPROCESS or c.via in IN_PROCESS_CLI or c.via in FUNCTIONS), c.id
        assert (c.error is None) != (c.examples is None), f"{c.id}: give either an error or the examples"
        assert c.bug is None or c.bug.startswith("BUG: "), c.id
        assert c.via != "read_examples" or len(c.args) == 1, c.id
        for text in (*c.args, c.error or "", *map(str, c.files)):
            assert set(re.findall(r"\{(\w+)\}", text)) <= set(PLACES), f"{c.id}: unknown placeholder in {text!r}"


def test_reliability_doc_is_up_to_date():
    """docs/reliability.md shows this table; regenerate it with `python tests/make_reliability_doc.py`."""
    import make_reliability_doc

    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert make_reliability_doc.update(doc, sys.modules[__name__]) == doc, (
        "docs/reliability.md is stale: run python tests/make_reliability_doc.py")


def test_reliability_doc_names_only_existing_tests():
    """Each claim of docs/reliability.md names the test behind it: a renamed or deleted test (or table case) must not
    leave a claim that nothing checks."""
    import ast

    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8").split(make_doc().BEGIN)[0]
    defined = {path.name: {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                           if isinstance(node, ast.FunctionDef)} for path in (REPO / "tests").glob("test_*.py")}
    tests = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)(?=[`\[])", doc)
    missing = [f"{file or 'test_reliability.py'}::{name}" for file, name in tests
               if name not in defined[file or "test_reliability.py"]]
    cases = [case for group in re.findall(r"cases? ((?:`[a-z0-9-]+`(?:,?\s+(?:and\s+)?)?)+)", doc)
             for case in re.findall(r"`([a-z0-9-]+)`", group)]
    missing += [f"case {case}" for case in cases if case not in {c.id for c in CASES}]
    assert len(tests) >= 20 and len(cases) >= 5 and not missing, missing


def make_doc():
    import make_reliability_doc

    return make_reliability_doc
