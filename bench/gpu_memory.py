"""GPU memory and speed of the pipeline's LoRA / QLoRA training on the real Qwen2.5-1.5B architecture.

    python bench/gpu_memory.py                        # on a CUDA machine: 2-8 cases x 30 steps, a few minutes
    python bench/gpu_memory.py --config tiny --steps 2 --batch_size 4 --seq 64 --device_ok_cpu   # smoke test

The model has Qwen2.5-1.5B's public architecture (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960,
vocab 151,936, tied embeddings) with random bf16 weights (no download: memory and speed do not depend on the
weights), saved once to a temporary folder with the real Qwen2.5 tokenizer, then loaded by the pipeline
(sft.model) from recipes/lora.yaml or recipes/qlora.yaml with: batch --batch_size, max_length --seq (reviews
truncated to fit, real ChnSentiCorp train texts), --steps optimizer steps, no evaluation, no checkpoints.
Cases: {lora, qlora} x {padded, padding-free} x {without, with Liger kernels (only if liger-kernel is installed)}.

Printed per case: peak torch.cuda.max_memory_allocated over the run, tokens/s (real, non-pad tokens) over the steps
after --warmup, samples/s, final loss.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: F401  (puts the repo root on sys.path)
import torch
from benchlib import REPO, SAMPLE_DIR, pipeline_trainer, start_training_bench, table
from transformers import TrainerCallback

QWEN2_5_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                    intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                    pad_token_id=151643)
TINY = dict(QWEN2_5_1_5B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["qwen2.5-1.5b", "tiny"], default="qwen2.5-1.5b")
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


class StepClock(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.marks = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), self.trainer._total_train_tokens))


def build_model_dir(out: Path, config: dict) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sft.tiny_model import save_qwen2_5_tokenizer

    save_qwen2_5_tokenizer(out)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(Qwen2Config(**config)).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    n = model.num_parameters()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out, n


def run_case(args, model_dir: str, data: str, out: str, kind: str, layout: str, liger: bool) -> dict:
    import os

    from sft.config import parse_recipe
    from sft.train import prepare

    argv = [str(REPO / "recipes" / f"{kind}.yaml"), "--model_name_or_path", model_dir, "--data_dir", data,
            "--output_dir", out, "--overwrite_output_dir", "true", "--resume_from_checkpoint", "none",
            "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
            "--max_length", str(args.seq), "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "false", "--logging_steps", "1000", "--report_to", "none",
            "--padding_free", str(layout == "free").lower(), "--use_liger_kernel", str(liger).lower(),
            "--disable_tqdm", "true"]
    if args.gradient_checkpointing != "recipe":
        argv += ["--gradient_checkpointing", args.gradient_checkpointing]
    if not torch.cuda.is_available():
        argv += ["--dtype", "float32", "--optim", "adamw_torch"]  # CPU smoke test: no bf16 / paged optimizers
    os.makedirs(out, exist_ok=True)
    recipe = parse_recipe(argv)
    prepared = prepare(recipe)
    tokenizer, template, train_ds = prepared.tokenizer, prepared.template, prepared.train_records
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = pipeline_trainer(recipe, tokenizer, template, train_ds)
    clock = StepClock(trainer)
    trainer.add_callback(clock)
    result = trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    start = max(0, min(args.warmup, len(clock.marks) - 1) - 1)  # mark i = end of step i + 1
    (t0, n0), (t1, n1) = clock.marks[start], clock.marks[-1]
    steps = len(clock.marks) - 1 - start
    row = dict(kind=kind, layout=layout, liger=liger, peak_gib=peak, tokens_s=(n1 - n0) / (t1 - t0),
               samples_s=steps * args.batch_size / (t1 - t0), loss=result.metrics.get("train_loss"),
               gc=recipe.training.gradient_checkpointing)
    del trainer, result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    start_training_bench()
    if not torch.cuda.is_available() and not args.device_ok_cpu:
        print("no GPU: nothing measured (pass --device_ok_cpu for a CPU smoke test)")
        print("SUMMARY gpu_memory: not run (no GPU)")
        return 1
    have_liger = importlib.util.find_spec("liger_kernel") is not None
    ligers = [False] + ([True] if have_liger and args.liger in ("auto", "both") else [])
    if args.liger == "both" and not have_liger:
        print("liger-kernel is not installed: Liger cases skipped")
    data = args.data_dir or str(SAMPLE_DIR)
    config = QWEN2_5_1_5B if args.config == "qwen2.5-1.5b" else TINY
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, n = build_model_dir(Path(tmp) / "model", config)
        print(f"model: random Qwen2 {args.config} ({n / 1e9:.3f}B parameters, bf16 on disk), data {data}, batch "
              f"{args.batch_size}, max_length {args.seq}, {args.steps} steps ({args.warmup} warm-up), Liger "
              f"{'installed' if have_liger else 'not installed'}", flush=True)
        for kind in args.kinds:
            for layout in args.layouts:
                for liger in ligers:
                    r = run_case(args, str(model_dir), data, str(Path(tmp) / f"{kind}-{layout}-{liger}"), kind,
                                 layout, liger)
                    rows.append(r)
                    print(f"  {kind} {layout} liger={liger}: peak {r['peak_gib']:.2f} GiB, {r['tokens_s']:.0f} "
                          f"tokens/s, {r['samples_s']:.2f} samples/s, loss {r['loss']:.3f}", flush=True)
    print(table([[r["kind"], r["layout"], "yes" if r["liger"] else "no", "yes" if r["gc"] else "no",
                  f"{r['peak_gib']:.2f}", f"{r['tokens_s']:.0f}", f"{r['samples_s']:.2f}"] for r in rows],
                ["kind", "batches", "Liger", "grad. checkpointing", "peak GiB", "tokens/s", "samples/s"]))
    print("SUMMARY gpu_memory: " + "; ".join(
        f"{r['kind']}/{r['layout']}{'/liger' if r['liger'] else ''} {r['peak_gib']:.2f} GiB {r['tokens_s']:.0f} tok/s"
        for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
