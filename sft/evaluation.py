"""Evaluating a training output (or a base model zero-shot) on a data split and on any number of other labelled
files: one options object in, metrics out.

eval/evaluate.py is the command line over `evaluate`; sft/train.py's do_predict calls `evaluate` too, so the
figures printed after training are the ones any later evaluation of final/ reproduces. The model is loaded once and
scores every set; under `accelerate launch` every process scores its share of each set's rows
(sft.ranks.shard_and_gather) and the main process writes. The TF-IDF baseline is fitted once on the train split and
scores every set. Each figure comes with a bootstrap interval, the model is compared with the baseline on the same
rows (sft/stats.py), and `calibrate` fits a temperature on the dev split.

Outputs: the split's metrics.json, predictions.jsonl and plots (roc.png, confusion.png, reliability.png) in the
output folder, each --eval_set's in a subfolder named after it, and one report.md over all of them (sft/eval_report.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sft import artifacts
from sft import metrics as M
from sft import stats as S
from sft.eval_report import report_markdown
from sft.scoring import ZERO_SHOT_MAX_LENGTH, Scores

logger = logging.getLogger(__name__)

SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}
SOURCE_KEYS = ("data_dir", "train_file", "validation_file", "test_file", "dataset_name")
# recipe keys not inherited: an evaluation scores the whole split (use max_samples to cap it)
NOT_INHERITED = ("max_eval_samples", "rejects_file")
SET_NAME = re.compile(r"^[A-Za-z0-9][\w-]*$")  # a --eval_set name is also the name of its output folder


def parse_eval_set(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); NAME is a folder name of letters, digits, '_' and '-'."""
    name, sep, path = spec.partition("=")
    if not sep or not SET_NAME.match(name) or not path:
        raise ValueError(f"--eval_set: expected NAME=PATH with NAME made of letters, digits, _ and -, got {spec!r}")
    return name, path


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
    eval_set: list[str] = field(default_factory=list)  # "NAME=PATH": more labelled files, scored by the same model
    out: str | None = None
    batch_size: int = 32
    max_tokens_per_batch: int | None = None
    max_samples: int | None = None  # the first N rows of every set (and of the dev split that --calibrate uses)
    max_length: int | None = None
    dtype: str = "auto"
    calibrate: bool = False  # fit a temperature on the dev split; calibration.json with the report and the adapter
    no_baseline: bool = False
    no_progress: bool = False

    def __post_init__(self) -> None:
        self.split = SPLIT_ALIASES.get(self.split, self.split)
        if self.split not in ("train", "validation", "test"):
            raise ValueError(f"--split: expected train, validation (dev) or test, got {self.split!r}")
        names = [parse_eval_set(spec)[0] for spec in self.eval_set or ()]
        if clash := next((n for n in names if names.count(n) > 1 or n == self.split), None):
            raise ValueError(f"--eval_set: the name {clash!r} is used twice (the split is named {self.split!r})")

    @property
    def adapter_dir(self) -> str | None:
        return None if self.adapter.lower() == "none" else self.adapter


@dataclass
class EvalSet:
    """One evaluated set (the split or an --eval_set file), filled in as the evaluation goes."""

    name: str
    source: str  # "test split" or the file it was read from
    texts: list[str]
    gold: np.ndarray
    logprobs: np.ndarray | None = None  # (n, classes) label log-probs of the model
    baseline_probs: np.ndarray | None = None  # (n, classes) of the TF-IDF baseline, when there is one
    in_train: np.ndarray | None = None  # text also in the train split (None: no train split to compare with)


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


def load_data(data_args, splits: tuple[str, ...], max_samples: int | None):
    """({split: (texts, gold)}, (train texts, train labels) or None): the splits, plus train when the source has one
    (and it is not itself evaluated: then there is no clean subset and no baseline)."""
    from sft.data import load_splits, resolve_files

    files = resolve_files(data_args)
    hub = not files and not data_args.data_dir
    with_train = "train" not in splits and ("train" in files or hub)
    dsd = load_splits(data_args, (*splits, "train") if with_train else splits)
    rows = {s: dsd[s].select(range(min(max_samples, len(dsd[s])))) if max_samples is not None else dsd[s]
            for s in splits}
    train = (list(dsd["train"]["text"]), list(dsd["train"]["label"])) if with_train else None
    return {s: (list(r["text"]), np.asarray(r["label"], dtype=int)) for s, r in rows.items()}, train


def read_eval_set(spec: str, data_args, max_samples: int | None) -> EvalSet:
    """An --eval_set file in any format sft/data.py reads, with its label spellings and bad-row policy."""
    from sft.data import read_examples

    name, path = parse_eval_set(spec)
    examples, rejects = read_examples(path, data_args.raw_label_names, data_args.on_bad_rows)
    if rejects:
        logger.warning("--eval_set %s: skipped %d bad rows (on_bad_rows=skip), first: %s:%d: %s", name, len(rejects),
                       rejects[0]["file"], rejects[0]["line"], rejects[0]["reason"])
    examples = examples[:max_samples] if max_samples is not None else examples
    return EvalSet(name, path, [e["text"] for e in examples], np.array([e["label"] for e in examples], dtype=int))


def load_sets(opts: EvalOptions, data_args) -> tuple[list[EvalSet], EvalSet | None, tuple | None]:
    """(the split and the --eval_set files, the dev split when calibrating, train or None), all read before any
    model loads, so that a bad file fails fast."""
    from sft.data import resolve_files

    files = resolve_files(data_args)
    if opts.calibrate and files and "validation" not in files:
        raise ValueError("--calibrate fits the temperature on the validation (dev) split, and the data has none "
                         f"(found: {', '.join(sorted(files))}); pass --validation_file or --data_dir")
    if opts.calibrate and opts.split == "validation":
        logger.warning("--calibrate on the validation split: the temperature is fitted on the rows it is scored on")
    splits = tuple(dict.fromkeys((opts.split, "validation") if opts.calibrate else (opts.split,)))
    data, train = load_data(data_args, splits, opts.max_samples)
    sets = [EvalSet(opts.split, f"{opts.split} split", *data[opts.split])]
    sets += [read_eval_set(spec, data_args, opts.max_samples) for spec in opts.eval_set or ()]
    dev = EvalSet("validation", "validation split", *data["validation"]) if opts.calibrate else None
    return sets, dev, train


# ----- metrics ----------------------------------------------------------------------------------------------------
def figures(gold: np.ndarray, probs: np.ndarray, names: list[str]) -> dict:
    """Point estimates (sft/metrics.py) and their bootstrap intervals (sft/stats.py) of one probability matrix."""
    return {**M.classification_metrics(gold, probs, names), **S.intervals(gold, probs)}


def _with_clean(compute, clean: np.ndarray | None, *arrays: np.ndarray) -> dict:
    """compute(*arrays) on all rows, and again on the clean rows under "clean" (None without a train split)."""
    return {**compute(*arrays), "clean": None if clean is None else compute(*(a[clean] for a in arrays))}


def calibration_figures(gold: np.ndarray, logprobs: np.ndarray, names: list[str], temperature: float) -> dict:
    """ECE, Brier and log-loss of the raw and of the temperature-scaled probabilities (accuracy does not change)."""
    from sklearn.metrics import log_loss

    out = {"temperature": temperature}
    for when, t in (("before", 1.0), ("after", temperature)):
        probs = Scores(tuple(names), logprobs, t).probs
        out |= {f"ece_{when}": M.expected_calibration_error(gold, probs), f"brier_{when}": M.brier_score(gold, probs),
                f"log_loss_{when}": float(log_loss(gold, probs, labels=list(range(len(names)))))}
    return out


def fit_calibration(dev: EvalSet, names: list[str], max_length: int | None) -> dict:
    """calibration.json: the temperature fitted on the dev split by log-loss, what it did there, and the token limit
    the rows were scored with (a predictor that truncates harder sees slightly different scores)."""
    temperature = S.fit_temperature(dev.logprobs, dev.gold)
    if not S.TEMPERATURE_BOUNDS[0] * 1.01 < temperature < S.TEMPERATURE_BOUNDS[1] / 1.01:
        logger.warning("fitted temperature %.3g is at the search bound %s", temperature, S.TEMPERATURE_BOUNDS)
    logger.info("temperature %.4f fitted on %d dev rows", temperature, len(dev.gold))
    return {"fitted_on": "validation", "n": len(dev.gold), "max_length": max_length,
            **calibration_figures(dev.gold, dev.logprobs, names, temperature)}


def summarize(es: EvalSet, names: list[str], temperature: float | None) -> dict:
    """One set's metrics: the model on all rows and on the clean rows (text not in train) with intervals, the
    baseline likewise, the paired comparison, calibration before/after, and the error analysis."""
    scores = Scores(tuple(names), es.logprobs)
    clean = None if es.in_train is None else ~es.in_train
    if clean is not None:
        logger.info("%s: %d of %d rows also occur in train; clean subset: %d rows", es.name, (~clean).sum(),
                    len(es.gold), clean.sum())
    metrics = {"set": es.name, "source": es.source, **_with_clean(
        lambda g, p, m: {**figures(g, p, names), "label_mass": M.label_mass_stats(m)},
        clean, es.gold, scores.probs, scores.label_mass), "baseline": None, "comparison": None, "calibration": None}
    if es.baseline_probs is not None:
        metrics["baseline"] = _with_clean(lambda g, p: figures(g, p, names), clean, es.gold, es.baseline_probs)
        metrics["comparison"] = _with_clean(S.compare, clean, es.gold, scores.preds, es.baseline_probs.argmax(axis=1))
    if temperature is not None:
        metrics["calibration"] = calibration_figures(es.gold, es.logprobs, names, temperature)
    shown = Scores(tuple(names), es.logprobs, temperature or 1.0).probs
    correct = {"model": scores.preds == es.gold}
    if es.baseline_probs is not None:
        correct["baseline"] = es.baseline_probs.argmax(axis=1) == es.gold
    metrics["errors"] = {"probabilities": "raw" if temperature is None else "calibrated",
                         "confident_mistakes": S.confident_mistakes(es.texts, es.gold, shown, names),
                         "accuracy_by_length": S.accuracy_by_length(np.array([len(t) for t in es.texts]), correct)}
    return metrics


# ----- outputs ----------------------------------------------------------------------------------------------------
def prediction_lines(es: EvalSet, names: list[str], temperature: float | None) -> str:
    """predictions.jsonl: one row per text in set order, with the calibrated probabilities when calibrating."""
    scores = Scores(tuple(names), es.logprobs)
    calibrated = Scores(tuple(names), es.logprobs, temperature) if temperature is not None else None
    lines = []
    for i, text in enumerate(es.texts):
        row = scores.row(i)
        record = {"index": i, "text": text, "gold": int(es.gold[i]), "gold_label": names[es.gold[i]],
                  "pred": row["label_id"], "pred_label": row["label"], "probs": row["probs"],
                  "label_mass": row["label_mass"], "in_train": None if es.in_train is None else bool(es.in_train[i])}
        if calibrated is not None:
            record["calibrated_probs"] = calibrated.row(i)["probs"]
        if es.baseline_probs is not None:
            record["baseline_pred"] = int(es.baseline_probs[i].argmax())
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def write_set(out: Path, es: EvalSet, metrics: dict, names: list[str], temperature: float | None) -> None:
    """One set's metrics.json, predictions.jsonl and plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_text_atomic(out / artifacts.PREDICTIONS_FILE, prediction_lines(es, names, temperature))
    artifacts.write_json(out / artifacts.METRICS_FILE, metrics)
    probs = Scores(tuple(names), es.logprobs).probs
    curves = {"model": probs} | ({"TF-IDF + LR": es.baseline_probs} if es.baseline_probs is not None else {})
    plots = {name: out / file for name, file in artifacts.PLOT_FILES.items()}
    M.plot_roc(es.gold, curves, plots["roc"])
    M.plot_confusion(metrics["confusion_matrix"], names, plots["confusion"])
    calibrated = None if temperature is None else Scores(tuple(names), es.logprobs, temperature).probs
    M.plot_reliability(es.gold, probs, plots["reliability"], calibrated=calibrated)


def write_all(out: Path, run: dict, sets: list[EvalSet], names: list[str], calibration: dict | None) -> dict:
    """Every set's metrics and files (the split's in `out`, each --eval_set's in `out/NAME`), then the combined
    metrics.json and report.md in `out`, and calibration.json; returns the combined metrics."""
    temperature = calibration["temperature"] if calibration else None
    per_set = {es.name: summarize(es, names, temperature) for es in sets}
    shared = {k: v for k, v in run.items() if k != "split"} | {"temperature": calibration}
    for es in sets[1:]:
        write_set(out / es.name, es, {**shared, **per_set[es.name]}, names, temperature)
    metrics = {**run, **per_set[sets[0].name], "temperature": calibration,
               "eval_sets": {es.name: per_set[es.name] for es in sets[1:]}}
    write_set(out, sets[0], metrics, names, temperature)
    artifacts.write_text_atomic(out / artifacts.REPORT_FILE, report_markdown(metrics, names))
    if calibration is not None:
        artifacts.write_json(out / artifacts.CALIBRATION_FILE, calibration)
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


def add_baseline(opts: EvalOptions, train, sets: list[EvalSet], num_classes: int) -> None:
    """TF-IDF + logistic regression fitted once on the train split (when there is one and it was not switched off),
    scoring every set; also marks each set's rows whose text occurs in train."""
    if train is not None:
        seen = set(train[0])
        for es in sets:
            es.in_train = np.array([t in seen for t in es.texts], dtype=bool)
    if opts.no_baseline or train is None:
        logger.info("baseline skipped: %s", "--no_baseline" if opts.no_baseline else "no train split to fit it on")
        return
    probs = M.tfidf_baseline(*train, [t for es in sets for t in es.texts], num_classes=num_classes)
    for es, part in zip(sets, np.split(probs, np.cumsum([len(es.texts) for es in sets])[:-1]), strict=True):
        es.baseline_probs = part


def check_labels(sets: list[EvalSet], names: list[str]) -> None:
    for es in sets:
        if len(es.gold) and es.gold.max() >= len(names):
            raise ValueError(f"{es.source}: the data has label {es.gold.max()} but the template has only classes "
                             f"{names}")


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
    sets, dev, train = load_sets(opts, data_arguments(opts))
    logger.info("%s", "; ".join(f"{es.source}: {len(es.texts)} rows" for es in sets)
                + ("" if train else " (no train split available)"))
    scorer = load_scorer(opts, state.device)  # once, for every set
    names = list(scorer[2].verbalizers)
    check_labels([*sets, *([dev] if dev else [])], names)
    for es in [*sets, *([dev] if dev else [])]:
        es.logprobs = score_rows(state, opts, scorer, es.texts)
    metrics = None
    if state.is_main_process:
        run = {"split": opts.split, "adapter": adapter, "world_size": state.num_processes,
               "base_model": opts.base or (recorded if adapter is not None else None)}  # as named, not a cache folder
        add_baseline(opts, train, sets, len(names))
        calibration = fit_calibration(dev, names, scorer[2].max_length) if dev else None
        metrics = write_all(out, run, sets, names, calibration)
        if adapter is not None and (Path(adapter) / artifacts.RECIPE_FILE).is_file():  # a training output: its card
            from sft.model_card import add_eval_results

            add_eval_results(adapter, opts.split, metrics)
            if calibration is not None:  # SentimentPredictor applies it from now on
                artifacts.write_json(Path(adapter) / artifacts.CALIBRATION_FILE, calibration)
        logger.info("outputs written to %s", out)
    state.wait_for_everyone()
    return metrics
