"""sft/metrics.py and eval/evaluate.py: metric definitions, the TF-IDF baseline, and the evaluation CLI end to end
(files written, metrics recomputable from the predictions, one process == two accelerate processes, errors)."""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample"
OUTPUTS = ("metrics.json", "predictions.jsonl", "report.md", "roc.png", "confusion.png", "reliability.png")
N_TEST, N_LEAKED = 20, 4


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
    assert "| model | clean | 20 |" in report and "| TF-IDF + LR | all | 24 |" in report


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


@pytest.mark.parametrize("rows", [11, 1])
def test_two_processes_match_one(adapter_dir, data_dir, tmp_path, rows):
    """`accelerate launch` with 2 CPU (gloo) processes: same rows, same order, same metrics as one process, also
    with fewer rows than processes (one rank then scores a padding copy that the gather drops)."""
    common = ["--adapter", str(adapter_dir), "--data_dir", str(data_dir), "--max_samples", str(rows), "--no_baseline",
              "--batch_size", "4", "--no_progress"]
    assert evaluate_main([*common, "--out", str(tmp_path / "one")]) == 0
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "eval" / "evaluate.py"),
           *common, "--out", str(tmp_path / "two")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]

    one, two = (json.loads((tmp_path / d / "metrics.json").read_text(encoding="utf-8")) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("n", "accuracy", "f1", "confusion_matrix"):
        assert one[key] == two[key], key
    assert two["auc"] == pytest.approx(one["auc"])
    rows1, rows2 = read_predictions(tmp_path / "one"), read_predictions(tmp_path / "two")
    assert [(r["index"], r["text"], r["gold"], r["pred"]) for r in rows1] == [
        (r["index"], r["text"], r["gold"], r["pred"]) for r in rows2
    ]
    for a, b in zip(rows1, rows2, strict=True):
        assert b["probs"] == pytest.approx(a["probs"], abs=1e-6)
