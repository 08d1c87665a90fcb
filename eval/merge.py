"""Merge a LoRA (or QLoRA) adapter into its base model and save a standalone model, verified before it is kept.

    python eval/merge.py --adapter outputs/cpu-smollm2-lora/final --out outputs/cpu-smollm2-merged
    python eval/merge.py --adapter outputs/cpu-smollm2-lora/final --out outputs/merged-bf16 --dtype bfloat16 \\
        --tolerance 1e-2

The base is loaded unquantised (also for QLoRA adapters: merging into 4-bit weights would round the update away),
`merge_and_unload()` folds the LoRA update into the weights, and the result is written with the tokenizer,
template.json, recipe.yaml, calibration.json (if any) and run_info.json (kind "merged": `load_for_inference` treats
it as a full model).
The merged model is then reloaded from disk and must give the adapter's label probabilities on a few reviews within
`--tolerance`; otherwise nothing is kept and the exit code is 1. Everything is written to OUT.tmp and renamed.
"""

import argparse
import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from sft.predictor import DEMO_TEXTS
from sft.scoring import score_texts

logger = logging.getLogger("eval.merge")


class VerificationError(RuntimeError):
    """The reloaded merged model does not reproduce the adapter's probabilities."""


VERIFY_TEXTS = (*DEMO_TEXTS, "酒店位置很好，" * 40)  # the demo reviews and a long one (truncated by short templates)


def merge(adapter: str, out: str, dtype: str = "float32", tolerance: float = 1e-3, base: str | None = None,
          overwrite: bool = False, device=None) -> float:
    """Merge, save to OUT.tmp, reload, compare, rename to OUT. Returns the largest probability difference."""
    from sft import artifacts
    from sft.model import load_for_inference
    from sft.model_card import write_model_card

    run_info = artifacts.RunInfo.load(adapter)
    if not artifacts.is_adapter(adapter):
        raise ValueError(f"{adapter}: no {artifacts.ADAPTER_CONFIG_FILE}; this is already a full model (kind "
                         f"{run_info.kind!r}), nothing to merge")
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
    for name in (artifacts.RECIPE_FILE, artifacts.CALIBRATION_FILE):  # the merged model gives the same log-probs
        if (Path(adapter) / name).is_file():
            shutil.copy(Path(adapter) / name, tmp / name)
    info = dataclasses.replace(run_info, kind="merged", adapter_kind=run_info.kind, merged_from=str(adapter),
                               merged_dtype=dtype, gguf_file=None)
    info.save(tmp)
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
    write_model_card(target, dataclasses.asdict(info), artifacts.read_recipe(target))  # after the rename: final path
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
    from sft.sources import check_hub_before_library_imports

    args = parse_args(argv)
    setup_logging(args.verbose)
    check_hub_before_library_imports()
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
