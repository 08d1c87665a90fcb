"""sft/stats.py with known answers: bootstrap intervals, McNemar's exact test, the paired comparison, temperature
scaling, the error-analysis tables; and sft/eval_report.py rendering them."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score, roc_auc_score

from sft import metrics as M
from sft import stats as S
from sft.scoring import Scores


def synthetic(n: int, seed: int = 0, classes: int = 2, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gold labels drawn from softmax(z) and the probabilities softmax(scale * z): calibrated at scale 1,
    over-confident above 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, classes)) * 2
    gold = np.array([rng.choice(classes, p=p) for p in S.softmax_at(z)])
    return gold, S.softmax_at(scale * z)


# ----- intervals ---------------------------------------------------------------------------------------------------
def test_interval_brackets_the_point_estimate_and_narrows_as_n_grows():
    widths = {}
    for n in (100, 400, 1600):
        gold, probs = synthetic(n, seed=n)
        point = M.classification_metrics(gold, probs, ["a", "b"])
        ci = S.intervals(gold, probs)
        for key in ("accuracy", "f1", "auc"):
            low, high = ci[f"{key}_ci"]
            assert low < point[key] < high, (n, key, low, point[key], high)
            widths.setdefault(key, []).append(high - low)
        # the known answer for a proportion: width ~ 2 * 1.96 * sqrt(p (1 - p) / n)
        p = point["accuracy"]
        assert widths["accuracy"][-1] == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.15)
    for key, w in widths.items():
        assert w[0] > w[1] > w[2], (key, w)
        assert w[0] / w[2] == pytest.approx(4, rel=0.3), (key, w)  # 16x the rows: a quarter of the width


def test_intervals_are_seeded_and_undefined_cases_are_none():
    gold, probs = synthetic(200)
    assert S.intervals(gold, probs) == S.intervals(gold, probs)  # same seed, same interval
    assert S.intervals(gold, probs, seed=1) != S.intervals(gold, probs)
    assert S.intervals(gold[:1], probs[:1]) == {"accuracy_ci": None, "f1_ci": None, "auc_ci": None}
    one_class = S.intervals(np.ones(50, dtype=int), probs[:50])
    assert one_class["auc_ci"] is None and one_class["accuracy_ci"] is not None
    perfect = np.eye(2)[gold]
    assert S.intervals(gold, perfect)["accuracy_ci"] == [1.0, 1.0]


@pytest.mark.parametrize("classes", [2, 3])
def test_vectorised_f1_and_auc_equal_sklearn(classes):
    gold, probs = synthetic(300, seed=classes, classes=classes)
    probs[:30] = probs[0]  # ties in the scores
    pred = probs.argmax(axis=1)
    assert S.macro_f1(gold, pred, classes) == pytest.approx(
        f1_score(gold, pred, labels=list(range(classes)), average="macro", zero_division=0))
    expected = roc_auc_score(gold, probs[:, 1]) if classes == 2 else roc_auc_score(gold, probs, multi_class="ovr")
    assert S.auc(gold, probs) == pytest.approx(expected)
    # a class never true nor predicted counts as F1 0, as in sklearn with labels=range(k)
    assert S.macro_f1(np.zeros(4, int), np.zeros(4, int), 2) == pytest.approx(
        f1_score([0] * 4, [0] * 4, labels=[0, 1], average="macro", zero_division=0))
    # vectorised: one value per resample row
    idx = np.random.default_rng(0).integers(0, 300, size=(5, 300))
    assert S.auc(gold[idx], probs[idx]).shape == (5,)
    assert S.auc(gold[idx], probs[idx])[2] == pytest.approx(S.auc(gold[idx[2]], probs[idx[2]]))


def test_bootstrap_on_1200_rows_is_fast():
    gold, probs = synthetic(1200)
    started = time.perf_counter()
    S.intervals(gold, probs)
    S.compare(gold, probs.argmax(axis=1), np.roll(probs.argmax(axis=1), 1))
    seconds = time.perf_counter() - started
    print(f"intervals + comparison on 1,200 rows, {S.RESAMPLES} resamples: {seconds:.2f} s")
    assert seconds < 20  # about 1 s on one shared core


# ----- model vs baseline -------------------------------------------------------------------------------------------
def table_rows(both: int, model_only: int, baseline_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of model and baseline per row, from the four cells of the 2x2 table."""
    model = [True] * both + [True] * model_only + [False] * baseline_only + [False] * neither
    baseline = [True] * both + [False] * model_only + [True] * baseline_only + [False] * neither
    return np.array(model), np.array(baseline)


@pytest.mark.parametrize(("b", "c", "verdict"), [(15, 5, "better"), (5, 15, "worse"), (12, 8, "not distinguishable"),
                                                 (0, 0, "not distinguishable"), (7, 0, "better")])
def test_mcnemar_equals_binomtest_on_a_constructed_table(b, c, verdict):
    model, baseline = table_rows(50, b, c, 30)
    got_b, got_c, p = S.mcnemar_exact(model, baseline)
    assert (got_b, got_c) == (b, c)
    assert p == (binomtest(b, b + c, 0.5).pvalue if b + c else 1.0)
    assert S.verdict(b, c, p) == verdict


def test_compare_counts_disagreements_and_brackets_the_difference():
    gold = np.array([0, 1, 2] * 40)
    model = gold.copy()
    model[:10] = (gold[:10] + 1) % 3  # 10 wrong
    baseline = gold.copy()
    baseline[5:40] = (gold[5:40] + 2) % 3  # 35 wrong: rows 5..9 both wrong, with different labels
    c = S.compare(gold, model, baseline)
    assert (c["model_only_right"], c["baseline_only_right"]) == (30, 5)
    assert c["disagreements"] == 40 and c["disagreements_neither_right"] == 5
    assert c["accuracy_difference"] == pytest.approx(25 / 120)
    low, high = c["accuracy_difference_ci"]
    assert low < 25 / 120 < high and low > 0
    assert c["mcnemar_p"] == binomtest(30, 35, 0.5).pvalue and c["verdict"] == "better"
    same = S.compare(gold, model, model)
    assert same["accuracy_difference_ci"] == [0.0, 0.0] and same["verdict"] == "not distinguishable"


# ----- calibration -------------------------------------------------------------------------------------------------
def test_temperature_scaling_lowers_ece_and_keeps_accuracy():
    """Log-probs 3x too sharp: the temperature fitted on one half is about 3 and fixes the other half."""
    rng = np.random.default_rng(7)
    z = rng.normal(size=(4000, 2)) * 2
    gold = np.array([rng.choice(2, p=p) for p in S.softmax_at(z)])
    logprobs = np.log(S.softmax_at(3 * z))  # over-confident label log-probs
    dev, test = slice(0, 2000), slice(2000, None)
    temperature = S.fit_temperature(logprobs[dev], gold[dev])
    assert temperature == pytest.approx(3, rel=0.15)
    raw, scaled = Scores(("a", "b"), logprobs[test]), Scores(("a", "b"), logprobs[test], temperature)
    before = M.expected_calibration_error(gold[test], raw.probs)
    after = M.expected_calibration_error(gold[test], scaled.probs)
    assert after < before / 2 and after < 0.03
    assert (scaled.probs.argmax(axis=1) == raw.probs.argmax(axis=1)).all()  # accuracy unchanged
    assert scaled.probs == pytest.approx(S.softmax_at(logprobs[test], temperature))
    with pytest.raises(ValueError, match="0 rows"):
        S.fit_temperature(np.zeros((0, 2)), np.zeros(0, int))


# ----- error analysis ----------------------------------------------------------------------------------------------
def test_confident_mistakes_and_length_buckets():
    texts = ["好" * n for n in (5, 10, 20, 40, 81, 100)]
    gold = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.05, 0.95], [0.3, 0.7]])
    mistakes = S.confident_mistakes(texts, gold, probs, ["neg", "pos"], count=2)
    assert [m["index"] for m in mistakes] == [4, 1]  # wrong rows 4 (p 0.95), 1 (0.8), 2 (0.6): the top two
    assert mistakes[0] == {"index": 4, "text": "好" * 79 + "…", "gold": "neg", "pred": "pos", "p": 0.95}
    assert len(mistakes[0]["text"]) == 80 and S.cut("a\nb|c") == "a b|c"
    assert len(S.confident_mistakes(texts, gold, probs, ["neg", "pos"])) == 3  # fewer mistakes than 20

    correct = {"model": probs.argmax(axis=1) == gold, "baseline": np.ones(6, bool)}
    buckets = S.accuracy_by_length(np.array([len(t) for t in texts]), correct)
    assert [b["n"] for b in buckets] == [2, 1, 1, 2] and sum(b["n"] for b in buckets) == 6
    assert buckets[0] == {"quartile": 1, "chars": [5, 10], "n": 2, "accuracy": {"model": 0.5, "baseline": 1.0}}
    assert buckets[3]["chars"] == [81, 100] and buckets[3]["accuracy"]["model"] == 0.5
    assert S.accuracy_by_length(np.array([]), {}) == []
