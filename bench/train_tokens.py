"""Training token efficiency: padded versus padding-free batches, LM head everywhere versus at label positions only.

    python bench/train_tokens.py --recipe recipes/cpu_scratch.yaml
    python bench/train_tokens.py --recipe recipes/cpu_smollm2_lora.yaml --steps 6

Everything goes through the pipeline: the recipe is parsed by sft.config, the real train split is turned into
prompt-completion records by the template (reviews truncated to the recipe's max_length), and each mode builds a
fresh model and the pipeline's ClassificationSFTTrainer. Modes (same examples, same order, one process):
  padded      right-padded batches (attention_mask), random order: TRL without padding_free
  padded+len  padded, batches of similar lengths (train_sampling_strategy: group_by_length)
  free        padding_free: a batch is one row, sequences isolated through position_ids (the pipeline's default)
each with the LM head at every position (TRL 1.16 on CPU: label_position_loss false) or at label positions only
(the pipeline: ClassificationSFTTrainer.compute_loss).

Printed: real (non-pad) token fraction over a whole epoch of batches, samples/s and real tokens/s over --steps
optimizer steps after --warmup steps, and the correctness check: per-example loss of a padding-free batch versus the
padded batch (and versus a packed batch whose position_ids do NOT restart, i.e. with attention across sequences).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import benchlib as bench
import numpy as np
import torch

MODES = {  # name: (padding_free, sampling strategy, label_position_loss)
    "padded, head everywhere": (False, "random", False),
    "padded": (False, "random", True),
    "padded+len": (False, "group_by_length", True),
    "free, head everywhere": (True, "random", False),
    "free": (True, "random", True),
}
PAIRS = [("free", "padded", "padding-free vs padded"), ("padded+len", "padded", "length-grouped vs padded"),
         ("padded", "padded, head everywhere", "label-position head (padded)"),
         ("free", "free, head everywhere", "label-position head (padding-free)"),
         ("free", "padded, head everywhere", "pipeline vs TRL defaults (padded, head everywhere)")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_recipe_args(p)
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--check_rows", type=int, default=16, help="examples in the loss-equality check")
    p.add_argument("--plot", help="write a bar chart of samples/s (at the mean length) to this PNG")
    return p.parse_args(argv)


def real_token_fraction(trainer) -> tuple[float, float, float, int]:
    """(overall, mean per batch, min per batch, batches) over one epoch of the trainer's own dataloader."""
    real = total = 0
    per_batch = []
    for batch in trainer.get_train_dataloader():
        if "attention_mask" in batch:
            r, t = int(batch["attention_mask"].sum()), batch["attention_mask"].numel()
        else:  # padding-free: one row; only pad_to_multiple_of could add pads (pad id after the last sequence)
            r, t = int(batch["position_ids"].shape[1]), batch["input_ids"].numel()
        real, total = real + r, total + t
        per_batch.append(r / t)
    return real / total, float(np.mean(per_batch)), float(np.min(per_batch)), len(per_batch)


def per_example_losses(model, batch, positions=None) -> np.ndarray:
    """Mean NLL over each example's label tokens, from the full logits (independent of the trainer's loss).
    `positions` replaces the batch's position_ids in the forward; examples are still split where they restart."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        logits = model(**inputs | ({} if positions is None else {"position_ids": positions}), use_cache=False).logits
    targets = batch["labels"][:, 1:]
    nll = -torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if "attention_mask" in batch:  # padded: one example per row
        spans = [(r, slice(None)) for r in range(targets.shape[0])]
    else:  # padding-free: one row; the label token at position p is predicted at p - 1
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [targets.shape[1] + 1]
        spans = [(0, slice(max(s - 1, 0), e - 1)) for s, e in zip(starts[:-1], starts[1:], strict=True)]
    return np.array([float(nll[r, sp][targets[r, sp] != -100].mean()) for r, sp in spans])


def loss_check(padded_trainer, free_trainer, rows: int) -> float:
    """Print and return max |padded - padding-free| per-example loss over the first `rows` train examples."""
    from accelerate.utils import extract_model_from_parallel

    # fp32: after training, accelerate leaves a bf16-autocast wrapper on forward when the recipe trains in bf16, and
    # bf16 rounding (different for different batch shapes) would hide or fake a leak across packed sequences.
    model = extract_model_from_parallel(free_trainer.model, keep_fp32_wrapper=False).eval()
    examples = [free_trainer.train_dataset[i] for i in range(rows)]
    free = free_trainer.data_collator(examples)
    a = per_example_losses(model, padded_trainer.data_collator(examples))
    b = per_example_losses(model, free)
    # no restarts: the packed examples attend to each other (split by the real boundaries all the same)
    c = per_example_losses(model, free, positions=torch.arange(free["input_ids"].shape[1])[None])
    diff = float(np.abs(a - b).max())
    print(f"loss check ({rows} examples, attention {getattr(model.config, '_attn_implementation', '?')}, fp32): max "
          f"|padded - padding-free| per-example loss {diff:.2e} (goal <= 1e-4: {'met' if diff <= 1e-4 else 'MISSED'})"
          f"; with attention across sequences (positions not restarted) {float(np.abs(a - c).max()):.2e}; first "
          f"losses padded {a[:4].round(4).tolist()}, padding-free {b[:4].round(4).tolist()}")
    return diff


def run_mode(args, name: str, out_dir: str, prepared) -> tuple:
    """(trainer, figures) of one mode: a fresh model trained --warmup + --steps steps with that batch layout."""
    recipe = bench.recipe_from_args(args, out_dir)
    recipe.training.padding_free, recipe.training.train_sampling_strategy, recipe.run.label_position_loss = MODES[name]
    trainer = bench.pipeline_trainer(recipe, prepared)
    mean_len = float(np.mean([len(x) for x in trainer.train_dataset["input_ids"]]))
    frac, mean_frac, min_frac, nb = real_token_fraction(trainer)
    clock, _ = bench.timed_train(trainer, args.warmup + args.steps)
    s = clock.after(args.warmup)
    samples = s["steps"] * recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps
    # random-order modes time the same examples; length-grouped batches differ, so samples/s is also given at the
    # split's mean length (real tokens/s / mean tokens per example)
    tps = s["tokens"] / s["wall"]
    r = dict(frac=frac, min_frac=min_frac, sps=samples / s["wall"], cpu_sps=samples / s["cpu"],
             cores=s["cpu"] / s["wall"], tps=tps, eq_sps=tps / mean_len, timed_len=s["tokens"] / samples,
             load=sum(s["loads"]) / 2, mean_len=mean_len)
    print(f"  {name}: real tokens {frac:.1%} (per batch mean {mean_frac:.1%}, min {min_frac:.1%}, {nb} batches); "
          f"{r['sps']:.2f} samples/s ({r['timed_len']:.0f} real tokens each), {r['tps']:.0f} real tokens/s, "
          f"{r['cpu_sps']:.2f} samples per CPU-s, {r['cores']:.2f} cores, load {r['load']:.2f}", flush=True)
    return trainer, r


def report(args, results: dict, bs: int, max_length: int) -> None:
    """The comparison table, the chart and the ratios of the pairs of modes that ran."""
    base = results.get("padded")
    print(f"\nmean tokens per example {next(iter(results.values()))['mean_len']:.1f}; timed {args.steps} steps of {bs} "
          f"examples after {args.warmup} warm-up steps")
    rows = [[name, f"{r['frac']:.1%}", f"{r['min_frac']:.1%}", f"{r['sps']:.2f}", f"{r['timed_len']:.0f}",
             f"{r['tps']:.0f}", f"{r['eq_sps']:.2f}", f"{r['cpu_sps']:.2f}",
             f"{r['eq_sps'] / base['eq_sps']:.2f}x" if base else "-", f"{r['load']:.1f}"]
            for name, r in results.items()]
    print(bench.table(rows, ["mode", "real tokens", "worst batch", "samples/s", "tokens/sample (timed)",
                             "real tokens/s", "samples/s at mean length", "samples per CPU-s", "vs padded", "load"]))
    bench.bar_chart(args.plot, list(results), [r["eq_sps"] for r in results.values()],
                    "training samples/s at the split's mean length (higher is better)",
                    f"{Path(args.recipe).name}: batch {bs}, max_length {max_length}")
    for a, b, what in pairs(results):
        ra, rb = results[a], results[b]
        print(f"{what}: {ra['eq_sps'] / rb['eq_sps']:.2f}x samples/s at the mean length "
              f"({ra['sps'] / rb['sps']:.2f}x raw samples/s, {ra['cpu_sps'] / rb['cpu_sps']:.2f}x per CPU-second)")


def pairs(results: dict) -> list[tuple[str, str, str]]:
    return [(a, b, what) for a, b, what in PAIRS if a in results and b in results]


def summary(results: dict, diff: float | None) -> str:
    parts = [f"{label} real tokens {results[m]['frac']:.1%}" for m, label in (("free", "padding-free"),
                                                                             ("padded", "padded")) if m in results]
    parts += [f"{what} {results[a]['eq_sps']:.2f} vs {results[b]['eq_sps']:.2f} samples/s "
              f"({results[a]['eq_sps'] / results[b]['eq_sps']:.2f}x)" for a, b, what in pairs(results)]
    return "SUMMARY train_tokens: " + "; ".join(parts + ([f"loss diff {diff:.1e}"] if diff is not None else []))


def main(argv=None) -> int:
    args = parse_args(argv)
    from sft.run import prepare

    bench.start_training_bench()
    results, kept, diff = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        recipe = bench.recipe_from_args(args, tmp)
        prepared = prepare(recipe)
        bench.describe(recipe, prepared)
        for name in args.modes:
            trainer, results[name] = run_mode(args, name, tmp, prepared)
            if name in ("padded", "free"):  # kept for the loss check; the others are freed before the next mode
                kept[name] = trainer
            del trainer
        bs = recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps
        report(args, results, bs, prepared.template.max_length)
        if "padded" in kept and "free" in kept:
            diff = loss_check(kept["padded"], kept["free"], args.check_rows)
    print(summary(results, diff))
    return 0


if __name__ == "__main__":
    sys.exit(main())
