"""Classification metrics, the TF-IDF baseline and the evaluation plots: pure functions on arrays.

Metrics use scikit-learn only (the `evaluate` library fetches metric scripts from the hub and fails offline).
Every returned value is JSON-ready (floats, ints, lists, None where a metric is undefined).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sft.data import DEFAULT_LABEL_NAMES

ECE_BINS = 10
# English names for the plots when no CJK font is installed (DejaVu has no Chinese glyphs).
ENGLISH_NAMES = {spellings[0]: spellings[1] for spellings in DEFAULT_LABEL_NAMES}
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "AR PL UMing CN")


def expected_calibration_error(gold: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE over `n_bins` equal-width bins of the top-class probability: sum_b |B|/n * |acc(B) - conf(B)|."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == gold
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)  # confidence 1.0 goes to the last bin
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def brier_score(gold: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of sum_k (p_k - onehot_k)^2 (0 is perfect, 2 is worst)."""
    onehot = np.eye(probs.shape[1])[gold]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def auc_score(gold: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC of p(class 1) for two classes, macro one-vs-rest otherwise; None when a class is absent."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(gold)) < probs.shape[1]:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(gold, probs[:, 1]))
    return float(roc_auc_score(gold, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))


def classification_metrics(gold: Sequence[int], probs: np.ndarray, label_names: Sequence[str]) -> dict:
    """Accuracy, macro F1, per-class P/R/F1, AUC, confusion matrix, ECE and Brier of `probs` (n, classes)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    gold, probs = np.asarray(gold, dtype=int), np.asarray(probs, dtype=float)
    labels = list(range(len(label_names)))
    if probs.ndim != 2 or probs.shape != (len(gold), len(label_names)):
        raise ValueError(f"probs must have shape ({len(gold)}, {len(label_names)}), got {probs.shape}")
    if len(gold) == 0:
        return {"n": 0, "accuracy": None, "f1": None, "auc": None, "ece": None, "brier": None,
                "per_class": {}, "confusion_matrix": [[0] * len(labels) for _ in labels]}
    pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, pred)),
        "f1": float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
        "auc": auc_score(gold, probs),
        "ece": expected_calibration_error(gold, probs),
        "brier": brier_score(gold, probs),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(gold, pred, labels=labels).tolist(),  # rows: gold, columns: predicted
    }


def label_mass_stats(mass: Sequence[float], threshold: float = 0.5) -> dict:
    """How much probability the model puts on the label words: mean, quantiles, share of rows below `threshold`."""
    mass = np.asarray(mass, dtype=float)
    if len(mass) == 0:
        return {"mean": None, "min": None, "p05": None, "median": None, f"frac_below_{threshold}": None}
    return {
        "mean": float(mass.mean()),
        "min": float(mass.min()),
        "p05": float(np.quantile(mass, 0.05)),
        "median": float(np.median(mass)),
        f"frac_below_{threshold}": float((mass < threshold).mean()),
    }


def tfidf_baseline(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    test_texts: Sequence[str],
    C: float = 10.0,
    num_classes: int | None = None,
) -> np.ndarray:
    """Character 1-3-gram TF-IDF + logistic regression; returns test probabilities (n, num_classes), with zero
    columns for classes absent from train (num_classes defaults to the largest train label + 1).

    C=10 was picked on the ChnSentiCorp dev split (dev acc 0.92; test acc 0.945, AUC 0.984).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    features = vectorizer.fit_transform(list(train_texts))
    classifier = LogisticRegression(C=C, max_iter=1000).fit(features, list(train_labels))
    probs = classifier.predict_proba(vectorizer.transform(list(test_texts)))
    # predict_proba has a column per class seen in training; map them back to class indices
    out = np.zeros((len(test_texts), num_classes or int(classifier.classes_.max()) + 1))
    out[:, classifier.classes_] = probs
    return out


# ----- plots (Agg backend: no display needed) ------------------------------------------------------------------
def _cjk_font() -> str | None:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def display_names(label_names: Sequence[str]) -> tuple[list[str], str | None]:
    """Tick labels that the installed fonts can draw, and the CJK font to use (None: ASCII fallbacks)."""
    if all(name.isascii() for name in label_names):
        return list(label_names), None
    font = _cjk_font()
    if font is not None:
        return list(label_names), font
    english = [ENGLISH_NAMES.get(name, name) for name in label_names]
    return [f"{i} ({e})" if e.isascii() else f"class {i}" for i, e in enumerate(english)], None


@contextmanager
def _figure(path: str | Path, font: str | None = None):
    """Yield (fig, ax); on exit save the PNG atomically (name.tmp, then rename) and close the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rc = {"font.sans-serif": [font, *plt.rcParams["font.sans-serif"]]} if font else {}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with plt.rc_context(rc):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        try:
            yield fig, ax
            fig.tight_layout()
            fig.savefig(tmp, dpi=110, format="png")
        finally:
            plt.close(fig)
    tmp.replace(path)


def plot_roc(gold: Sequence[int], curves: dict[str, np.ndarray], path: str | Path, positive: int = 1) -> Path:
    """ROC curves of p(class `positive`) for each named probability matrix (e.g. model and baseline)."""
    from sklearn.metrics import RocCurveDisplay

    is_positive = np.asarray(gold) == positive
    with _figure(path) as (_, ax):
        if 0 < is_positive.sum() < len(is_positive):  # a ROC curve needs both classes
            for name, probs in curves.items():
                shown = RocCurveDisplay.from_predictions(is_positive, probs[:, positive], ax=ax)
                shown.line_.set_label(f"{name} (AUC {shown.roc_auc:.3f})")  # sklearn's own label rounds to 0.01
            ax.legend(loc="lower right")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
               title=f"ROC (class {positive} = positive, n={len(is_positive)})")
    return Path(path)


def plot_confusion(matrix: Sequence[Sequence[int]], label_names: Sequence[str], path: str | Path) -> Path:
    """Counts per (gold, predicted) cell; Chinese label names are shown only when a CJK font is installed."""
    from sklearn.metrics import ConfusionMatrixDisplay

    names, font = display_names(label_names)
    with _figure(path, font) as (_, ax):
        ConfusionMatrixDisplay(np.asarray(matrix), display_labels=names).plot(ax=ax, cmap="Blues", colorbar=False)
        ax.set(xlabel="predicted", ylabel="gold", title="confusion matrix")
    return Path(path)


def plot_reliability(gold: Sequence[int], probs: np.ndarray, path: str | Path, n_bins: int = ECE_BINS,
                     calibrated: np.ndarray | None = None) -> Path:
    """Accuracy vs mean confidence (top-class probability) per equal-width bin, with the bin counts; with
    `calibrated` (the temperature-scaled probabilities) its curve too, and the ECE before and after."""
    from sklearn.calibration import CalibrationDisplay

    gold, probs = np.asarray(gold), np.asarray(probs)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == gold
    ece = f"{expected_calibration_error(gold, probs, n_bins):.3f}" if len(gold) else "nan"
    with _figure(path) as (_, ax):
        if len(gold):
            shown = CalibrationDisplay.from_predictions(correct, confidence, n_bins=n_bins, ax=ax, ref_line=False,
                                                        name="accuracy" if calibrated is None else "raw")
            # the bin counts, binned as calibration_curve bins (right-closed edges), one per plotted (non-empty) bin
            bins = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], confidence)
            counts = np.bincount(bins, minlength=n_bins)
            for x, acc, count in zip(shown.prob_pred, shown.prob_true, counts[counts > 0], strict=True):
                ax.text(x, acc + 0.015, str(count), ha="center", va="bottom", fontsize=7)
        if len(gold) and calibrated is not None:
            calibrated = np.asarray(calibrated)
            CalibrationDisplay.from_predictions(correct, calibrated.max(axis=1), n_bins=n_bins, ax=ax, ref_line=False,
                                                name="temperature-scaled", marker="o", linestyle="--")
            ece += f" → {expected_calibration_error(gold, calibrated, n_bins):.3f}"
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.08),
               title=f"reliability (ECE {ece}, n={len(gold)})")
        ax.legend(loc="upper left")
    return Path(path)


def plot_loss_curve(log_history: list[dict], path: str | Path) -> Path:
    """Training loss (and eval loss / dev accuracy when logged) against the step."""
    with _figure(path) as (_, ax):
        for key, style in (("loss", "-"), ("eval_loss", "o-")):
            points = [(h["step"], h[key]) for h in log_history if key in h]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=key)
        ax.set(xlabel="step", ylabel="loss", title="training curve")
        accuracy = [(h["step"], h["eval_accuracy"]) for h in log_history if "eval_accuracy" in h]
        if accuracy:
            ax2 = ax.twinx()
            ax2.plot(*zip(*accuracy, strict=True), "s--", color="tab:green", label="eval_accuracy")
            ax2.set(ylabel="dev accuracy", ylim=(0, 1))
            ax2.legend(loc="upper right")
        if ax.get_legend_handles_labels()[0]:  # a run shorter than logging_steps logged no loss
            ax.legend(loc="upper left")
    return Path(path)
