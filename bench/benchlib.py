"""Shared helpers of the benchmark scripts: machine description, recipes, the pipeline's trainer, timing, output.

Every script prints its figures and ends with one summary line; `machine_line()` goes at the top so a pasted output
says where and under which load it was measured (the CPU is shared: the 1-minute load average is printed before
and after each measurement). The training benchmarks time the trainer sft/train.py runs (`sft.run.build_trainer`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "tests" / "data" / "sample"
REAL_DATA = REPO / "data" / "chnsenticorp"
# a benchmark run: no evaluation, checkpoints, reports or progress bars; a fresh output folder
BENCH_FLAGS = ("--overwrite_output_dir", "true", "--resume_from_checkpoint", "none", "--eval_strategy", "no",
               "--save_strategy", "no", "--load_best_model_at_end", "false", "--logging_steps", "1000",
               "--report_to", "none", "--disable_tqdm", "true")


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.is_file() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def load1() -> float:
    return os.getloadavg()[0]


def machine_line() -> str:
    import transformers
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} | {cpu_model()}, "
        f"{os.cpu_count()} cores visible, torch threads {torch.get_num_threads()} | {gpu} | "
        f"load avg (1/5/15 min) {' '.join(f'{x:.2f}' for x in os.getloadavg())} | torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}, python {platform.python_version()}"
    )


def start_training_bench() -> None:
    """Quiet the libraries' dataset bars and info logs (each script prints its own figures); print the machine line."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    print(machine_line())


def data_dir(explicit: str | None) -> str:
    """--data_dir, else the ChnSentiCorp copy shipped in data/chnsenticorp: the benchmarks are about the real data."""
    value = explicit or str(REAL_DATA)
    if not Path(value).is_dir():
        raise SystemExit(f"error: {value}: not a directory")
    return value


def add_recipe_args(p) -> None:
    p.add_argument("--recipe", required=True, help="recipe whose model, template, max_length and batch size are used")
    p.add_argument("--data_dir", help="ChnSentiCorp folder (default: data/chnsenticorp)")
    p.add_argument("--model_name_or_path", help="override the recipe's model")
    p.add_argument("--batch_size", type=int, help="per-device batch size (default: the recipe's)")
    p.add_argument("--max_train_samples", type=int, help="use only the first N train rows")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="other recipe overrides, e.g. dtype=bfloat16")


def bench_recipe(path, out_dir, *flags: str, **keys):
    """The recipe at `path` run as a benchmark (BENCH_FLAGS) into `out_dir`; `keys` (None: as the recipe says), then
    `flags` (--key value ...) override it."""
    from sft.config import parse_recipe

    argv = [str(path), "--output_dir", str(out_dir), *BENCH_FLAGS]
    for key, value in keys.items():
        if value is not None:
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return parse_recipe([*argv, *flags])


def recipe_from_args(args, out_dir, *flags: str):
    """bench_recipe from add_recipe_args' options, then `flags`, then --set."""
    sets = [part for item in args.set for part in (f"--{item.partition('=')[0]}", item.partition("=")[2])]
    return bench_recipe(args.recipe, out_dir, *flags, *sets, data_dir=data_dir(args.data_dir),
                        model_name_or_path=args.model_name_or_path, per_device_train_batch_size=args.batch_size,
                        max_train_samples=args.max_train_samples)


def describe(recipe, prepared) -> None:
    """One line on the recipe as trained, one on the train split's review lengths."""
    m, t, loading = recipe.model, recipe.training, recipe.loading
    chars = np.array([len(x) for x in prepared.splits["train"]["text"]])
    lora = f"LoRA r {m.lora_r} on layers {loading.lora_layers_to_transform or 'all'}" if m.use_peft else "full"
    print(f"recipe {recipe.path}: model {m.model_name_or_path}{f' ({loading.gguf_file})' if loading.gguf_file else ''}"
          f", {lora}, attention {m.attn_implementation}, dtype {m.dtype}, bf16 {t.bf16}, max_length "
          f"{prepared.template.max_length}, batch {t.per_device_train_batch_size} x {t.gradient_accumulation_steps} "
          f"accumulation, {t.train_sampling_strategy}")
    print(f"train rows {len(chars)}: characters median {np.median(chars):.0f}, p90 {np.percentile(chars, 90):.0f}, "
          f"max {chars.max()}")


def pipeline_trainer(recipe, prepared, model=None):
    """`sft.run.build_trainer` (seeded: every variant starts from the same LoRA weights); padded batches keep the
    template's max_length (padding-free ones drop it)."""
    from sft.run import build_trainer

    if not recipe.training.padding_free:
        recipe.training.max_length = prepared.template.max_length
    return build_trainer(recipe, prepared, model=model)


class StepClock(TrainerCallback):
    """Wall/CPU time, load and real tokens at each optimizer step end (after a CUDA sync)."""

    def __init__(self, trainer):
        self.trainer, self.marks = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        # _total_train_tokens: real (non-pad) tokens seen, counted by TRL's and the pipeline's compute_loss
        self.marks.append((time.perf_counter(), time.process_time(), load1(), self.trainer._total_train_tokens))

    def after(self, warmup: int) -> dict:
        """Seconds (wall, cpu), steps, real tokens and loads from the end of step `warmup` (>= 1 step) to the last."""
        start = max(0, min(warmup, len(self.marks) - 1) - 1)  # mark i = end of step i + 1
        (w0, c0, l0, n0), (w1, c1, l1, n1) = self.marks[start], self.marks[-1]
        return dict(wall=w1 - w0, cpu=c1 - c0, steps=len(self.marks) - 1 - start, tokens=n1 - n0, loads=(l0, l1))


def timed_train(trainer, max_steps: int | None = None):
    """(StepClock, TrainOutput) of trainer.train(), for `max_steps` optimizer steps when given."""
    clock = StepClock(trainer)
    trainer.add_callback(clock)
    if max_steps is not None:
        trainer.args.max_steps = max_steps
    return clock, trainer.train()


def add_model_args(parser) -> None:
    from sft.scoring import ZERO_SHOT_MAX_LENGTH

    g = parser.add_argument_group("model (a training output, or a base model scored with a given template)")
    g.add_argument("--adapter", help="training output directory (LoRA adapter or full model) from sft/train.py")
    g.add_argument("--base", help="base model directory or id (when no --adapter)")
    g.add_argument("--gguf_file", help="GGUF file inside --base")
    g.add_argument("--verbalizers", nargs="+", help="answer words (default: the template's)")
    g.add_argument("--system_prompt", help="system prompt (default: the template's)")
    g.add_argument("--instruction", help="instruction (default: the template's)")
    g.add_argument("--max_length", type=int, default=None,
                   help=f"prompt + label tokens (default: the adapter's, or {ZERO_SHOT_MAX_LENGTH} for --base)")


def load_model_and_template(args):
    """(model, tokenizer, template, description), float32 in eval mode on the GPU if any, loaded as eval/evaluate.py
    does (a --base gets the default template with the project's zero-shot max_length), template options applied."""
    from sft.model import load_for_inference
    from sft.scoring import ZERO_SHOT_MAX_LENGTH
    from sft.sources import resolve_model

    if not (args.adapter or args.base):
        raise SystemExit("error: pass --adapter DIR or --base MODEL")
    base = None if args.adapter else resolve_model(args.base, args.gguf_file)  # a GGUF base: its dequantized copy
    model, tokenizer, template = load_for_inference(args.adapter, base, dtype="float32")
    gguf = f" ({args.gguf_file})" if args.gguf_file else ""
    what = f"adapter {args.adapter}" if args.adapter else f"base {args.base}{gguf}"
    changes = {k: getattr(args, k) for k in ("system_prompt", "instruction") if getattr(args, k)}
    if args.verbalizers:
        changes["verbalizers"] = tuple(args.verbalizers)
    if args.max_length or not args.adapter or template.max_length is None:
        changes["max_length"] = args.max_length or ZERO_SHOT_MAX_LENGTH
    return model, tokenizer, dataclasses.replace(template, **changes), what


class Clock:
    """Wall and process-CPU seconds accumulated over several `with clock:` blocks (CPU time counts every thread of
    this process: on a shared machine, wall time / CPU time shows how much of the cores the benchmark really got)."""

    wall = cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def table(rows: list[list], header: list[str]) -> str:
    """A small Markdown table (what docs/benchmarks.md shows is pasted from here)."""
    lines = ["| " + " | ".join(str(c) for c in r) + " |" for r in [header, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])


def bar_chart(path: str | None, labels: list[str], values: list[float], xlabel: str, title: str) -> None:
    """Horizontal bars with their values printed on them (the PNGs in docs/); nothing when `path` is None."""
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.55 * len(labels) + 1.2))
    bars = ax.barh(labels[::-1], values[::-1], color="#4C72B0")
    for bar, value in zip(bars, values[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.3g}", va="center", fontsize=9)
    ax.set(xlabel=xlabel, xlim=(0, max(values) * 1.18))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"chart written to {path}")
