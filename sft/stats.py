"""How far to trust an evaluation: bootstrap intervals, the paired comparison with the baseline, temperature scaling
and the error-analysis tables. Pure functions on arrays; scipy and scikit-learn do the statistics.

On 1,200 test rows a 95% interval on accuracy is about +-1.2 points, so a bare point estimate (or a difference of
half a point between two systems) says little. Every interval here is a percentile bootstrap from
`scipy.stats.bootstrap`, seeded, resampling rows: the figures of one set never depend on what else was evaluated.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000  # Monte Carlo error of a 2.5% percentile with 2,000 resamples: about 0.1 accuracy points on 1,200 rows
SEED = 0
ALPHA = 1 - CONFIDENCE  # McNemar's test decides the verdict at this level
MAX_RESAMPLED_CELLS = 4_000_000  # resamples x rows per vectorised call: bounded memory on large sets
TEMPERATURE_BOUNDS = (0.05, 20.0)
VERDICTS = ("better", "not distinguishable", "worse")


# ----- intervals ---------------------------------------------------------------------------------------------------
def bootstrap_interval(statistic: Callable[[np.ndarray], np.ndarray], n: int, resamples: int = RESAMPLES,
                       seed: int = SEED, confidence: float = CONFIDENCE) -> list[float] | None:
    """Percentile bootstrap interval of `statistic` over n rows, or None when undefined (fewer than 2 rows, or a
    resample on which the statistic is undefined, e.g. AUC with one class).

    `statistic(idx)` gets row indices of shape (..., n) and returns one value per leading index: resampling indices
    keeps every per-row array of the rows together (a paired bootstrap of all of them)."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    if n < 2:
        return None
    with warnings.catch_warnings():  # every resample giving one value (accuracy 1.0 throughout) is a valid [v, v]
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap((np.arange(n),), lambda idx, axis=-1: statistic(idx), n_resamples=resamples,
                           vectorized=True, batch=max(1, MAX_RESAMPLED_CELLS // n), method="percentile",
                           confidence_level=confidence, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return None if np.isnan(low) or np.isnan(high) else [float(low), float(high)]


def macro_f1(gold: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro F1 over classes 0..k-1 along the last axis (F1 = 0 for a class never true nor predicted), as
    sklearn's f1_score(labels=range(k), average="macro", zero_division=0), vectorised over leading axes."""
    scores = []
    for k in range(num_classes):
        tp = ((pred == k) & (gold == k)).sum(axis=-1)
        wrong = ((pred == k) != (gold == k)).sum(axis=-1)  # false positives + false negatives
        scores.append(np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(tp.shape), where=(2 * tp + wrong) > 0))
    return np.mean(scores, axis=0)


def auc(gold: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC AUC of p(class 1) for two classes, macro one-vs-rest otherwise (sklearn's roc_auc_score), as the
    Mann-Whitney rank sum, vectorised over leading axes; NaN where a class is absent."""
    from scipy.stats import rankdata

    classes = [1] if probs.shape[-1] == 2 else range(probs.shape[-1])
    scores = []
    for k in classes:
        positive = gold == k
        n_pos, n_neg = positive.sum(axis=-1), (~positive).sum(axis=-1)
        rank_sum = np.where(positive, rankdata(probs[..., k], axis=-1), 0).sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            scores.append((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return np.mean(scores, axis=0)


def intervals(gold: np.ndarray, probs: np.ndarray, seed: int = SEED) -> dict[str, list[float] | None]:
    """{"accuracy_ci", "f1_ci", "auc_ci"} of a probability matrix (n, classes) against the gold labels."""
    gold, probs = np.asarray(gold, dtype=int), np.asarray(probs, dtype=float)
    pred, k = probs.argmax(axis=1), probs.shape[1]
    statistics = {"accuracy": lambda idx: (pred[idx] == gold[idx]).mean(axis=-1),
                  "f1": lambda idx: macro_f1(gold[idx], pred[idx], k),
                  "auc": lambda idx: auc(gold[idx], probs[idx])}
    return {f"{key}_ci": bootstrap_interval(stat, len(gold), seed=seed) for key, stat in statistics.items()}


# ----- model vs baseline -------------------------------------------------------------------------------------------
def mcnemar_exact(model_correct: np.ndarray, baseline_correct: np.ndarray) -> tuple[int, int, float]:
    """(b, c, p): rows only the model got right, rows only the baseline got right, and McNemar's exact two-sided
    p-value, the binomial test of b successes in b + c trials at 1/2 (1.0 when the systems never disagree on
    correctness)."""
    from scipy.stats import binomtest

    model_correct, baseline_correct = np.asarray(model_correct, bool), np.asarray(baseline_correct, bool)
    b, c = int((model_correct & ~baseline_correct).sum()), int((~model_correct & baseline_correct).sum())
    return b, c, float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0


def verdict(b: int, c: int, p: float, alpha: float = ALPHA) -> str:
    """'better', 'worse' (significant at `alpha`, in the direction of b - c) or 'not distinguishable'."""
    return VERDICTS[1] if p >= alpha or b == c else VERDICTS[0] if b > c else VERDICTS[2]


def compare(gold: np.ndarray, model_pred: np.ndarray, baseline_pred: np.ndarray, seed: int = SEED) -> dict:
    """The model against the baseline on the same rows: accuracies, their difference with a paired-bootstrap interval,
    McNemar's exact test, the verdict, and how often the two disagree and who is right then."""
    gold = np.asarray(gold, dtype=int)
    model_correct, baseline_correct = np.asarray(model_pred) == gold, np.asarray(baseline_pred) == gold
    b, c, p = mcnemar_exact(model_correct, baseline_correct)
    disagree = int((np.asarray(model_pred) != np.asarray(baseline_pred)).sum())
    diff = model_correct.astype(float) - baseline_correct
    return {
        "n": len(gold), "model_accuracy": float(model_correct.mean()) if len(gold) else None,
        "baseline_accuracy": float(baseline_correct.mean()) if len(gold) else None,
        "accuracy_difference": float(diff.mean()) if len(gold) else None,
        "accuracy_difference_ci": bootstrap_interval(lambda idx: diff[idx].mean(axis=-1), len(gold), seed=seed),
        "model_only_right": b, "baseline_only_right": c, "mcnemar_p": p, "verdict": verdict(b, c, p),
        "disagreements": disagree, "disagreements_neither_right": disagree - b - c,
    }


# ----- calibration -------------------------------------------------------------------------------------------------
def softmax_at(logprobs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """p(class) = softmax(log-probs / T): T > 1 softens over-confident scores; argmax (so accuracy) is unchanged."""
    from scipy.special import softmax

    return softmax(np.asarray(logprobs, dtype=float) / temperature, axis=-1)


def fit_temperature(logprobs: np.ndarray, gold: np.ndarray) -> float:
    """The temperature that minimises the log-loss of softmax(logprobs / T) on held-out rows (the dev split), searched
    in log T to a tolerance far below the float noise of the scores (1 and 2 processes then agree to ~1e-7)."""
    from scipy.optimize import minimize_scalar
    from sklearn.metrics import log_loss

    logprobs, gold = np.asarray(logprobs, dtype=float), np.asarray(gold, dtype=int)
    if len(gold) == 0:
        raise ValueError("cannot fit a temperature on 0 rows")
    labels = list(range(logprobs.shape[1]))
    result = minimize_scalar(lambda log_t: log_loss(gold, softmax_at(logprobs, np.exp(log_t)), labels=labels),
                             bounds=np.log(TEMPERATURE_BOUNDS), method="bounded", options={"xatol": 1e-9})
    return float(np.exp(result.x))


# ----- error analysis ----------------------------------------------------------------------------------------------
def cut(text: str, width: int = 80) -> str:
    """One line of at most `width` characters; an ellipsis marks a cut."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def confident_mistakes(texts: Sequence[str], gold: np.ndarray, probs: np.ndarray, names: Sequence[str],
                       count: int = 20) -> list[dict]:
    """The `count` wrong predictions made with the highest probability, most confident first."""
    pred, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(pred != gold)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    return [{"index": int(i), "text": cut(texts[i]), "gold": names[gold[i]], "pred": names[pred[i]],
             "p": float(confidence[i])} for i in order]


def accuracy_by_length(lengths: np.ndarray, correct: dict[str, np.ndarray]) -> list[dict]:
    """Accuracy of each system per review-length quartile (characters): bucket q holds lengths up to the q-th
    quartile; ties at an edge can leave a bucket empty, and empty buckets are left out."""
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return []
    bucket = np.searchsorted(np.quantile(lengths, [0.25, 0.5, 0.75]), lengths, side="left")
    return [{"quartile": q + 1, "chars": [int(lengths[rows].min()), int(lengths[rows].max())], "n": int(rows.sum()),
             "accuracy": {name: float(c[rows].mean()) for name, c in correct.items()}}
            for q in range(4) if (rows := bucket == q).any()]
