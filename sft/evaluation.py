"""Evaluating a training output (or a base model zero-shot) on a data split: one options object in, metrics out.

eval/evaluate.py is the command line over `evaluate`; sft/train.py's do_predict calls `evaluate` too, so the
figures printed after training are the ones any later evaluation of final/ reproduces. Under `accelerate launch`
every process scores its share of the rows (sft.ranks.shard_and_gather) and the main process writes: metrics.json,
predictions.jsonl, report.md, roc.png, confusion.png, reliability.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sft import artifacts
from sft import metrics as M
from sft.scoring import ZERO_SHOT_MAX_LENGTH, Scores

logger = logging.getLogger(__name__)

SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}
SOURCE_KEYS = ("data_dir", "train_file", "validation_file", "test_file", "dataset_name")
# recipe keys not inherited: an evaluation scores the whole split (use max_samples to cap it)
NOT_INHERITED = ("max_eval_samples", "rejects_file")


@dataclass
class EvalOptions:
    """What to evaluate, on which data, how; the flags of eval/evaluate.py."""

    adapter: str  # training output directory, or "none" to score `base` zero-shot
    split: str = "test"
    base: str | None = None
    data_dir: str | None = None
    dataset: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    out: str | None = None
    batch_size: int = 32
    max_tokens_per_batch: int | None = None
    max_samples: int | None = None
    max_length: int | None = None
    dtype: str = "auto"
    no_baseline: bool = False
    no_progress: bool = False

    def __post_init__(self) -> None:
        self.split = SPLIT_ALIASES.get(self.split, self.split)
        if self.split not in ("train", "validation", "test"):
            raise ValueError(f"--split: expected train, validation (dev) or test, got {self.split!r}")

    @property
    def adapter_dir(self) -> str | None:
        return None if self.adapter.lower() == "none" else self.adapter


# ----- inputs -----------------------------------------------------------------------------------------------------
def data_arguments(opts: EvalOptions):
    """DataArguments from the options; without a data option, from the adapter's recipe.yaml data keys (relative
    paths found from where training ran when not from here)."""
    from sft.data import DataArguments

    fields = {f.name for f in dataclasses.fields(DataArguments)} - set(NOT_INHERITED)
    adapter = opts.adapter_dir
    recipe = artifacts.read_recipe(adapter) if adapter else {}
    values = {k: v for k, v in recipe.items() if k in fields}
    workdir = Path((artifacts.RunInfo.load(adapter).working_dir if recipe else None) or ".")
    for key in set(SOURCE_KEYS) - {"dataset_name"}:
        if values.get(key) and not Path(values[key]).exists() and (workdir / values[key]).exists():
            values[key] = str(workdir / values[key])
    flags = {"data_dir": opts.data_dir, "dataset_name": opts.dataset, "train_file": opts.train_file,
             "validation_file": opts.validation_file, "test_file": opts.test_file}
    if any(flags.values()):  # the options name the data source: the recipe's source keys no longer apply
        values = {k: v for k, v in values.items() if k not in SOURCE_KEYS}
        values.update({k: v for k, v in flags.items() if v})
    return DataArguments(**values)


def load_data(data_args, split: str, max_samples: int | None):
    """(texts, gold, (train texts, train labels) or None): the split, plus train when the source has one."""
    from sft.data import load_splits, resolve_files

    files = resolve_files(data_args)
    hub = not files and not data_args.data_dir
    with_train = split != "train" and ("train" in files or hub)
    dsd = load_splits(data_args, (split, "train") if with_train else (split,))
    rows = dsd[split]
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    train = (list(dsd["train"]["text"]), list(dsd["train"]["label"])) if with_train else None
    return list(rows["text"]), np.asarray(rows["label"], dtype=int), train


# ----- outputs ----------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def report_markdown(metrics: dict, names: list[str]) -> str:
    rows = [("model", "all", metrics), ("model", "clean", metrics.get("clean"))]
    if metrics.get("baseline"):
        baseline = metrics["baseline"]
        rows += [("TF-IDF + LR", "all", baseline), ("TF-IDF + LR", "clean", baseline.get("clean"))]
    lines = [
        f"# Evaluation: {metrics['split']} split",
        "",
        f"- adapter: `{metrics['adapter'] or 'none (zero-shot)'}`; base: `{metrics['base_model']}`; "
        f"processes: {metrics['world_size']}",
        "- clean = rows whose text does not occur in the train split"
        + ("" if metrics.get("clean") else " (no train split: not computed)"),
        "",
        "| system | rows | n | accuracy | macro F1 | AUC | ECE | Brier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, subset, m in rows:
        if m:
            lines.append(f"| {system} | {subset} | {m['n']} | " + " | ".join(
                _fmt(m[k]) for k in ("accuracy", "f1", "auc", "ece", "brier")) + " |")
    mass = metrics["label_mass"]
    lines += ["", f"Probability on the label words (label mass): mean {_fmt(mass['mean'], '.3g')}, "
              f"5th percentile {_fmt(mass['p05'], '.3g')}, min {_fmt(mass['min'], '.3g')}.", "",
              "Confusion matrix of the model (rows: gold, columns: predicted):", "",
              "| gold \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, metrics["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(c) for c in row) + " |")
    lines += ["", "![ROC](roc.png) ![confusion matrix](confusion.png) ![reliability](reliability.png)", ""]
    return "\n".join(lines)


def summary_lines(metrics: dict) -> list[str]:
    """The model's and the baseline's figures side by side: all rows, then the rows whose text is not in train."""
    lines = [f"{metrics['split']} split: {metrics['n']} rows{'':<22}{'accuracy':>9}{'macro F1':>10}{'AUC':>8}"]
    systems = [("fine-tuned model" if metrics.get("adapter") else "zero-shot model", metrics),
               ("TF-IDF + LR baseline", metrics.get("baseline") or {})]
    clean = metrics.get("clean")
    subsets = [("", None)] + ([(", clean", "clean")] if clean and clean["n"] < metrics["n"] else [])
    for suffix, key in subsets:
        for name, figures in systems:
            m = figures.get(key) if key else figures
            if m:
                label = f"{name}{suffix}" + (f" (n={m['n']})" if key else "")
                lines.append(f"  {label:<40}" + "".join(f"{_fmt(m[k]):>{w}}" for k, w in
                                                        (("accuracy", 9), ("f1", 10), ("auc", 8))))
    return lines


def write_outputs(out: Path, metrics: dict, texts, gold, logprobs, verbalizers, in_train, baseline_probs) -> None:
    out.mkdir(parents=True, exist_ok=True)
    scores = Scores(tuple(verbalizers), logprobs)
    lines = []
    for i, text in enumerate(texts):
        row = scores.row(i)
        lines.append(json.dumps({
            "index": i, "text": text, "gold": int(gold[i]), "gold_label": verbalizers[gold[i]],
            "pred": row["label_id"], "pred_label": row["label"], "probs": row["probs"],
            "label_mass": row["label_mass"], "in_train": None if in_train is None else bool(in_train[i]),
        }, ensure_ascii=False))
    artifacts.write_text_atomic(out / artifacts.PREDICTIONS_FILE, "".join(line + "\n" for line in lines))
    artifacts.write_json(out / artifacts.METRICS_FILE, metrics)
    artifacts.write_text_atomic(out / artifacts.REPORT_FILE, report_markdown(metrics, list(verbalizers)))
    curves = {"model": scores.probs} | ({"TF-IDF + LR": baseline_probs} if baseline_probs is not None else {})
    plots = {name: out / file for name, file in artifacts.PLOT_FILES.items()}
    M.plot_roc(gold, curves, plots["roc"])
    M.plot_confusion(metrics["confusion_matrix"], verbalizers, plots["confusion"])
    M.plot_reliability(gold, scores.probs, plots["reliability"])


# ----- metrics ----------------------------------------------------------------------------------------------------
def summarize(run: dict, gold, logprobs, names, in_train, baseline_probs) -> dict:
    """metrics.json: the model on all rows and on the clean rows (text not in train), and the baseline on both."""
    scores = Scores(tuple(names), logprobs)
    metrics = {**run, **M.classification_metrics(gold, scores.probs, names),
               "label_mass": M.label_mass_stats(scores.label_mass), "clean": None, "baseline": None}
    clean = ~in_train if in_train is not None else None
    if clean is not None:
        metrics["clean"] = {**M.classification_metrics(gold[clean], scores.probs[clean], names),
                            "label_mass": M.label_mass_stats(scores.label_mass[clean])}
        logger.info("%d of %d rows also occur in train; clean subset: %d rows", (~clean).sum(), len(gold), clean.sum())
    if baseline_probs is not None:
        metrics["baseline"] = M.classification_metrics(gold, baseline_probs, names)
        if clean is not None:
            metrics["baseline"]["clean"] = M.classification_metrics(gold[clean], baseline_probs[clean], names)
    return metrics


# ----- the evaluation ---------------------------------------------------------------------------------------------
def load_scorer(opts: EvalOptions, device):
    """(model, tokenizer, template): the adapter's template, or the default one for a zero-shot base; --max_length
    replaces the template's token limit."""
    from sft.model import load_for_inference

    model, tokenizer, template = load_for_inference(opts.adapter_dir, opts.base, opts.dtype, device)
    if opts.max_length is not None or opts.adapter_dir is None:
        template = dataclasses.replace(template, max_length=opts.max_length or ZERO_SHOT_MAX_LENGTH)
    return model, tokenizer, template


def score_rows(state, opts: EvalOptions, scorer, texts: list[str]) -> np.ndarray:
    """Label log-probs (n, classes) in row order on every rank, each rank scoring its share."""
    from sft.ranks import shard_and_gather
    from sft.scoring import score_texts

    model, tokenizer, template = scorer
    progress = not opts.no_progress and state.is_local_main_process

    def score(rows: list[int]) -> np.ndarray:
        return score_texts(model, tokenizer, template, [texts[i] for i in rows], batch_size=opts.batch_size,
                           max_tokens_per_batch=opts.max_tokens_per_batch, progress=progress).logprobs

    return shard_and_gather(state, len(texts), score).reshape(len(texts), template.num_labels)


def baseline(opts: EvalOptions, train, texts: list[str], num_classes: int) -> np.ndarray | None:
    """TF-IDF + logistic regression fitted on the train split, when there is one and it was not switched off."""
    if opts.no_baseline or train is None:
        logger.info("baseline skipped: %s", "--no_baseline" if opts.no_baseline else "no train split to fit it on")
        return None
    return M.tfidf_baseline(*train, texts, num_classes=num_classes)


def evaluate(opts: EvalOptions) -> dict | None:
    """Run the evaluation; returns metrics on the main process, None on the others (after the main one wrote)."""
    from sft.ranks import process_state

    state = process_state()
    adapter = opts.adapter_dir
    if adapter is not None:
        recorded = artifacts.RunInfo.load(adapter).base_model  # a clear error before anything is loaded
    elif opts.out is None:
        raise ValueError("--adapter none needs --out DIR")
    out = Path(opts.out) if opts.out else artifacts.eval_dir(adapter, opts.split)
    texts, gold, train = load_data(data_arguments(opts), opts.split, opts.max_samples)
    logger.info("%s split: %d rows%s", opts.split, len(texts), "" if train else " (no train split available)")
    scorer = load_scorer(opts, state.device)
    names = list(scorer[2].verbalizers)
    if len(gold) and gold.max() >= len(names):
        raise ValueError(f"the data has label {gold.max()} but the template has only classes {names}")
    logprobs = score_rows(state, opts, scorer, texts)
    metrics = None
    if state.is_main_process:
        seen = set(train[0]) if train is not None else set()
        in_train = None if train is None else np.array([t in seen for t in texts], dtype=bool)
        run = {"split": opts.split, "adapter": adapter, "world_size": state.num_processes,
               "base_model": opts.base or (recorded if adapter is not None else None)}  # as named, not a cache folder
        baseline_probs = baseline(opts, train, texts, len(names))
        metrics = summarize(run, gold, logprobs, names, in_train, baseline_probs)
        write_outputs(out, metrics, texts, gold, logprobs, names, in_train, baseline_probs)
        if adapter is not None and (Path(adapter) / artifacts.RECIPE_FILE).is_file():  # a training output: its card
            from sft.model_card import add_eval_results

            add_eval_results(adapter, opts.split, metrics)
        logger.info("outputs written to %s", out)
    state.wait_for_everyone()
    return metrics
