"""sft/metrics.py and eval/evaluate.py: metric definitions, the TF-IDF baseline, and the evaluation CLI end to end
(files written, metrics recomputable from the predictions, one process == two accelerate processes, errors)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from eval.evaluate import main as evaluate_main
from sft import metrics as M
from sft import stats as S

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample"
OUTPUTS = ("metrics.json", "predictions.jsonl", "report.md", "roc.png", "confusion.png", "reliability.png")
N_TEST, N_LEAKED = 20, 4
SAMPLE_TEST = (SAMPLE / "test.tsv").read_text(encoding="utf-8").splitlines()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The sample data, with a test split of 20 sample test rows + 4 rows copied from train (not 'clean')."""
    out = tmp_path_factory.mktemp("data")
    shutil.copy(SAMPLE / "train.tsv", out / "train.tsv")
    shutil.copy(SAMPLE / "dev.tsv", out / "dev.tsv")
    test = (SAMPLE / "test.tsv").read_text(encoding="utf-8").splitlines()[: N_TEST + 1]
    train = (SAMPLE / "train.tsv").read_text(encoding="utf-8").splitlines()[1 : N_LEAKED + 1]
    (out / "test.tsv").write_text("\n".join(test + train) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, data_dir, tmp_path_factory, lora_adapter) -> Path:
    adapter = lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "run")
    # the data location comes from the saved recipe unless flags say otherwise
    (adapter / "recipe.yaml").write_text(f"model_name_or_path: {tiny_model_dir}\ndata_dir: {data_dir}\n"
                                         "max_eval_samples: 3\n", encoding="utf-8")
    return adapter


def read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


# ----- metrics ----------------------------------------------------------------------------------------------------
def test_classification_metrics_by_hand():
    gold = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = M.classification_metrics(gold, probs, ["负面", "正面"])
    assert m["n"] == 4 and m["accuracy"] == 0.75
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert m["auc"] == 1.0  # every positive scores above every negative
    assert m["per_class"]["负面"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    # Brier: mean of sum of squared errors to one-hot = (0.02 + 0.72 + 0.18 + 0.08) / 4
    assert m["brier"] == pytest.approx(0.25)
    # ECE bins of the top probability: 0.6 -> bin 6 (wrong), 0.7 -> bin 7, 0.8 -> bin 8, 0.9 -> bin 9 (right)
    assert m["ece"] == pytest.approx((0.6 + 0.3 + 0.2 + 0.1) / 4)
    json.dumps(m)  # JSON-ready

    assert M.classification_metrics([1, 1], probs[:2], ["a", "b"])["auc"] is None  # one class: undefined
    three = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]])
    m3 = M.classification_metrics([0, 1, 2, 1], three, ["a", "b", "c"])
    assert m3["auc"] == pytest.approx(roc_auc_score([0, 1, 2, 1], three, multi_class="ovr"))
    assert M.classification_metrics([], np.zeros((0, 2)), ["a", "b"])["n"] == 0
    stats = M.label_mass_stats([0.9, 0.2, 1.0])
    assert stats["min"] == 0.2 and stats["frac_below_0.5"] == pytest.approx(1 / 3)


def test_plots_draw_without_missing_glyphs(tmp_path):
    gold = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4], [0.9, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font(s)" is a UserWarning
        M.plot_roc(gold, {"model": probs, "baseline": probs[::-1]}, tmp_path / "roc.png")
        M.plot_confusion([[2, 0], [1, 2]], ["负面", "正面"], tmp_path / "confusion.png")
        M.plot_reliability(gold, probs, tmp_path / "reliability.png")
    for name in ("roc.png", "confusion.png", "reliability.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_tfidf_baseline_on_chnsenticorp(chnsenticorp_dir):
    from sft.data import DataArguments, load_splits

    data = load_splits(DataArguments(data_dir=str(chnsenticorp_dir)), ("train", "test"))
    train, test = data["train"], data["test"]
    probs = M.tfidf_baseline(train["text"], train["label"], test["text"])
    m = M.classification_metrics(test["label"], probs, ["负面", "正面"])
    assert m["n"] == 1200 and m["accuracy"] >= 0.94 and m["auc"] >= 0.98
    seen = set(train["text"])
    clean = np.array([t not in seen for t in test["text"]])
    mc = M.classification_metrics(np.array(test["label"])[clean], probs[clean], ["负面", "正面"])
    assert mc["n"] == 869 and mc["accuracy"] >= 0.92


# ----- the CLI ----------------------------------------------------------------------------------------------------
def test_evaluate_writes_everything_and_metrics_match_predictions(adapter_dir, data_dir):
    assert evaluate_main(["--adapter", str(adapter_dir), "--split", "test", "--no_progress"]) == 0
    out = adapter_dir / "eval_test"  # default output directory; data from the adapter's recipe.yaml
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))

    rows = read_predictions(out)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    gold = [r["gold"] for r in rows]
    pred = [r["pred"] for r in rows]
    p1 = [r["probs"]["正面"] for r in rows]
    assert len(rows) == metrics["n"] == N_TEST + N_LEAKED  # recipe's max_eval_samples is not inherited
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert metrics["f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert metrics["auc"] == pytest.approx(roc_auc_score(gold, p1))
    assert all(r["pred_label"] == ("负面", "正面")[r["pred"]] for r in rows)
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-9 and 0 < r["label_mass"] < 1 for r in rows)
    expected_text = (data_dir / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert [r["text"] for r in rows] == [line.split("\t", 1)[1] for line in expected_text]  # split order

    assert sum(r["in_train"] for r in rows) == N_LEAKED
    assert metrics["clean"]["n"] == N_TEST
    clean = [r for r in rows if not r["in_train"]]
    assert metrics["clean"]["accuracy"] == pytest.approx(accuracy_score([r["gold"] for r in clean],
                                                                        [r["pred"] for r in clean]))
    assert metrics["baseline"]["n"] == len(rows) and metrics["baseline"]["clean"]["n"] == N_TEST
    assert metrics["world_size"] == 1
    for key in ("per_class", "confusion_matrix", "ece", "brier", "label_mass"):
        assert key in metrics
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| test | clean | model | 20 |" in report and "| test | all | TF-IDF + LR | 24 |" in report
    check_uncertainty_and_errors(metrics, rows, report)


def check_uncertainty_and_errors(metrics: dict, rows: list[dict], report: str) -> None:
    """Intervals around every figure, the paired comparison and the error analysis agree with predictions.jsonl."""
    gold, pred = np.array([r["gold"] for r in rows]), np.array([r["pred"] for r in rows])
    baseline = np.array([r["baseline_pred"] for r in rows])
    for figures in (metrics, metrics["clean"], metrics["baseline"], metrics["baseline"]["clean"]):
        for key in ("accuracy", "f1", "auc"):
            low, high = figures[f"{key}_ci"]
            assert low <= figures[key] <= high, (key, figures[key], low, high)
            model = figures is metrics or figures is metrics["clean"]  # (the baseline is 1.0 on this sample data)
            assert high - low > 0.01 or not model
            assert f"{figures[key]:.4f} [{low:.4f}, {high:.4f}]" in report
    comparison = metrics["comparison"]
    b, c, p = S.mcnemar_exact(pred == gold, baseline == gold)
    assert (comparison["model_only_right"], comparison["baseline_only_right"], comparison["mcnemar_p"]) == (b, c, p)
    assert comparison["disagreements"] == int((pred != baseline).sum())
    assert comparison["accuracy_difference"] == pytest.approx((pred == gold).mean() - (baseline == gold).mean())
    assert comparison["verdict"] == S.verdict(b, c, p) and f"**{comparison['verdict']}**" in report
    assert metrics["comparison"]["clean"]["n"] == metrics["clean"]["n"]

    wrong = [r for r in rows if r["pred"] != r["gold"]]
    top = sorted(wrong, key=lambda r: -max(r["probs"].values()))[:20]
    mistakes = metrics["errors"]["confident_mistakes"]
    assert [m["index"] for m in mistakes] == [r["index"] for r in top] and len(mistakes) == min(20, len(wrong))
    assert all(m["p"] == max(rows[m["index"]]["probs"].values()) for m in mistakes)
    assert f"The {len(mistakes)} most confident mistakes" in report
    assert f"| {top[0]['index']} | {top[0]['text'][:80]}" in report
    buckets = metrics["errors"]["accuracy_by_length"]
    assert sum(bucket["n"] for bucket in buckets) == len(rows) and len(buckets) >= 3
    assert "Accuracy by review length" in report


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory) -> dict[str, Path]:
    """Two more labelled sets in other formats and spellings: a CSV `label,review` with English label words, and
    JSON lines."""
    out = tmp_path_factory.mktemp("eval_sets")
    test = [line.split("\t", 1) for line in SAMPLE_TEST[31:45]]
    words = {"0": "negative", "1": "positive"}
    with (out / "hotels.csv").open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("label", "review"), *((words[y], t) for y, t in test)])
    dev = [line.split("\t", 1) for line in (SAMPLE / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:13]]
    (out / "books.jsonl").write_text("".join(json.dumps({"text": t, "label": int(y)}, ensure_ascii=False) + "\n"
                                             for y, t in dev), encoding="utf-8")
    return {"hotels": out / "hotels.csv", "books": out / "books.jsonl"}


def test_two_eval_sets_in_one_run_equal_two_separate_runs(adapter_dir, data_dir, eval_files, tmp_path, monkeypatch):
    """One model load and one baseline fit for all sets; each set's figures are the ones a run of its own gives."""
    import sft.evaluation
    import sft.model

    calls = {"load": 0, "baseline": 0}

    def counting(name, module, attr):
        real = getattr(module, attr)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapper)

    counting("load", sft.model, "load_for_inference")
    counting("baseline", sft.evaluation.M, "tfidf_baseline")
    common = ["--adapter", str(adapter_dir), "--max_samples", "10", "--no_progress"]
    specs = [f"{name}={path}" for name, path in eval_files.items()]
    both = ["--out", str(tmp_path / "both"), "--eval_set", specs[0], "--eval_set", specs[1]]
    assert evaluate_main([*common, *both]) == 0
    assert calls == {"load": 1, "baseline": 1}
    for spec in specs:
        assert evaluate_main([*common, "--out", str(tmp_path / spec.split("=")[0]), "--eval_set", spec]) == 0

    combined = json.loads((tmp_path / "both" / "metrics.json").read_text(encoding="utf-8"))
    assert list(combined["eval_sets"]) == ["hotels", "books"]
    for name in eval_files:
        together = tmp_path / "both" / name
        alone = tmp_path / name / name
        for file in OUTPUTS[:2]:  # metrics.json, predictions.jsonl: byte for byte
            assert (together / file).read_text(encoding="utf-8") == (alone / file).read_text(encoding="utf-8"), file
        for file in ("roc.png", "confusion.png", "reliability.png"):
            assert (together / file).is_file()
        per_set = json.loads((together / "metrics.json").read_text(encoding="utf-8"))
        assert {k: v for k, v in per_set.items() if k in combined["eval_sets"][name]} == combined["eval_sets"][name]
        assert per_set["n"] == 10 and per_set["source"] == str(eval_files[name]) and per_set["accuracy_ci"]
        assert per_set["baseline"]["n"] == 10 and per_set["comparison"]["verdict"] in S.VERDICTS
    # the split's own figures do not depend on the other sets either
    split = json.loads((tmp_path / "hotels" / "metrics.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in combined.items() if k != "eval_sets"} == {k: v for k, v in split.items()
                                                                       if k != "eval_sets"}
    hotels = read_predictions(tmp_path / "both" / "hotels")  # English label words read as the classes
    assert [r["gold"] for r in hotels] == [int(line[0]) for line in SAMPLE_TEST[31:41]]
    report = (tmp_path / "both" / "report.md").read_text(encoding="utf-8")
    for name in eval_files:
        assert f"| {name} | all | model | 10 |" in report and f"![ROC]({name}/roc.png)" in report
        assert f"### {name} ({eval_files[name]}, 10 rows)" in report


def test_calibrate(adapter_dir, data_dir, tmp_path):
    """--calibrate: a temperature fitted on the dev split, ECE before/after on every set, calibrated probabilities
    in predictions.jsonl, calibration.json next to the report and in the adapter, where SentimentPredictor uses it."""
    from sft.predictor import SentimentPredictor

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter, ignore=shutil.ignore_patterns("eval_*"))
    out = tmp_path / "out"
    argv = ["--adapter", str(adapter), "--out", str(out), "--calibrate", "--max_samples", "16", "--no_progress"]
    assert evaluate_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    saved = json.loads((out / "calibration.json").read_text(encoding="utf-8"))
    assert saved == json.loads((adapter / "calibration.json").read_text(encoding="utf-8")) == metrics["temperature"]
    temperature = saved["temperature"]
    assert saved["fitted_on"] == "validation" and saved["n"] == 16 and temperature != pytest.approx(1, abs=1e-3)
    assert saved["log_loss_after"] <= saved["log_loss_before"]

    rows = read_predictions(out)
    gold = np.array([r["gold"] for r in rows])
    raw = np.array([list(r["probs"].values()) for r in rows])
    calibrated = np.array([list(r["calibrated_probs"].values()) for r in rows])
    assert calibrated == pytest.approx(S.softmax_at(np.log(raw), temperature))
    assert (calibrated.argmax(axis=1) == raw.argmax(axis=1)).all()  # accuracy unchanged
    c = metrics["calibration"]
    assert c["ece_before"] == pytest.approx(M.expected_calibration_error(gold, raw)) == metrics["ece"]
    assert c["ece_after"] == pytest.approx(M.expected_calibration_error(gold, calibrated))
    assert metrics["errors"]["probabilities"] == "calibrated"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert f"## Calibration: temperature {temperature:.3g}" in report
    assert f"| test | {c['ece_before']:.4f} | {c['ece_after']:.4f} |" in report

    predictor = SentimentPredictor(lora_path=str(adapter), batch_size=4)
    assert predictor.temperature == temperature
    got = predictor.predict_batch([r["text"] for r in rows[:4]])
    assert np.array([list(g["probs"].values()) for g in got]) == pytest.approx(calibrated[:4], abs=1e-5)


def test_dev_split_max_samples_no_baseline(adapter_dir, data_dir, tmp_path):
    out = tmp_path / "dev"
    argv = ["--adapter", str(adapter_dir), "--split", "dev", "--data_dir", str(data_dir), "--out", str(out),
            "--max_samples", "7", "--no_baseline", "--batch_size", "3", "--no_progress"]
    assert evaluate_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["split"] == "validation" and metrics["n"] == 7 and metrics["baseline"] is None
    assert len(read_predictions(out)) == 7


def test_zero_shot_and_test_file_only(tiny_model_dir, data_dir, tmp_path):
    """--adapter none scores the base with the default template; a lone --test_file has no train: no baseline."""
    out = tmp_path / "zero"
    argv = ["--adapter", "none", "--base", str(tiny_model_dir), "--test_file", str(data_dir / "test.tsv"),
            "--out", str(out), "--max_samples", "5", "--no_progress"]
    assert evaluate_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n"] == 5 and metrics["clean"] is None and metrics["baseline"] is None
    assert all(r["in_train"] is None for r in read_predictions(out))


@pytest.mark.parametrize("case", ["missing_adapter", "base_mismatch", "missing_data", "no_out_zero_shot"])
def test_errors_are_one_line(case, adapter_dir, tiny_model_dir, data_dir, tmp_path, capsys):
    from sft.tiny_model import tiny_qwen2_config

    other = tmp_path / "other_base"
    tiny_qwen2_config(hidden_size=32).save_pretrained(other)  # the base check reads the config only
    argv, expected = {
        "missing_adapter": (["--adapter", str(tmp_path / "nope")], "adapter directory does not exist"),
        "base_mismatch": (["--adapter", str(adapter_dir), "--base", str(other)], "does not match"),
        "missing_data": (["--adapter", str(adapter_dir), "--data_dir", str(tmp_path / "no_data")], "data_dir"),
        "no_out_zero_shot": (["--adapter", "none", "--base", str(tiny_model_dir)], "needs --out"),
    }[case]
    assert evaluate_main([*argv, "--out", str(tmp_path / "o")] if case != "no_out_zero_shot" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert not (tmp_path / "o").exists()


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_script_entry_point_error(tmp_path):
    """Run as a script: a missing adapter is one stderr line and exit code 2."""
    result = subprocess.run([sys.executable, str(REPO / "eval" / "evaluate.py"), "--adapter", str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr


def split_text_and_numbers(figures: dict) -> tuple[dict, dict]:
    """pytest.approx (9.2+) refuses a mapping that holds strings."""
    text = {k: v for k, v in figures.items() if isinstance(v, str)}
    return text, {k: v for k, v in figures.items() if k not in text}


@pytest.mark.parametrize("rows", [23, 1])
def test_two_processes_match_one(adapter_dir, data_dir, eval_files, tmp_path, rows):
    """`accelerate launch` with 2 CPU (gloo) processes: same rows, same order, same metrics, intervals, comparison,
    calibration, error analysis and report as one process, on the split and on an --eval_set; also with fewer rows
    than processes (one rank then scores a padding copy that the gather drops)."""
    common = ["--adapter", str(adapter_dir), "--data_dir", str(data_dir), "--max_samples", str(rows), "--batch_size",
              "4", "--no_progress"]
    common += ["--calibrate", "--eval_set", f"books={eval_files['books']}"] if rows > 1 else ["--no_baseline"]
    assert evaluate_main([*common, "--out", str(tmp_path / "one")]) == 0
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "eval" / "evaluate.py"),
           *common, "--out", str(tmp_path / "two")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]

    one, two = (json.loads((tmp_path / d / "metrics.json").read_text(encoding="utf-8")) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("n", "accuracy", "f1", "confusion_matrix", "accuracy_ci", "f1_ci", "comparison", "baseline"):
        assert one[key] == two[key], key
    assert two["auc"] == pytest.approx(one["auc"])
    for folder in ("", "books") if rows > 1 else ("",):
        rows1, rows2 = read_predictions(tmp_path / "one" / folder), read_predictions(tmp_path / "two" / folder)
        assert [(r["index"], r["text"], r["gold"], r["pred"]) for r in rows1] == [
            (r["index"], r["text"], r["gold"], r["pred"]) for r in rows2
        ]
        for a, b in zip(rows1, rows2, strict=True):
            assert b["probs"] == pytest.approx(a["probs"], abs=1e-6)
    if rows > 1:  # the new figures: up to float noise in the probabilities, the same; the report reads the same
        assert one["auc_ci"] == pytest.approx(two["auc_ci"]) and one["comparison"]["verdict"] in S.VERDICTS
        # the dev rows' scores differ by ~1e-7 between shardings (batch shapes); this weak tiny model turns that into
        # ~5e-6 of relative change in T, which the report's 3 digits do not show
        for key in ("temperature", "calibration"):  # numbers up to that noise, the rest ("fitted_on") exactly
            (text1, num1), (text2, num2) = (split_text_and_numbers(m[key]) for m in (one, two))
            assert text1 == text2 and num1 == pytest.approx(num2, rel=1e-4), key
        mistakes = [m["errors"]["confident_mistakes"] for m in (one, two)]
        assert [m["index"] for m in mistakes[0]] == [m["index"] for m in mistakes[1]]
        assert [m["p"] for m in mistakes[0]] == pytest.approx([m["p"] for m in mistakes[1]], abs=1e-6)
        assert one["errors"]["accuracy_by_length"] == two["errors"]["accuracy_by_length"]
        assert one["eval_sets"]["books"]["comparison"] == two["eval_sets"]["books"]["comparison"]
        report1, report2 = ((tmp_path / d / "report.md").read_text(encoding="utf-8") for d in ("one", "two"))
        assert report2 == report1.replace("processes: 1", "processes: 2")
