"""CPU training-step cost of the recipe's speed knobs: bf16 autocast and LoRA on the top layers only.

    python bench/cpu_speed_knobs.py --recipe recipes/cpu_smollm2_lora.yaml

One process, same examples in the same order, the pipeline's trainer as sft/train.py builds it (the recipe's batch
layout: padded, length-grouped, LM head at the label positions). Variants, each a fresh model:
  recipe          the recipe as written
  fp32            bf16 autocast off
  all layers      LoRA on every decoder layer
  fp32, all       both off (what the first SmolLM2 run used)
Each variant runs --warmup untimed then --steps timed optimizer steps, one after the other (load printed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import benchlib as bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_recipe_args(p)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--plot", help="write a bar chart of samples/s to this PNG")
    return p.parse_args(argv)


def variants(num_layers: int) -> dict[str, list[str]]:
    every = ["--lora_layers_to_transform", *map(str, range(num_layers))]
    return {"recipe": [], "fp32": ["--bf16", "false"], "all layers": every, "fp32, all": ["--bf16", "false", *every]}


def time_variants(args, tmp: str, prepared, layers: int) -> dict[str, dict]:
    """{variant: StepClock span after the warm-up}, a fresh model each, one after the other."""
    timed = {}
    for name, extra in variants(layers).items():
        trainer = bench.pipeline_trainer(bench.recipe_from_args(args, tmp, *extra), prepared)
        timed[name] = span = bench.timed_train(trainer, args.warmup + args.steps)[0].after(args.warmup)
        print(f"  {name}: {span['wall'] / span['steps']:.2f} s/step, load {span['loads'][0]:.2f} -> "
              f"{span['loads'][1]:.2f}", flush=True)
        del trainer
    return timed


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    from sft.run import prepare

    bench.start_training_bench()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = bench.recipe_from_args(args, tmp)
        prepared = prepare(recipe)
        bench.describe(recipe, prepared)
        layers = transformers.AutoConfig.from_pretrained(prepared.base).num_hidden_layers
        print(f"{layers} decoder layers")
        timed = time_variants(args, tmp, prepared, layers)
    bs, fp32_all = recipe.training.per_device_train_batch_size, "fp32, all"
    rate = {name: s["steps"] * bs / s["wall"] for name, s in timed.items()}
    rows = [[name, f"{s['wall'] / s['steps']:.2f}", f"{rate[name]:.2f}", f"{s['tokens'] / s['wall']:.0f}",
             f"{rate[name] / rate[fp32_all]:.2f}x"] for name, s in timed.items()]
    print(bench.table(rows, ["variant", "s/step", "samples/s", "real tokens/s", "vs fp32, all layers"]))
    bench.bar_chart(args.plot, list(rate), list(rate.values()), "training samples/s (higher is better)",
                    f"{recipe.model.model_name_or_path}: batch {bs}, max_length {prepared.template.max_length}")
    print(f"SUMMARY cpu_speed_knobs: recipe {rate['recipe']:.2f} samples/s = {rate['recipe'] / rate[fp32_all]:.2f}x "
          f"fp32 all layers ({rate[fp32_all]:.2f}); bf16 alone {rate['all layers'] / rate[fp32_all]:.2f}x, "
          f"top layers alone {rate['fp32'] / rate[fp32_all]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
