"""Sentiment prediction with a trained adapter (or a base model zero-shot): Python API and command line.

    from eval.predict import SentimentPredictor
    predictor = SentimentPredictor(lora_path="outputs/cpu-smollm2-lora/final")
    predictor.predict("房间很干净，服务也很好")
    # {"label": "positive", "label_id": 1, "probs": {"negative": 0.02, "positive": 0.98}}

    python eval/predict.py --lora_path outputs/cpu-smollm2-lora/final --text "房间很干净，服务也很好"
    python eval/predict.py --lora_path outputs/cpu-smollm2-lora/final --file tests/data/formats/train.csv \\
        --output outputs/predictions.jsonl          # .txt (a review per line), .jsonl or .csv with a text column
    python eval/predict.py --lora_path outputs/cpu-smollm2-lora/final --interactive   # empty line quits
    python eval/predict.py --lora_path outputs/cpu-smollm2-lora/final --demo

The predictor is sft/predictor.py; probabilities come from the label scorer (sft/scoring.py), renormalised over the
labels, and temperature-scaled when the adapter holds a calibration.json (`eval/evaluate.py --calibrate`).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from sft.predictor import DEMO_TEXTS, SentimentPredictor

__all__ = ["DEMO_TEXTS", "SentimentPredictor", "main"]  # `from eval.predict import SentimentPredictor` keeps working
logger = logging.getLogger("eval.predict")


def write_jsonl_atomic(path: str, records: list[dict]) -> None:
    from sft.artifacts import write_text_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ----- command line -----------------------------------------------------------------------------------------------
def _line(prediction: dict) -> str:
    probs = "  ".join(f"{label} {p:.4f}" for label, p in prediction["probs"].items())
    return f"{prediction['label']}\t({probs})"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora_path", help="training output directory (adapter or full model)")
    p.add_argument("--base_model_name", help="base model (default: the one recorded in lora_path)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--text", help="classify one review and print JSON")
    mode.add_argument("--interactive", action="store_true", help="read reviews from stdin, one per line")
    mode.add_argument("--demo", action="store_true", help="classify a few built-in reviews")
    mode.add_argument("--file", help="input .txt (one review per line), or .tsv/.csv/.jsonl/.json/.parquet with a "
                      "text column (text/text_a/review/sentence; a label column is not needed)")
    p.add_argument("--output", help="output .jsonl for --file (one row per input row, in input order)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--verbose", action="store_true", help="library INFO logs and the warnings filtered by default")
    args = p.parse_args(argv)
    if args.lora_path is None and args.base_model_name is None:
        p.error("give --lora_path and/or --base_model_name")
    if args.file and not args.output:
        p.error("--file needs --output OUT.jsonl")
    return args


def run(args: argparse.Namespace) -> None:
    from sft.data import read_texts

    inputs, skipped = read_texts(args.file) if args.file else ([], 0)  # a bad input file fails before loading
    predictor = SentimentPredictor(args.base_model_name, args.lora_path, args.device, args.dtype, args.batch_size)
    if args.text is not None:
        print(json.dumps(predictor.predict(args.text), ensure_ascii=False))
    elif args.demo:
        for text, prediction in zip(DEMO_TEXTS, predictor.predict_batch(list(DEMO_TEXTS)), strict=True):
            print(f"{_line(prediction)}\t{text}")
    elif args.interactive:
        if sys.stdin.isatty():
            print("one review per line; an empty line or Ctrl-D quits", file=sys.stderr)
        for line in sys.stdin:
            if not line.strip():
                break
            print(_line(predictor.predict(line.strip())), flush=True)
    else:
        predictions = predictor.predict_batch([text for _, text in inputs], progress=True)
        records = [{"line": n, "text": text, **pred} for (n, text), pred in zip(inputs, predictions, strict=True)]
        write_jsonl_atomic(args.output, records)
        note = f"; skipped {skipped} blank entr{'y' if skipped == 1 else 'ies'}" if skipped else ""
        print(f"wrote {len(records)} predictions to {args.output}{note}", file=sys.stderr)


def main(argv=None) -> int:
    from sft.quiet import setup_logging
    from sft.sources import check_hub_before_library_imports

    args = parse_args(argv)
    setup_logging(args.verbose)
    check_hub_before_library_imports()
    logging.getLogger("eval").setLevel(logging.WARNING)  # stdout is the predictions; stderr only what matters
    try:
        run(args)
    except (OSError, ValueError) as e:  # missing/unreadable files, base mismatch, bad input rows: one line
        print(f"error: {'; '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
