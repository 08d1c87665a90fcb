"""The evaluation's words: report.md and the lines printed after an evaluation, rendered from the metrics dict that
sft/evaluation.py writes to metrics.json (pure functions; nothing here computes a figure).

Every figure is shown with its 95% bootstrap interval, the model next to the TF-IDF baseline with the paired verdict,
so that a reader never compares two bare point estimates.
"""

from __future__ import annotations

from typing import Any

from sft import stats as S

KEYS = ("accuracy", "f1", "auc")
METHOD = (f"[a, b] = {S.CONFIDENCE:.0%} percentile bootstrap interval ({S.RESAMPLES:,} resamples of the rows, seed "
          f"{S.SEED}, `scipy.stats.bootstrap`). Model vs baseline: McNemar's exact test (binomial test on the rows "
          "only one of them gets right) decides the verdict at the 5% level; the difference in accuracy has a paired "
          "bootstrap interval (the same resampled rows for both). A figure without an interval: fewer than 2 rows, or "
          "some resample lacks a class (AUC undefined).")


def fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def cell(m: dict, key: str) -> str:
    """`0.9123 [0.8960, 0.9270]` when `<key>_ci` is there, the bare figure otherwise, `-` when undefined."""
    ci = m.get(f"{key}_ci")
    if not isinstance(m.get(key), (int, float)):
        return "-"
    return f"{m[key]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|---" * len(header) + "|", *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def _sets(metrics: dict) -> list[tuple[str, dict]]:
    """(folder prefix, set metrics): the split first (its files in the report's folder), then each --eval_set."""
    return [("", metrics), *((f"{name}/", m) for name, m in (metrics.get("eval_sets") or {}).items())]


def _subsets(m: dict) -> list[tuple[str, dict, dict | None, dict | None]]:
    """(rows, model, baseline, comparison) for all rows, then for the clean rows when computed."""
    baseline, comparison = m.get("baseline") or {}, m.get("comparison") or {}
    out = [("all", m, baseline or None, comparison or None)]
    if m.get("clean") and m["clean"]["n"] < m["n"]:  # no row in train: the clean rows are all rows
        out.append(("clean", m["clean"], baseline.get("clean"), comparison.get("clean")))
    return out


def results_table(metrics: dict) -> list[str]:
    rows = []
    for _, m in _sets(metrics):
        for subset, model, baseline, _ in _subsets(m):
            for system, figures in (("model", model), ("TF-IDF + LR", baseline)):
                if figures:
                    rows.append((m["set"], subset, system, figures["n"], *(cell(figures, k) for k in KEYS),
                                 fmt(figures.get("ece")), fmt(figures.get("brier"))))
    return _table(("set", "rows", "system", "n", "accuracy [95% CI]", "macro F1 [95% CI]", "AUC [95% CI]", "ECE",
                   "Brier"), rows)


def verdict_text(c: dict) -> str:
    ci = c.get("accuracy_difference_ci")
    interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
    return (f"{c['verdict']} (accuracy {c['accuracy_difference']:+.4f}{interval}, McNemar p = "
            f"{c['mcnemar_p']:.2g})") if c["n"] else "no rows"


def comparison_table(metrics: dict) -> list[str]:
    rows = []
    for _, m in _sets(metrics):
        for subset, _, _, c in _subsets(m):
            if c and c["n"]:
                ci = c["accuracy_difference_ci"]
                rows.append((m["set"], subset, c["n"], fmt(c["model_accuracy"]), fmt(c["baseline_accuracy"]),
                             f"{c['accuracy_difference']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""),
                             f"{c['mcnemar_p']:.2g}", f"**{c['verdict']}**",
                             f"{c['disagreements']} ({c['disagreements'] / c['n']:.1%})", c["model_only_right"],
                             c["baseline_only_right"], c["disagreements_neither_right"]))
    if not rows:
        return []
    return ["## Model vs TF-IDF baseline (paired, on the same rows)", "", *_table(
        ("set", "rows", "n", "model acc.", "baseline acc.", "difference [95% CI]", "McNemar p", "verdict",
         "disagree", "model right", "baseline right", "neither"), rows), "",
        "disagree: rows where the two predict different labels; then who is right.", ""]


def calibration_section(metrics: dict) -> list[str]:
    t = metrics.get("temperature")
    if not t:
        return []
    rows = [(m["set"], *(fmt(m["calibration"][k]) for k in ("ece_before", "ece_after", "brier_before", "brier_after",
                                                             "log_loss_before", "log_loss_after")))
            for _, m in _sets(metrics)]
    # T to 3 digits: its own uncertainty is larger, and float noise (1 vs 2 processes) never shows
    return [f"## Calibration: temperature {t['temperature']:.3g}", "",
            f"Fitted on the {t['fitted_on']} split (n = {t['n']}) by log-loss ({t['log_loss_before']:.4f} → "
            f"{t['log_loss_after']:.4f} there); saved as calibration.json, which `SentimentPredictor` applies. "
            "Accuracy, F1 and the predicted labels do not change; `calibrated_probs` in predictions.jsonl.", "",
            *_table(("set", "ECE before", "ECE after", "Brier before", "Brier after", "log-loss before",
                     "log-loss after"), rows), ""]


def error_section(m: dict) -> list[str]:
    errors = m.get("errors") or {}
    buckets = errors.get("accuracy_by_length") or []
    systems = list(buckets[0]["accuracy"]) if buckets else []
    lines = ["#### Accuracy by review length (quartiles, characters)", "", *_table(
        ("quartile", "characters", "n", *systems),
        [(b["quartile"], f"{b['chars'][0]}–{b['chars'][1]}", b["n"], *(fmt(b["accuracy"][s]) for s in systems))
         for b in buckets]), ""]
    mistakes = errors.get("confident_mistakes") or []
    lines += [f"#### The {len(mistakes)} most confident mistakes ({errors.get('probabilities', 'raw')} "
              "probabilities)", ""]
    lines += _table(("row", "text", "gold", "predicted", "p"), [
        (e["index"], _escape(e["text"]), e["gold"], e["pred"], f"{e['p']:.4f}") for e in mistakes]) if mistakes else [
        "None: every row is right."]
    return [*lines, ""]


def set_section(prefix: str, m: dict, names: list[str]) -> list[str]:
    mass = m["label_mass"]
    lines = [f"### {m['set']} ({m['source']}, {m['n']} rows)", "",
             f"Probability on the label words (label mass): mean {fmt(mass['mean'], '.3g')}, "
             f"5th percentile {fmt(mass['p05'], '.3g')}, min {fmt(mass['min'], '.3g')}. Confusion matrix of the model "
             "(rows: gold, columns: predicted):", "",
             *_table(("gold \\ predicted", *names), [(n, *row) for n, row in zip(names, m["confusion_matrix"],
                                                                                  strict=True)]), ""]
    lines += error_section(m)
    return [*lines, f"![ROC]({prefix}roc.png) ![confusion matrix]({prefix}confusion.png) "
                    f"![reliability]({prefix}reliability.png)", ""]


def report_markdown(metrics: dict, names: list[str]) -> str:
    sets = _sets(metrics)
    extra = f" + {len(sets) - 1} eval set{'s' if len(sets) > 2 else ''}" if len(sets) > 1 else ""
    lines = [f"# Evaluation: {metrics['split']} split{extra}", "",
             f"- adapter: `{metrics['adapter'] or 'none (zero-shot)'}`; base: `{metrics['base_model']}`; "
             f"processes: {metrics['world_size']}",
             "- clean = rows whose text does not occur in the train split; a set's clean rows are shown where some "
             "of its rows do occur there" if metrics.get("clean") else "- clean subset: not computed (no train split)",
             f"- {METHOD}",
             *(f"- {m['set']}: `{m['source']}`, files in `{prefix}`" for prefix, m in sets[1:]), "",
             "## Results", "", *results_table(metrics), ""]
    lines += comparison_table(metrics) + calibration_section(metrics) + ["## Per set", ""]
    for prefix, m in sets:
        lines += set_section(prefix, m, names)
    return "\n".join(lines)


def summary_lines(metrics: dict) -> list[str]:
    """Per set: the model's and the baseline's figures with intervals, on all rows and on the clean rows, the
    verdict of the paired comparison and, when calibrated, the ECE before and after."""
    model = "fine-tuned model" if metrics.get("adapter") else "zero-shot model"
    lines = []
    for _, m in _sets(metrics):
        title = f"{metrics['split']} split" if m is metrics else f"{m['set']} ({m['source']})"
        lines.append(f"{title}: {m['n']} rows".ljust(41) + " " + "".join(f"{h:<26}" for h in (
            "accuracy [95% CI]", "macro F1 [95% CI]", "AUC [95% CI]")).rstrip())
        for subset, figures, baseline, comparison in _subsets(m):
            suffix = f", clean (n={figures['n']})" if subset == "clean" else ""
            for name, f in ((model, figures), ("TF-IDF + LR baseline", baseline)):
                if f:
                    lines.append(f"  {name + suffix:<40}" + "".join(f"{cell(f, k):<26}" for k in KEYS).rstrip())
            if comparison:
                lines.append(f"  vs baseline{suffix}: {verdict_text(comparison)}")
        if m.get("calibration"):
            c = m["calibration"]
            lines.append(f"  calibration: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f} "
                         f"(temperature {c['temperature']:.3g}, fitted on the validation split)")
    return lines
