"""eval/predict.py: the SentimentPredictor API and every CLI mode, plus the one-line errors (exit code 2)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.predict import DEMO_TEXTS, SentimentPredictor
from eval.predict import main as predict_main
from sft.data import read_texts
from sft.model import load_for_inference
from sft.scoring import score_texts

REPO = Path(__file__).resolve().parents[1]
REVIEWS = ["房间很干净，服务也很好", "太难吃了，不会再来", "物流很快"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory, lora_adapter) -> Path:
    return lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "run")


@pytest.fixture(scope="module")
def predictor(adapter_dir) -> SentimentPredictor:
    return SentimentPredictor(lora_path=str(adapter_dir), batch_size=2)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A second tiny model with another hidden size: the adapter does not fit it."""
    from sft.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other_base"), hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=64)


def run_cli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(REPO / "eval" / "predict.py"), *args], input=stdin,
                          capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=300)


def test_api_matches_the_scorer(predictor, adapter_dir):
    one = predictor.predict(REVIEWS[0])
    assert set(one) == {"label", "label_id", "probs"}
    assert one["label"] == ("负面", "正面")[one["label_id"]] and list(one["probs"]) == ["负面", "正面"]
    assert sum(one["probs"].values()) == pytest.approx(1.0)
    batch = predictor.predict_batch(REVIEWS)
    assert batch[0]["probs"] == pytest.approx(one["probs"], abs=1e-6)
    model, tokenizer, template = load_for_inference(str(adapter_dir))
    expected = score_texts(model, tokenizer, template, REVIEWS, progress=False).probs
    np.testing.assert_allclose([[r["probs"][w] for w in ("负面", "正面")] for r in batch], expected, atol=1e-6)


def test_zero_shot_and_base_override(tiny_model_dir, adapter_dir, predictor):
    zero = SentimentPredictor(base_model_name=str(tiny_model_dir))
    assert zero.template.max_length == 512
    assert zero.predict(REVIEWS[0])["probs"] != pytest.approx(predictor.predict(REVIEWS[0])["probs"], abs=1e-4)
    same = SentimentPredictor(base_model_name=str(tiny_model_dir), lora_path=str(adapter_dir))
    assert same.predict(REVIEWS[0])["probs"] == pytest.approx(predictor.predict(REVIEWS[0])["probs"], abs=1e-6)


def test_calibration_file_sets_the_temperature(adapter_dir, predictor, tmp_path):
    """<adapter>/calibration.json (eval/evaluate.py --calibrate): probabilities become softmax(log-probs / T), the
    labels stay; an explicit temperature wins; a broken file is a one-line error naming it, before any load."""
    import shutil

    from sft.stats import softmax_at

    calibrated = tmp_path / "calibrated"
    shutil.copytree(adapter_dir, calibrated)
    (calibrated / "calibration.json").write_text('{"temperature": 2.5}', encoding="utf-8")
    scaled = SentimentPredictor(lora_path=str(calibrated), batch_size=2)
    assert predictor.temperature == 1.0 and scaled.temperature == 2.5
    raw, got = predictor.predict_batch(REVIEWS), scaled.predict_batch(REVIEWS)
    raw_probs = np.array([list(r["probs"].values()) for r in raw])
    np.testing.assert_allclose([list(g["probs"].values()) for g in got], softmax_at(np.log(raw_probs), 2.5), atol=1e-6)
    assert [g["label"] for g in got] == [r["label"] for r in raw]
    assert SentimentPredictor(lora_path=str(calibrated), temperature=1.0).predict(REVIEWS[0])["probs"] == \
        pytest.approx(raw[0]["probs"], abs=1e-6)
    for bad, message in (('{"temperature": -1}', "must be a positive number, got -1"), ("[1.5]", "not a JSON object")):
        (calibrated / "calibration.json").write_text(bad, encoding="utf-8")
        with pytest.raises(ValueError, match=f"{calibrated / 'calibration.json'}: .*{message}"):
            SentimentPredictor(lora_path=str(calibrated))


def test_read_texts_formats(tmp_path):
    """predict --file reads through the training data's readers: same formats and column names, no label needed."""
    (tmp_path / "a.txt").write_text("好\n\n  \n差\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "a.txt")) == ([(1, "好"), (4, "差")], 2)
    (tmp_path / "b.jsonl").write_text('{"text_a": "好", "label": 1}\n\n{"review": "差"}\n{"text": ""}\n',
                                      encoding="utf-8")
    assert read_texts(str(tmp_path / "b.jsonl")) == ([(1, "好"), (3, "差")], 1)
    (tmp_path / "c.csv").write_text('id,Sentence\n1,"好, 真的好"\n2,\n3,差\n', encoding="utf-8")
    assert read_texts(str(tmp_path / "c.csv")) == ([(2, "好, 真的好"), (4, "差")], 1)
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.jsonl:1: no text key"):
        read_texts(str(tmp_path / "d.jsonl"))


def test_cli_text_demo_interactive(adapter_dir, predictor, capsys, monkeypatch):
    assert predict_main(["--lora_path", str(adapter_dir), "--text", REVIEWS[0]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["probs"] == pytest.approx(predictor.predict(REVIEWS[0])["probs"], abs=1e-6)

    assert predict_main(["--lora_path", str(adapter_dir), "--demo"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(DEMO_TEXTS) and all(line.split("\t")[0] in ("负面", "正面") for line in lines)

    monkeypatch.setattr("sys.stdin", io.StringIO(REVIEWS[2]))  # EOF without a newline ends the session too
    assert predict_main(["--lora_path", str(adapter_dir), "--interactive"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1

    # the real script with stdin: two reviews, then an empty line ends the session (the last review is not read)
    result = run_cli("--lora_path", str(adapter_dir), "--interactive", stdin=f"{REVIEWS[0]}\n{REVIEWS[1]}\n\n不读\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, review in zip(lines, REVIEWS, strict=False):
        expected = predictor.predict(review)
        assert line.startswith(expected["label"] + "\t")
        assert f"正面 {expected['probs']['正面']:.4f}" in line and f"负面 {expected['probs']['负面']:.4f}" in line


def test_cli_file_in_input_order(adapter_dir, predictor, tmp_path, capsys):
    texts = [REVIEWS[1] * 30, REVIEWS[0], "", REVIEWS[2]]  # lengths out of order: the scorer sorts, output must not
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "sub" / "out.jsonl"
    argv = ["--lora_path", str(adapter_dir), "--file", str(tmp_path / "in.txt"), "--output", str(out)]
    argv += ["--batch_size", "2"]
    assert predict_main(argv) == 0
    assert "skipped 1 blank entry" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["text"]) for r in rows] == [(1, texts[0]), (2, texts[1]), (4, texts[3])]
    for row, expected in zip(rows, predictor.predict_batch([texts[0], texts[1], texts[3]]), strict=True):
        assert row["label"] == expected["label"] and row["probs"] == pytest.approx(expected["probs"], abs=1e-6)
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    "case", ["missing_adapter", "base_mismatch", "missing_file", "directory", "not_utf8", "bad_type", "no_field"]
)
def test_cli_errors_are_one_line(case, adapter_dir, other_base, tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "dir.txt").mkdir()
    (tmp_path / "in.csv").write_text("label,body\n1,好\n", encoding="utf-8")
    (tmp_path / "in.docx").write_text("好", encoding="utf-8")
    out = str(tmp_path / "out.jsonl")
    lora = ["--lora_path", str(adapter_dir)]
    args, expected = {
        "missing_adapter": (["--lora_path", str(tmp_path / "nope"), "--text", "好"], "adapter directory does not"),
        "base_mismatch": ([*lora, "--base_model_name", str(other_base), "--demo"], "hidden_size: adapter 64 vs base"),
        "missing_file": ([*lora, "--file", str(tmp_path / "x.txt"), "--output", out], "x.txt: no such file"),
        "directory": ([*lora, "--file", str(tmp_path / "dir.txt"), "--output", out], "dir.txt: no such file"),
        "not_utf8": ([*lora, "--file", str(tmp_path / "bad.txt"), "--output", out], "bad.txt:1: not valid UTF-8"),
        "bad_type": ([*lora, "--file", str(tmp_path / "in.docx"), "--output", out], "unsupported file extension"),
        "no_field": ([*lora, "--file", str(tmp_path / "in.csv"), "--output", out], "in.csv:1: no text column"),
    }[case]
    if case == "missing_adapter":  # through the real script
        result = run_cli(*args)
        returncode, stderr = result.returncode, result.stderr
        assert "Traceback" not in stderr
    else:
        returncode, stderr = predict_main(args), capsys.readouterr().err
    errors = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert returncode == 2 and len(errors) == 1 and expected in errors[0], stderr
    assert not Path(out).exists()
