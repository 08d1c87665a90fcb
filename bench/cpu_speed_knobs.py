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

import benchlib  # noqa: F401  (puts the repo root on sys.path)
from benchlib import bar_chart, pipeline_trainer, start_training_bench, table
from train_tokens import StepClock, build_recipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--data_dir", help="ChnSentiCorp folder (default: data/chnsenticorp)")
    p.add_argument("--model_name_or_path", help="override the recipe's model")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--plot", help="write a bar chart of samples/s to this PNG")
    # build_recipe's other options
    p.set_defaults(batch_size=None, max_train_samples=None, set=[])
    return p.parse_args(argv)


def variants(num_layers: int) -> dict[str, list[str]]:
    every = ["--lora_layers_to_transform", *map(str, range(num_layers))]
    return {"recipe": [], "fp32": ["--bf16", "false"], "all layers": every, "fp32, all": ["--bf16", "false", *every]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    from sft.train import prepare

    start_training_bench()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = build_recipe(args, tmp, [])
        prepared = prepare(recipe)
        tokenizer, template, train_ds = prepared.tokenizer, prepared.template, prepared.train_records
        layers = transformers.AutoConfig.from_pretrained(prepared.base).num_hidden_layers
        print(f"recipe {args.recipe}: {recipe.model.model_name_or_path} ({layers} layers), LoRA layers "
              f"{recipe.loading.lora_layers_to_transform or 'all'}, bf16 {recipe.training.bf16}, batch "
              f"{recipe.training.per_device_train_batch_size}, max_length {template.max_length}, "
              f"{recipe.training.train_sampling_strategy}")
        bs = recipe.training.per_device_train_batch_size
        timed = {}  # name: (wall seconds, steps, real tokens)
        for name, extra in variants(layers).items():
            trainer = pipeline_trainer(build_recipe(args, tmp, extra), tokenizer, template, train_ds)
            clock = StepClock(trainer)
            trainer.add_callback(clock)
            trainer.args.max_steps = args.warmup + args.steps
            trainer.train()
            (w0, _, l0, n0), (w1, _, l1, n1) = clock.marks[args.warmup - 1], clock.marks[-1]
            timed[name] = (w1 - w0, args.steps, n1 - n0)
            print(f"  {name}: {(w1 - w0) / args.steps:.2f} s/step, load {l0:.2f} -> {l1:.2f}", flush=True)
            del trainer
    rate = {name: steps * bs / wall for name, (wall, steps, _) in timed.items()}
    rows = [[name, f"{wall / steps:.2f}", f"{rate[name]:.2f}", f"{tokens / wall:.0f}",
             f"{rate[name] / rate['fp32, all']:.2f}x"] for name, (wall, steps, tokens) in timed.items()]
    print(table(rows, ["variant", "s/step", "samples/s", "real tokens/s", "vs fp32, all layers"]))
    if args.plot:
        bar_chart(args.plot, list(rate), list(rate.values()), "training samples/s (higher is better)",
                  f"{recipe.model.model_name_or_path}: batch {bs}, max_length {template.max_length}")
        print(f"chart written to {args.plot}")
    print(f"SUMMARY cpu_speed_knobs: recipe {rate['recipe']:.2f} samples/s = {rate['recipe'] / rate['fp32, all']:.2f}x "
          f"fp32 all layers ({rate['fp32, all']:.2f}); bf16 alone {rate['all layers'] / rate['fp32, all']:.2f}x, "
          f"top layers alone {rate['fp32'] / rate['fp32, all']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
