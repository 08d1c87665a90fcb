"""Merge a LoRA (or QLoRA) adapter into its base model and save a standalone model, verified before it is kept.

    python eval/merge.py --adapter outputs/cpu-smollm2-lora/final --out outputs/cpu-smollm2-merged
    python eval/merge.py --adapter outputs/cpu-smollm2-lora/final --out outputs/merged-bf16 --dtype bfloat16 \\
        --tolerance 1e-2

The base is loaded unquantised (also for QLoRA adapters: merging into 4-bit weights would round the update away),
`merge_and_unload()` folds the LoRA update into the weights, and the result is written with the tokenizer,
template.json, recipe.yaml and run_info.json (kind "merged": `load_for_inference` treats it as a full model).
The merged model is then reloaded from disk and must give the adapter's label probabilities on a few reviews within
`--tolerance`; otherwise nothing is kept and the exit code is 1. Everything is written to OUT.tmp and renamed.
"""

import os
import sys

if __name__ == "__main__":  # run as a script: keep eval/ off sys.path, or eval/evaluate.py shadows `evaluate`
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from eval.predict import DEMO_TEXTS
from eval.scoring import score_texts

logger = logging.getLogger("eval.merge")


class VerificationError(RuntimeError):
    """The reloaded merged model does not reproduce the adapter's probabilities."""


VERIFY_TEXTS = (*DEMO_TEXTS, "酒店位置很好，" * 40)  # the demo reviews and a long one (truncated by short templates)


def merge(adapter: str, out: str, dtype: str = "float32", tolerance: float = 1e-3, base: str | None = None,
          overwrite: bool = False, device=None) -> float:
    """Merge, save to OUT.tmp, reload, compare, rename to OUT. Returns the largest probability difference."""
    import yaml

    from sft.model import RUN_INFO_FILE, load_for_inference, read_run_info
    from sft.model_card import write_model_card

    run_info = read_run_info(adapter)
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"{adapter}: no adapter_config.json; this is already a full model (kind "
                         f"{run_info.get('kind')!r}), nothing to merge")
    target, tmp = Path(out), Path(f"{out}.tmp")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    if tmp.exists():
        shutil.rmtree(tmp)

    model, tokenizer, template = load_for_inference(adapter, base, dtype, device)
    texts = list(VERIFY_TEXTS)
    expected = score_texts(model, tokenizer, template, texts, progress=False).probs
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    template.save(tmp)
    if (Path(adapter) / "recipe.yaml").is_file():
        shutil.copy(Path(adapter) / "recipe.yaml", tmp / "recipe.yaml")
    info = {**run_info, "kind": "merged", "adapter_kind": run_info.get("kind"), "merged_from": str(adapter),
            "merged_dtype": dtype, "gguf_file": None}
    (tmp / RUN_INFO_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    del model, merged

    reloaded, tokenizer, template = load_for_inference(str(tmp), None, dtype, device)
    got = score_texts(reloaded, tokenizer, template, texts, progress=False).probs
    diff = float(np.abs(got - expected).max())
    if not diff <= tolerance:
        shutil.rmtree(tmp)
        hint = "" if dtype == "float32" else f"; {dtype} rounds the merged weights: raise --tolerance or use float32"
        raise VerificationError(f"merged model differs from the adapter by {diff:.3g} in label probability "
                                f"(tolerance {tolerance:g}); nothing written to {out}{hint}")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    recipe_file = target / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else {}
    write_model_card(target, info, recipe or {}, None)  # after the rename: the card shows the final path
    logger.info("merged %s into %s (max label-probability difference %.2g)", adapter, out, diff)
    return diff


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="training output directory holding a LoRA/QLoRA adapter")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--base", help="base model (default: the one recorded in the adapter's run_info.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the merged weights")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max allowed label-probability difference")
    p.add_argument("--device", help="cpu, cuda... (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--verbose", action="store_true", help="library INFO logs and the warnings filtered by default")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from sft.quiet import setup_logging

    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        diff = merge(args.adapter, args.out, args.dtype, args.tolerance, args.base, args.overwrite, args.device)
    except VerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {'; '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    print(f"merged model written to {args.out} (max label-probability difference {diff:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
