"""GPU memory and speed of the pipeline's LoRA / QLoRA training on the real Qwen2.5-1.5B architecture.

    python bench/gpu_memory.py                        # on a CUDA machine: 2-8 cases x 30 steps, a few minutes
    python bench/gpu_memory.py --config tiny --steps 2 --batch_size 4 --seq 64 --device_ok_cpu   # smoke test

The model has Qwen2.5-1.5B's public architecture (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960,
vocab 151,936, tied embeddings) with random bf16 weights (no download: memory and speed do not depend on the
weights), saved once to a temporary folder with the real Qwen2.5 tokenizer, then loaded by the pipeline
(sft.run.build_trainer) from recipes/lora.yaml or recipes/qlora.yaml with: batch --batch_size, max_length --seq (reviews
truncated to fit, real ChnSentiCorp train texts), --steps optimizer steps, no evaluation, no checkpoints.
Cases: {lora, qlora} x {padded, padding-free} x {without, with Liger kernels (only if liger-kernel is installed)}.

Printed per case: peak torch.cuda.max_memory_allocated over the run, tokens/s (real, non-pad tokens) over the steps
after --warmup, samples/s, final loss.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import sys
import tempfile
from pathlib import Path

import benchlib as bench
import torch

# Qwen2.5-1.5B's shape; the rest (vocabulary 151,936, rope theta 1e6, tied embeddings, special token ids) is what
# sft.tiny_model.tiny_qwen2_config gives every Qwen2.5 stand-in. "tiny": its own defaults (hidden 64, 2 layers).
SHAPES = {"qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                               intermediate_size=8960), "tiny": {}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(SHAPES), default="qwen2.5-1.5b")
    p.add_argument("--kinds", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    p.add_argument("--layouts", nargs="+", default=["padded", "free"], choices=["padded", "free"])
    p.add_argument("--liger", choices=["auto", "off", "both"], default="auto",
                   help="auto: without and with Liger when liger-kernel is installed; off: never")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from tokens/s")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq", type=int, default=256, help="max_length (prompt + label tokens)")
    p.add_argument("--gradient_checkpointing", choices=["recipe", "true", "false"], default="recipe")
    p.add_argument("--data_dir", help="data folder (default: the shipped sample; data/chnsenticorp: the real splits)")
    p.add_argument("--device_ok_cpu", action="store_true", help="run without a GPU (smoke test; no memory figures)")
    return p.parse_args(argv)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model_dir(out: Path, shape: dict) -> tuple[Path, int]:
    """The real Qwen2.5 tokenizer and a random model of `shape`, created in bf16 on the GPU when there is one (not
    through builtin:, which builds float32 on the CPU: minutes and 6 GB for 1.5B parameters)."""
    from transformers import Qwen2ForCausalLM

    from sft.tiny_model import save_qwen2_5_tokenizer, tiny_qwen2_config

    save_qwen2_5_tokenizer(out)
    config = tiny_qwen2_config(**shape)
    config.max_position_embeddings = 32768  # Qwen2.5-1.5B's
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out, model.num_parameters()  # freed on return; run_case empties the CUDA cache before each case


def run_case(args, model_dir: str, data: str, tmp: str, kind: str, layout: str, liger: bool) -> dict:
    """One case, timed after --warmup steps, its peak GPU memory over the whole run."""
    from sft.run import prepare

    out = f"{tmp}/{kind}-{layout}-{liger}"
    flags = [] if args.gradient_checkpointing == "recipe" else ["--gradient_checkpointing", args.gradient_checkpointing]
    if not torch.cuda.is_available():
        flags += ["--dtype", "float32", "--optim", "adamw_torch"]  # CPU smoke test: no bf16 / paged optimizers
    recipe = bench.bench_recipe(bench.REPO / "recipes" / f"{kind}.yaml", out, *flags, model_name_or_path=model_dir,
                                data_dir=data, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                max_length=args.seq, padding_free=layout == "free", use_liger_kernel=liger)
    prepared = prepare(recipe)
    free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = bench.pipeline_trainer(recipe, prepared)
    clock, result = bench.timed_train(trainer)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    s = clock.after(args.warmup)
    row = dict(kind=kind, layout=layout, liger=liger, peak_gib=peak, tokens_s=s["tokens"] / s["wall"],
               samples_s=s["steps"] * args.batch_size / s["wall"], loss=result.metrics.get("train_loss"),
               gc=recipe.training.gradient_checkpointing)
    del trainer, result
    free_memory()
    return row


def run_cases(args, ligers: list[bool], have_liger: bool) -> list[dict]:
    """Every kind x layout x Liger case on one random model, built once in a temporary folder."""
    rows, data = [], args.data_dir or str(bench.SAMPLE_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, n = build_model_dir(Path(tmp) / "model", SHAPES[args.config])
        print(f"model: random Qwen2 {args.config} ({n / 1e9:.3f}B parameters, bf16 on disk), data {data}, batch "
              f"{args.batch_size}, max_length {args.seq}, {args.steps} steps ({args.warmup} warm-up), Liger "
              f"{'installed' if have_liger else 'not installed'}", flush=True)
        for kind, layout, liger in itertools.product(args.kinds, args.layouts, ligers):
            rows.append(r := run_case(args, str(model_dir), data, tmp, kind, layout, liger))
            print(f"  {kind} {layout} liger={liger}: peak {r['peak_gib']:.2f} GiB, {r['tokens_s']:.0f} tokens/s, "
                  f"{r['samples_s']:.2f} samples/s, loss {r['loss']:.3f}", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    bench.start_training_bench()
    if not torch.cuda.is_available() and not args.device_ok_cpu:
        print("no GPU: nothing measured (pass --device_ok_cpu for a CPU smoke test)")
        print("SUMMARY gpu_memory: not run (no GPU)")
        return 1
    have_liger = importlib.util.find_spec("liger_kernel") is not None
    if args.liger == "both" and not have_liger:
        print("liger-kernel is not installed: Liger cases skipped")
    rows = run_cases(args, [False] + ([True] if have_liger and args.liger != "off" else []), have_liger)
    print(bench.table([[r["kind"], r["layout"], "yes" if r["liger"] else "no", "yes" if r["gc"] else "no",
                        f"{r['peak_gib']:.2f}", f"{r['tokens_s']:.0f}", f"{r['samples_s']:.2f}"] for r in rows],
                      ["kind", "batches", "Liger", "grad. checkpointing", "peak GiB", "tokens/s", "samples/s"]))
    print("SUMMARY gpu_memory: " + "; ".join(
        f"{r['kind']}/{r['layout']}{'/liger' if r['liger'] else ''} {r['peak_gib']:.2f} GiB {r['tokens_s']:.0f} tok/s"
        for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
