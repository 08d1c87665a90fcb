"""The run directory: its file names, RunInfo, resume decisions, the run snapshot and the atomic final swap.

`<output_dir>/final/` is the contract between training and everything after it (evaluate, predict, merge, serve):
whoever loads it needs nothing else to rebuild the exact prompt, labels and base model. Every file name of that
format, and the one reader and writer of run_info.json, live here. Plain functions on paths and dicts, so the tests
hit them directly.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
RUN_INFO_FILE = "run_info.json"
SNAPSHOT_FILE = "run_snapshot.json"
RECIPE_FILE = "recipe.yaml"
TEMPLATE_FILE = "template.json"
TRAIN_RESULTS_FILE = "train_results.json"
LOSS_CURVE_FILE = "loss_curve.png"
REJECTS_FILE = "rejected_rows.jsonl"
ADAPTER_CONFIG_FILE = "adapter_config.json"
CARD_FILE = "README.md"  # the model card (sft/model_card.py)
EVAL_RESULTS_FILE = "eval_results.json"  # the figures the card is rebuilt from
# an evaluation's outputs, in <final>/eval_<split>/ unless --out says otherwise
PREDICTIONS_FILE, METRICS_FILE, REPORT_FILE = "predictions.jsonl", "metrics.json", "report.md"
PLOT_FILES = {"roc": "roc.png", "confusion": "confusion.png", "reliability": "reliability.png"}
# {"temperature": T, ...}: written by eval/evaluate.py --calibrate with its report and into the training output,
# where SentimentPredictor applies it (probabilities = softmax(label log-probs / T))
CALIBRATION_FILE = "calibration.json"
# Config fields that must agree between an adapter's base and the model it is applied to.
BASE_SIGNATURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def base_signature(config) -> dict:
    return {key: getattr(config, key, None) for key in BASE_SIGNATURE_KEYS}


@dataclass
class RunInfo:
    """run_info.json: what a final/ directory was trained from, and how; read by everything that loads it."""

    base_model: str | None  # as the recipe named it (hub id, path, package:/builtin: spec)
    kind: str  # lora | qlora | full | merged | zero-shot
    base_signature: dict = field(default_factory=dict)
    base_model_local: dict | None = None  # a local base: absolute and relative-to-adapter paths (sources.py)
    model_revision: str | None = None
    gguf_file: str | None = None
    world_size: int = 1
    distributed_type: str = "NO"
    zero_stage: int | None = None  # DeepSpeed ZeRO stage, when DeepSpeed ran
    working_dir: str | None = None  # the recipe's relative data paths were relative to it
    data: dict | None = None  # files read, rejected rows, filters
    versions: dict = field(default_factory=dict)
    git_commit: str | None = None
    merged_from: str | None = None  # merge.py: the adapter folded in, its kind and the merged dtype
    adapter_kind: str | None = None
    merged_dtype: str | None = None
    resumed_from: str | None = None  # the checkpoint this process resumed, None for a fresh run
    steps_run: int | None = None  # optimizer steps this process ran (a resume runs only the remaining ones)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / RUN_INFO_FILE
        write_json(path, dataclasses.asdict(self))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> RunInfo:
        """The run_info.json of a training output, with one-line errors for a folder that is not one."""
        path = Path(directory) / RUN_INFO_FILE
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{directory}: adapter directory does not exist")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; {directory} is not an output directory of sft/train.py")
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(cls)}  # keys of a newer version are ignored, not fatal
        return cls(**{"base_model": None, "kind": "lora"} | {k: v for k, v in data.items() if k in known})


def eval_dir(adapter: str | Path, split: str) -> Path:
    """Where an evaluation of `split` writes by default: inside the adapter, so its card can point at it."""
    return Path(adapter) / f"eval_{split}"


def read_temperature(directory: str | Path) -> float | None:
    """The temperature of `directory/calibration.json`, None when there is none; a broken file is an error, since
    ignoring it would silently serve uncalibrated probabilities."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("temperature")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object with a 'temperature' ({e})") from e
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{path}: 'temperature' must be a positive number, got {value!r}")
    return float(value)


def read_recipe(directory: str | Path) -> dict:
    """The resolved recipe.yaml saved with a run ({} when there is none, e.g. a zero-shot folder)."""
    path = Path(directory) / RECIPE_FILE
    recipe = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    return recipe if isinstance(recipe, dict) else {}


def is_adapter(directory: str | Path) -> bool:
    """A LoRA/QLoRA adapter (applied to its base) rather than a complete model."""
    return (Path(directory) / ADAPTER_CONFIG_FILE).is_file()


class ResumeError(ValueError):
    """The requested resume cannot happen; one line saying why and what to do."""


# ----- resume ---------------------------------------------------------------------------------------------------
def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def is_complete_checkpoint(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def decide_resume(output_dir: str | Path, requested: str | None, overwrite: bool) -> str | None:
    """Map `resume_from_checkpoint` (auto | none | PATH) to a checkpoint path or None, before any model loads."""
    out = Path(output_dir)
    mode = (requested or "none").strip()
    if mode.lower() == "auto":
        complete = [p for p in checkpoints(out) if is_complete_checkpoint(p)]
        if not complete:
            logger.info("resume_from_checkpoint=auto: no checkpoint in %s, starting fresh", out)
            return None
        broken = [p.name for p in checkpoints(out) if not is_complete_checkpoint(p)]
        if broken:
            logger.warning("ignoring incomplete checkpoints (no trainer_state.json): %s", ", ".join(broken))
        logger.info("resume_from_checkpoint=auto: resuming from %s", complete[-1])
        return str(complete[-1])
    if mode.lower() in ("none", "false", "no", ""):
        leftovers = [p.name for p in out.iterdir()] if out.is_dir() else []
        if leftovers and not overwrite:
            raise ResumeError(
                f"{out}: output_dir is not empty ({', '.join(sorted(leftovers)[:4])}...); pass "
                "--resume_from_checkpoint auto to continue it or --overwrite_output_dir true to start over"
            )
        return None
    path = Path(mode)
    if not path.is_dir():
        raise ResumeError(f"{path}: checkpoint to resume from does not exist")
    if not is_complete_checkpoint(path):
        raise ResumeError(f"{path}: not a complete checkpoint (no trainer_state.json); pick another or use auto")
    return str(path)


def clear_previous_run(output_dir: str | Path) -> None:
    """--overwrite_output_dir: remove old checkpoints and final output so `auto` never picks up a stale run."""
    out = Path(output_dir)
    for path in [*checkpoints(out), out / FINAL_DIR, out / SNAPSHOT_FILE]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ----- snapshot: what a checkpoint was trained on -------------------------------------------------------------
def fingerprint_examples(texts: list[str], labels: list[int]) -> str:
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()[:16]


def make_snapshot(model_args, loading_args, template: dict, train_texts: list[str], train_labels: list[int]) -> dict:
    """Everything that must not change between a checkpoint and the run that resumes it."""
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "model_revision": model_args.model_revision,
        "gguf_file": loading_args.gguf_file,
        "use_peft": model_args.use_peft,
        "load_in_4bit": model_args.load_in_4bit,
        "dtype": model_args.dtype,
        # the adapter's shape: a checkpoint's LoRA weights only mean something with the same r, alpha and layers
        "lora_r": model_args.lora_r if model_args.use_peft else None,
        "lora_alpha": model_args.lora_alpha if model_args.use_peft else None,
        "lora_target_modules": model_args.lora_target_modules if model_args.use_peft else None,
        "lora_layers_to_transform": loading_args.lora_layers_to_transform if model_args.use_peft else None,
        "template": template,
        "train_rows": len(train_texts),
        "train_fingerprint": fingerprint_examples(train_texts, train_labels),
    }


def check_snapshot(checkpoint: str | Path, current: dict, allow_unverified: bool = False) -> None:
    """Resuming a checkpoint with another model, data, template or LoRA shape silently trains something else: refuse.
    Only the checkpoint's own snapshot counts, so a checkpoint copied elsewhere is checked too."""
    ckpt = Path(checkpoint)
    path = ckpt / SNAPSHOT_FILE
    if not path.is_file():
        if not allow_unverified:
            raise ResumeError(f"{ckpt}: no {SNAPSHOT_FILE}, so nothing shows it was trained with this recipe's model, "
                              "data, template and LoRA shape; pass --allow_unverified_resume true to resume it anyway")
        logger.warning("%s: no %s; resuming without checking it against the recipe (allow_unverified_resume)",
                       ckpt, SNAPSHOT_FILE)
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ResumeError(f"{path}: unreadable run snapshot ({e})") from None
    saved = saved if isinstance(saved, dict) else {}
    diffs = [key for key in current if saved.get(key) != current[key]]
    if diffs:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs recipe {current[k]!r}" for k in diffs[:3])
        raise ResumeError(f"{ckpt}: recipe differs from the checkpoint's run ({details})")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to path.tmp, then rename: a reader sees the old file or the complete new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


# ----- final output ---------------------------------------------------------------------------------------------
def swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` with the complete `tmp`. On Linux the two names are exchanged by one atomic rename (renameat2
    RENAME_EXCHANGE): a crash leaves the old complete `final` or the new one, never neither; the old one, now under
    tmp's name, is then removed (by the next run's `recover_final` if a crash came first). Where the exchange is not
    supported, two renames (final -> final.old, tmp -> final): a crash between them leaves final.old and no
    `final` until the next run's `recover_final` restores it."""
    old = final.with_name(final.name + ".old")
    if final.exists() and exchange_paths(tmp, final):
        shutil.rmtree(tmp)
        return
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS or the file
    system cannot (macOS, Windows, NFS...)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def recover_final(final: Path) -> None:
    """Finish what a crash in `swap_in` left: final.old without `final` is the last complete output (restored),
    final.old next to `final` is the replaced one (removed), and so is a leftover final.tmp."""
    old, tmp = final.with_name(final.name + ".old"), final.with_name(final.name + ".tmp")
    if old.exists() and not final.exists():
        logger.warning("%s: restoring the previous output from %s (a crash interrupted its replacement)", final, old)
        os.replace(old, final)
    for leftover in (old, tmp):
        if leftover.exists():
            shutil.rmtree(leftover)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def check_adapter_weights(directory: str | Path) -> int:
    """Reload the saved adapter: it must hold LoRA tensors and a non-zero lora_B (ZeRO-3 saves empty ones, trl#4416)."""
    from safetensors.torch import load_file

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise RuntimeError(f"{path}: adapter weights were not written")
    tensors = load_file(str(path))
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    if not tensors or not lora_b or any(v.numel() == 0 for v in tensors.values()):
        raise RuntimeError(f"{path}: saved adapter is empty ({len(tensors)} tensors); under ZeRO-3 enable "
                           "zero3_save_16bit_model / stage3_gather_16bit_weights_on_model_save")
    if all(float(v.abs().max()) == 0.0 for v in lora_b.values()):
        raise RuntimeError(f"{path}: every lora_B weight is zero: the adapter is untrained or was saved empty")
    return len(tensors)
