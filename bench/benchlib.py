"""Shared helpers of the benchmark scripts: machine description, data, model loading, timing.

Every script prints its figures and ends with one summary line; `machine_line()` goes at the top so a pasted output
says where and under which load it was measured (the CPU is shared: the 1-minute load average is printed before
and after each measurement).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from a fresh checkout: sft/ and eval/ importable
    sys.path.insert(0, str(REPO))

SAMPLE_DIR = REPO / "tests" / "data" / "sample"
REAL_DATA = REPO / "data" / "chnsenticorp"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_line() -> str:
    import torch
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


def load_split(directory: str, split: str, limit: int | None = None) -> tuple[list[str], list[int]]:
    from sft.data import DataArguments, load_splits

    rows = load_splits(DataArguments(data_dir=directory), (split,))[split]
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return list(rows["text"]), list(rows["label"])


def add_model_args(parser, default_max_length: int = 256) -> None:
    g = parser.add_argument_group("model (a training output, or a base model scored with a given template)")
    g.add_argument("--adapter", help="training output directory (LoRA adapter or full model) from sft/train.py")
    g.add_argument("--base", help="base model directory or id (when no --adapter)")
    g.add_argument("--gguf_file", help="GGUF file inside --base")
    g.add_argument("--verbalizers", nargs="+", help="answer words (default: the template's)")
    g.add_argument("--system_prompt", help="system prompt (default: the template's)")
    g.add_argument("--instruction", help="instruction (default: the template's)")
    g.add_argument("--max_length", type=int, default=None,
                   help=f"prompt + label tokens (default: the adapter's, or {default_max_length} for --base)")
    parser.set_defaults(_default_max_length=default_max_length)


def load_model_and_template(args):
    """(model, tokenizer, template, description) in eval mode on CPU/GPU, from --adapter or --base."""
    import dataclasses

    import torch

    from sft.model import load_for_inference, load_model, load_tokenizer
    from sft.sources import resolve_model
    from sft.template import PromptTemplate

    if args.adapter:
        model, tokenizer, template = load_for_inference(args.adapter, dtype="float32")
        what = f"adapter {args.adapter}"
    elif args.base:
        base = resolve_model(args.base, args.gguf_file)  # a GGUF base: its dequantized copy
        model = load_model(base, dtype=torch.float32, use_safetensors=True)
        tokenizer = load_tokenizer(base)
        template = PromptTemplate()
        model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        what = f"base {args.base}" + (f" ({args.gguf_file})" if args.gguf_file else "")
    else:
        raise SystemExit("error: pass --adapter DIR or --base MODEL")
    changes = {k: getattr(args, k) for k in ("system_prompt", "instruction") if getattr(args, k)}
    if args.verbalizers:
        changes["verbalizers"] = tuple(args.verbalizers)
    if args.max_length or template.max_length is None:
        changes["max_length"] = args.max_length or args._default_max_length
    template = dataclasses.replace(template, **changes)
    return model, tokenizer, template, what


@dataclass
class Clock:
    """Wall and process-CPU seconds accumulated over several `with clock:` blocks (CPU time counts every thread of
    this process: on a shared machine, wall time / CPU time shows how much of the cores the benchmark really got)."""

    wall: float = 0.0
    cpu: float = 0.0
    loads: list[float] = field(default_factory=list)

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c
        self.loads.append(load1())
        return False

    @property
    def cores_used(self) -> float:
        return self.cpu / self.wall if self.wall else float("nan")


def table(rows: list[list], header: list[str]) -> str:
    """A small Markdown table (what docs/benchmarks.md shows is pasted from here)."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines)


def pipeline_trainer(recipe, tokenizer, template, train_ds, padding_free: bool | None = None,
                     strategy: str | None = None, head_at_labels: bool = True, model=None):
    """The pipeline's ClassificationSFTTrainer for `recipe` (a fresh model unless given), as sft/train.py builds it,
    with padding_free / sampling strategy / label-position loss overridden when given."""
    import torch

    from sft.model import load_model, lora_config, model_init_kwargs
    from sft.sources import resolve_model
    from sft.train import configure_training_args
    from sft.trainer import ClassificationSFTTrainer, disable_bnb_cpu_repack

    args = recipe.training
    if padding_free is not None:
        args.padding_free = padding_free
    if strategy is not None:
        args.train_sampling_strategy = strategy
    if not args.padding_free:
        args.max_length = template.max_length  # configure_training_args drops it for padding_free
    configure_training_args(args)
    if model is None:
        torch.manual_seed(args.seed)
        state = args.distributed_state
        kwargs = model_init_kwargs(recipe.model, args.trust_remote_code, str(state.distributed_type).split(".")[-1],
                                   state.local_process_index)
        model = load_model(resolve_model(recipe.model.model_name_or_path, recipe.loading.gguf_file), **kwargs)
        disable_bnb_cpu_repack(model)
    peft_config = lora_config(recipe.model, recipe.loading, model.config.num_hidden_layers)
    return ClassificationSFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                                    peft_config=peft_config, template=template, label_position_loss=head_at_labels)


def bar_chart(path: str, labels: list[str], values: list[float], xlabel: str, title: str) -> None:
    """Horizontal bars with their values printed on them (the PNGs in docs/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.55 * len(labels) + 1.2))
    bars = ax.barh(labels[::-1], values[::-1], color="#4C72B0")
    for bar, value in zip(bars, values[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.3g}", va="center", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(values) * 1.18)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
