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
import time
from pathlib import Path

import benchlib  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch
from benchlib import bar_chart, load1, pipeline_trainer, start_training_bench, table
from transformers import TrainerCallback

MODES = {  # name: (padding_free, sampling strategy, label_position_loss)
    "padded, head everywhere": (False, "random", False),
    "padded": (False, "random", True),
    "padded+len": (False, "group_by_length", True),
    "free, head everywhere": (True, "random", False),
    "free": (True, "random", True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe whose model, template, max_length and batch size are used")
    p.add_argument("--data_dir", help="ChnSentiCorp folder (default: data/chnsenticorp)")
    p.add_argument("--model_name_or_path", help="override the recipe's model")
    p.add_argument("--batch_size", type=int, help="per-device batch size (default: the recipe's)")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--check_rows", type=int, default=16, help="examples in the loss-equality check")
    p.add_argument("--max_train_samples", type=int, help="use only the first N train rows")
    p.add_argument("--plot", help="write a bar chart of samples/s (at the mean length) to this PNG")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="other recipe overrides, e.g. dtype=bfloat16")
    return p.parse_args(argv)


class StepClock(TrainerCallback):
    """Wall/CPU time at each optimizer step end; the rate is taken between the warm-up's end and the last step."""

    def __init__(self, trainer):
        self.trainer, self.marks = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        # _total_train_tokens: real (non-pad) tokens seen, counted by TRL's and the pipeline's compute_loss
        self.marks.append((time.perf_counter(), time.process_time(), load1(), self.trainer._total_train_tokens))


def build_recipe(args, out_dir: str, extra: list[str]):
    from sft.config import parse_recipe

    argv = [args.recipe, "--output_dir", out_dir, "--overwrite_output_dir", "true", "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1000", "--data_dir",
            benchlib.data_dir(args.data_dir), "--resume_from_checkpoint", "none", "--disable_tqdm", "true", *extra]
    if args.model_name_or_path:
        argv += ["--model_name_or_path", args.model_name_or_path]
    if args.batch_size:
        argv += ["--per_device_train_batch_size", str(args.batch_size)]
    if args.max_train_samples:
        argv += ["--max_train_samples", str(args.max_train_samples)]
    for item in args.set:
        key, _, value = item.partition("=")
        argv += [f"--{key}", value]
    return parse_recipe(argv)


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


def per_example_losses(model, batch) -> list[float]:
    """Mean NLL over each example's label tokens, from the full logits (independent of the trainer's loss)."""
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"]
    logp = torch.log_softmax(logits[:, :-1], -1)
    targets = labels[:, 1:]
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    valid = targets != -100
    if "attention_mask" in batch:  # padded: one example per row
        return [float(nll[r][valid[r]].mean()) for r in range(labels.shape[0])]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [labels.shape[1]]
    out = []
    for s, e in zip(starts[:-1], starts[1:], strict=True):  # label token at position p is predicted at p - 1
        v = valid[0, max(s - 1, 0) : e - 1]
        out.append(float(nll[0, max(s - 1, 0) : e - 1][v].mean()))
    return out


def loss_check(padded_trainer, free_trainer, rows: int) -> dict:
    from accelerate.utils import extract_model_from_parallel

    # fp32: after training, accelerate leaves a bf16-autocast wrapper on forward when the recipe trains in bf16, and
    # bf16 rounding (different for different batch shapes) would hide or fake a leak across packed sequences.
    model = extract_model_from_parallel(free_trainer.model, keep_fp32_wrapper=False)
    model.eval()
    examples = [free_trainer.train_dataset[i] for i in range(rows)]
    padded = padded_trainer.data_collator(examples)
    free = free_trainer.data_collator(examples)
    a = np.array(per_example_losses(model, padded))
    b = np.array(per_example_losses(model, free))
    leaky = dict(free)
    leaky["position_ids"] = torch.arange(free["input_ids"].shape[1])[None]  # no restarts: attends across examples
    # split by the real boundaries, but run the model with the non-restarting positions
    with torch.no_grad():
        logits = model(input_ids=leaky["input_ids"], position_ids=leaky["position_ids"], use_cache=False).logits
    starts = (free["position_ids"][0] == 0).nonzero().flatten().tolist() + [free["labels"].shape[1]]
    logp = torch.log_softmax(logits.float()[:, :-1], -1)
    targets = free["labels"][:, 1:]
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    c = np.array([float(nll[0, max(s - 1, 0) : e - 1][targets[0, max(s - 1, 0) : e - 1] != -100].mean())
                  for s, e in zip(starts[:-1], starts[1:], strict=True)])
    attn = getattr(getattr(model, "config", None), "_attn_implementation", "?")
    return {"rows": rows, "max_diff": float(np.abs(a - b).max()), "leaky_max_diff": float(np.abs(a - c).max()),
            "attn": attn, "padded_losses": a[:4].round(4).tolist(), "free_losses": b[:4].round(4).tolist()}


def main(argv=None) -> int:
    args = parse_args(argv)
    from sft.train import prepare

    start_training_bench()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = build_recipe(args, tmp, [])
        prepared = prepare(recipe)
        tokenizer, template, splits, train_ds = (prepared.tokenizer, prepared.template, prepared.splits,
                                                 prepared.train_records)
        texts = splits["train"]["text"]
        chars = np.array([len(t) for t in texts])
        bs = recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps
        print(f"recipe {args.recipe}: model {recipe.model.model_name_or_path}"
              f"{' (' + recipe.loading.gguf_file + ')' if recipe.loading.gguf_file else ''}, "
              f"{'LoRA r ' + str(recipe.model.lora_r) if recipe.model.use_peft else 'full fine-tuning'}, "
              f"attention {recipe.model.attn_implementation}, dtype {recipe.model.dtype}, max_length "
              f"{template.max_length}, batch {recipe.training.per_device_train_batch_size} x "
              f"{recipe.training.gradient_accumulation_steps} accumulation")
        print(f"train rows {len(texts)}: characters median {np.median(chars):.0f}, p90 {np.percentile(chars, 90):.0f}, "
              f"max {chars.max()}")

        results, trainers = {}, {}
        for name in args.modes:
            free, strategy, head = MODES[name]
            trainer = pipeline_trainer(build_recipe(args, tmp, []), tokenizer, template, train_ds, free, strategy, head)
            if name in ("padded", "free"):
                trainers[name] = trainer
            lengths = np.array([len(x) for x in trainer.train_dataset["input_ids"]])
            frac, mean_frac, min_frac, nb = real_token_fraction(trainer)
            clock = StepClock(trainer)
            trainer.add_callback(clock)
            trainer.args.max_steps = args.warmup + args.steps
            trainer.train()
            (w0, c0, l0, n0), (w1, c1, l1, n1) = clock.marks[args.warmup - 1], clock.marks[-1]
            steps = len(clock.marks) - args.warmup
            samples = steps * bs
            tokens_per_sample = lengths.mean()
            # random-order modes time the same examples; length-grouped batches differ, so samples/s is also given
            # at the split's mean length (real tokens/s / mean tokens per example)
            tps = (n1 - n0) / (w1 - w0)
            results[name] = dict(frac=frac, mean_frac=mean_frac, min_frac=min_frac, batches=nb,
                                 sps=samples / (w1 - w0), cpu_sps=samples / (c1 - c0), cores=(c1 - c0) / (w1 - w0),
                                 tps=tps, eq_sps=tps / tokens_per_sample, timed_len=(n1 - n0) / samples,
                                 load=(l0 + l1) / 2)
            r = results[name]
            print(f"  {name}: real tokens {frac:.1%} (per batch mean {mean_frac:.1%}, min {min_frac:.1%}, "
                  f"{nb} batches); "
                  f"{r['sps']:.2f} samples/s ({r['timed_len']:.0f} real tokens each), {r['tps']:.0f} real tokens/s, "
                  f"{r['cpu_sps']:.2f} samples per CPU-s, {r['cores']:.2f} cores, load {r['load']:.2f}", flush=True)
            if name not in trainers:
                del trainer

        print(f"\nmean tokens per example {tokens_per_sample:.1f}; timed {args.steps} steps of {bs} examples after "
              f"{args.warmup} warm-up steps")
        base = results.get("padded")
        rows = []
        for name, r in results.items():
            rows.append([name, f"{r['frac']:.1%}", f"{r['min_frac']:.1%}", f"{r['sps']:.2f}", f"{r['timed_len']:.0f}",
                         f"{r['tps']:.0f}", f"{r['eq_sps']:.2f}", f"{r['cpu_sps']:.2f}",
                         f"{r['eq_sps'] / base['eq_sps']:.2f}x" if base else "-", f"{r['load']:.1f}"])
        print(table(rows, ["mode", "real tokens", "worst batch", "samples/s", "tokens/sample (timed)",
                           "real tokens/s", "samples/s at mean length", "samples per CPU-s", "vs padded", "load"]))
        if args.plot:
            bar_chart(args.plot, list(results), [r["eq_sps"] for r in results.values()],
                      "training samples/s at the split's mean length (higher is better)",
                      f"{Path(args.recipe).name}: batch {bs}, max_length {template.max_length}")
            print(f"chart written to {args.plot}")
        pairs = [("free", "padded", "padding-free vs padded"), ("padded+len", "padded", "length-grouped vs padded"),
                 ("padded", "padded, head everywhere", "label-position head (padded)"),
                 ("free", "free, head everywhere", "label-position head (padding-free)"),
                 ("free", "padded, head everywhere", "pipeline vs TRL defaults (padded, head everywhere)")]
        for a, b, what in pairs:
            if a in results and b in results:
                print(f"{what}: {results[a]['eq_sps'] / results[b]['eq_sps']:.2f}x samples/s at the mean length "
                      f"({results[a]['sps'] / results[b]['sps']:.2f}x raw samples/s, "
                      f"{results[a]['cpu_sps'] / results[b]['cpu_sps']:.2f}x per CPU-second)")

        check = None
        if "padded" in trainers and "free" in trainers:
            check = loss_check(trainers["padded"], trainers["free"], args.check_rows)
            print(f"loss check ({check['rows']} examples, attention {check['attn']}, fp32): max |padded - "
                  f"padding-free| per-example loss {check['max_diff']:.2e} (goal <= 1e-4: "
                  f"{'met' if check['max_diff'] <= 1e-4 else 'MISSED'}); with attention across sequences "
                  f"(positions not restarted) {check['leaky_max_diff']:.2e}; first losses padded "
                  f"{check['padded_losses']}, padding-free {check['free_losses']}")

    free, padded = results.get("free"), results.get("padded")
    parts = []
    if free:
        parts.append(f"padding-free real tokens {free['frac']:.1%}")
    if free and padded:
        parts.append(f"padded {padded['frac']:.1%}; padding-free {free['eq_sps']:.2f} vs padded {padded['eq_sps']:.2f} "
                     f"samples/s ({free['eq_sps'] / padded['eq_sps']:.2f}x)")
    if "padded+len" in results and padded:
        parts.append(f"length-grouped padded {results['padded+len']['eq_sps'] / padded['eq_sps']:.2f}x")
    if free and "free, head everywhere" in results:
        parts.append(f"label-position head {free['eq_sps'] / results['free, head everywhere']['eq_sps']:.2f}x")
    if check:
        parts.append(f"loss diff {check['max_diff']:.1e}")
    print("SUMMARY train_tokens: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
