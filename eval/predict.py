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

Probabilities come from the same label scorer as evaluation (eval/scoring.py), renormalised over the labels.
"""

import os
import sys

if __name__ == "__main__":  # run as a script: keep eval/ off sys.path, or eval/evaluate.py shadows `evaluate`
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import csv
import dataclasses
import io
import json
import logging
from pathlib import Path

from eval.scoring import ZERO_SHOT_MAX_LENGTH, score_texts

logger = logging.getLogger("eval.predict")

TEXT_FIELDS = ("text", "text_a", "review", "sentence")  # same aliases as the training data (sft/data.py)
DEMO_TEXTS = (
    "房间很干净，服务员态度热情，早餐也很丰富，下次还会再来。",
    "等了一个多小时才上菜，味道一般，价格还贵，不会再来了。",
    "这本书内容充实，翻译流畅，值得一读。",
    "电脑用了三天就黑屏，客服推来推去，非常失望。",
    "物流很快，包装完好，性价比不错。",
)


class SentimentPredictor:
    """Load once, predict many. `lora_path` is a training output directory (LoRA adapter or full model);
    `base_model_name` overrides the base recorded there; with `lora_path=None` the base is scored zero-shot."""

    def __init__(
        self,
        base_model_name: str | None = None,
        lora_path: str | None = None,
        device=None,
        dtype="auto",
        batch_size: int = 16,
    ):
        from sft.model import load_for_inference

        if lora_path is None and base_model_name is None:
            raise ValueError("give lora_path (a training output directory) and/or base_model_name")
        self.model, self.tokenizer, self.template = load_for_inference(lora_path, base_model_name, dtype, device)
        if lora_path is None:
            self.template = dataclasses.replace(self.template, max_length=ZERO_SHOT_MAX_LENGTH)
        self.batch_size = batch_size

    @property
    def labels(self) -> tuple[str, ...]:
        return self.template.verbalizers

    def predict(self, text: str) -> dict:
        return self.predict_batch([text])[0]

    def predict_batch(self, texts: list[str], progress: bool = False) -> list[dict]:
        """One {"label", "label_id", "probs"} per text, in input order."""
        scores = score_texts(self.model, self.tokenizer, self.template, list(texts), batch_size=self.batch_size,
                             progress=progress)
        return [{k: v for k, v in scores.row(i).items() if k != "label_mass"} for i in range(len(scores))]


# ----- input files ------------------------------------------------------------------------------------------------
def _pick_field(names, where: str) -> str:
    lowered = {str(n).strip().lower(): n for n in names}
    found = next((lowered[f] for f in TEXT_FIELDS if f in lowered), None)
    if found is None:
        raise ValueError(f"{where}: no text field (expected one of {'/'.join(TEXT_FIELDS)}; found {list(names)})")
    return found


def read_inputs(path: str) -> tuple[list[tuple[int, str]], int]:
    """([(line number, text)], number of blank entries skipped) from a .txt, .jsonl or .csv file."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise ValueError(f"{path}: unsupported input file type {suffix!r} (use .txt, .jsonl or .csv)")
    try:
        content = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read input file ({e.strerror or e})") from None
    rows: list[tuple[int, str | None]] = []
    if suffix == ".txt":
        rows = [(n, line) for n, line in enumerate(content.splitlines(), 1)]
    elif suffix == ".jsonl":
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object with a text field")
            rows.append((n, obj[_pick_field(list(obj), f"{path}:{n}")]))
    else:
        reader = csv.DictReader(io.StringIO(content, newline=""))
        field = _pick_field(reader.fieldnames or [], f"{path}:1")
        rows = [(reader.line_num, row[field]) for row in reader]
    for n, text in rows:
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}:{n}: text must be a string, got {text!r}")
    kept = [(n, text) for n, text in rows if text and text.strip()]
    return kept, len(rows) - len(kept)


def write_jsonl_atomic(path: str, records: list[dict]) -> None:
    from sft.run import write_text_atomic

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
    mode.add_argument("--file", help="input .txt (one review per line), .jsonl or .csv (text/text_a/review column)")
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
    inputs, skipped = read_inputs(args.file) if args.file else ([], 0)  # a bad input file fails before loading
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

    args = parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("eval").setLevel(logging.WARNING)  # stdout is the predictions; stderr only what matters
    try:
        run(args)
    except (OSError, ValueError) as e:  # missing/unreadable files, base mismatch, bad input rows: one line
        print(f"error: {'; '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
