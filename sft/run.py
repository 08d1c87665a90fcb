"""One training run: fail-fast preparation, the trainer as the pipeline builds it, training, the atomic final/.

sft/train.py and the training benchmarks (bench/) both go through `prepare` and `build_trainer`, so a benchmark
measures exactly the trainer a recipe runs. Order matters for people on shared clusters: output directory, resume
decision, data, base model location, tokenizer, template and snapshot are checked before the (possibly 20-minute)
model load, so a typo costs seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sft import artifacts
from sft.ranks import distributed_type

logger = logging.getLogger(__name__)


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, step: int, output_dir: str):
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
            f"{output_dir}/checkpoint-{step}. Resume with the same command plus --resume_from_checkpoint auto"
        )


@dataclass
class Prepared:
    """What the early checks produced; the model is loaded only after all of it exists."""

    base: str  # what from_pretrained loads: a local folder (resolved from builtin:/package:/GGUF) or a hub id
    tokenizer: Any
    template: Any
    splits: Any  # DatasetDict of text/label rows, with .load_report
    train_records: Any
    eval_records: Any
    resume: str | None
    snapshot: dict


def to_records(split, template, tokenizer, name: str):
    """text/label rows -> TRL prompt-completion records, built by the template (the only prompt builder)."""

    def record(example):
        return template.training_record(example["text"], example["label"], tokenizer)

    return split.map(record, remove_columns=["text", "label"], desc=f"prompt template ({name})")


def writable_dir(path: Path) -> None:
    """output_dir, or the nearest folder that exists above it, must be writable (checked before any work)."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"{path}: output_dir is not writable ({existing} is not a writable directory)")


def load_tokenizer_and_template(recipe, state):
    """(base folder or hub id, tokenizer, template); a built-in or GGUF base is built once, by the main process."""
    from sft.model import ensure_chat_template, load_tokenizer
    from sft.sources import resolve_model
    from sft.template import PromptTemplate

    with state.main_process_first():
        base = resolve_model(recipe.model.model_name_or_path, recipe.loading.gguf_file)
        own_tokenizer = recipe.loading.tokenizer_name_or_path
        tokenizer_source = resolve_model(own_tokenizer) if own_tokenizer else base
    tokenizer = load_tokenizer(tokenizer_source, recipe.model.model_revision, recipe.training.trust_remote_code)
    ensure_chat_template(tokenizer, own_tokenizer or recipe.model.model_name_or_path,
                         recipe.training.chat_template_path)
    return base, tokenizer, PromptTemplate.from_args(recipe.template, recipe.training.max_length)


def prepare(recipe) -> Prepared:
    """Everything that can fail fast, in order, before a model is loaded: output_dir, resume decision, data,
    base model location, tokenizer and template, snapshot check. Only then is anything in output_dir changed."""
    from accelerate import PartialState

    from sft.config import dump_resolved
    from sft.data import load_splits, write_rejects_file

    args, state = recipe.training, PartialState()
    out = Path(args.output_dir)
    writable_dir(out)
    resume = artifacts.decide_resume(out, args.resume_from_checkpoint, recipe.run.overwrite_output_dir)
    wants_eval = args.eval_strategy != "no"
    names = ("train", *(["validation"] if wants_eval else []), *(["test"] if args.do_predict else []))
    rejects = recipe.data.rejects_file or str(out / artifacts.REJECTS_FILE)
    splits = load_splits(recipe.data, names, rejects_path=rejects, write_rejects=False)
    base, tokenizer, template = load_tokenizer_and_template(recipe, state)
    train = to_records(splits["train"], template, tokenizer, "train")
    eval_records = to_records(splits["validation"], template, tokenizer, "dev") if wants_eval else None
    snapshot = artifacts.make_snapshot(recipe.model, recipe.loading, template.to_dict(),
                                       splits["train"]["text"], splits["train"]["label"])
    if resume is not None:
        artifacts.check_snapshot(resume, snapshot, recipe.run.allow_unverified_resume)

    if state.is_main_process:
        if resume is None and recipe.run.overwrite_output_dir:
            artifacts.clear_previous_run(out)
        artifacts.recover_final(out / artifacts.FINAL_DIR)  # what a crash during the last final swap left
        out.mkdir(parents=True, exist_ok=True)
        if splits.load_report.get("rejects"):
            write_rejects_file(splits.load_report["rejects_file"], splits.load_report.pop("rejects"))
        artifacts.write_text_atomic(out / artifacts.RECIPE_FILE, dump_resolved(recipe))
    state.wait_for_everyone()
    return Prepared(base, tokenizer, template, splits, train, eval_records, resume, snapshot)


def configure_training_args(args) -> None:
    """Settle the library defaults that would be wrong here."""
    from sft.model import cpu_has_native_bf16

    if args.padding_free:
        # TRL refuses padding_free with max_length unless inputs are pre-truncated; the template already fits
        # every example into template.max_length, so TRL's own truncation is not needed.
        args.max_length = None
    if args.gradient_checkpointing and args.gradient_checkpointing_kwargs is None:
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False  # nothing to pin to without an accelerator
        if args.bf16 and not cpu_has_native_bf16():
            logger.warning("bf16: this CPU has no native bf16 (avx512_bf16 / amx_bf16), where autocast is emulated "
                           "and many times slower: training in float32 instead (pass --bf16 false to silence this)")
            args.bf16, args.mixed_precision = False, "no"


def load_base_model(recipe, base: str):
    """The base model as the recipe asks for it (dtype, attention, 4-bit, device map for this rank)."""
    from sft.model import load_model, model_init_kwargs
    from sft.trainer import disable_bnb_cpu_repack

    state = recipe.training.distributed_state
    kwargs = model_init_kwargs(recipe.model, recipe.training.trust_remote_code, distributed_type(state),
                               state.local_process_index)
    model = load_model(base, **kwargs)
    disable_bnb_cpu_repack(model)
    return model


def build_trainer(recipe, prepared: Prepared, model=None):
    """The pipeline's ClassificationSFTTrainer for `recipe` (the base model loaded unless given)."""
    from transformers import set_seed

    from sft.model import lora_config
    from sft.trainer import ClassificationSFTTrainer

    configure_training_args(recipe.training)
    model = model if model is not None else load_base_model(recipe, prepared.base)
    set_seed(recipe.training.seed)  # TRL creates the LoRA weights before Trainer seeds: the recipe's seed decides them
    dev = prepared.eval_records is not None and recipe.run.dev_metrics
    return ClassificationSFTTrainer(
        model=model,
        args=recipe.training,
        train_dataset=prepared.train_records,
        eval_dataset=prepared.eval_records,
        processing_class=prepared.tokenizer,
        peft_config=lora_config(recipe.model, recipe.loading, model.config.num_hidden_layers),
        template=prepared.template,
        dev_split=prepared.splits["validation"] if dev else None,
        label_position_loss=recipe.run.label_position_loss,
        snapshot=prepared.snapshot,
    )


def final_dev_metrics(trainer) -> dict:
    """The final model's dev metrics: the last evaluation's when it ran at the last step, else a fresh one."""
    history, step = trainer.state.log_history, trainer.state.global_step
    last = next((h for h in reversed(history) if "eval_loss" in h), None)
    if last is not None and last["step"] == step and not trainer.args.load_best_model_at_end:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def run_info(trainer, recipe, prepared: Prepared, final: Path) -> artifacts.RunInfo:
    """run_info.json of this run: the base as named, how it was trained, on what data, with which libraries."""
    from sft.sources import base_location

    peft = recipe.model.use_peft
    state = trainer.accelerator.state
    deepspeed = getattr(state, "deepspeed_plugin", None)
    return artifacts.RunInfo(
        base_model=recipe.model.model_name_or_path,
        kind=("qlora" if recipe.model.load_in_4bit else "lora") if peft else "full",
        base_signature=artifacts.base_signature((trainer.model.get_base_model() if peft else trainer.model).config),
        base_model_local=base_location(recipe.model.model_name_or_path, final),
        model_revision=recipe.model.model_revision,
        gguf_file=recipe.loading.gguf_file,
        world_size=trainer.accelerator.num_processes,
        distributed_type=distributed_type(state),
        zero_stage=deepspeed.zero_stage if deepspeed is not None else None,
        working_dir=os.getcwd(),
        data=getattr(prepared.splits, "load_report", None),
        versions=artifacts.library_versions(),
        git_commit=artifacts.git_commit(),
        resumed_from=prepared.resume,
        steps_run=trainer.step_counter.steps,
    )


def save_final(trainer, recipe, prepared: Prepared, metrics: dict) -> Path:
    """Write <output_dir>/final atomically (temp dir + rename) and check the adapter is not empty."""
    from sft.metrics import plot_loss_curve
    from sft.model_card import write_model_card

    out = Path(recipe.training.output_dir)
    final, tmp = out / artifacts.FINAL_DIR, out / (artifacts.FINAL_DIR + ".tmp")
    # prepare() has already recovered what a crash left (final.old, final.tmp)
    trainer.save_model(str(tmp))  # every rank joins: ZeRO-3 gathers the sharded weights here
    if trainer.accelerator.is_main_process:
        if recipe.model.use_peft:
            artifacts.check_adapter_weights(tmp)
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe below says the same, as data
        prepared.template.save(tmp)
        shutil.copy(out / artifacts.RECIPE_FILE, tmp / artifacts.RECIPE_FILE)
        info = run_info(trainer, recipe, prepared, final)
        info.save(tmp)
        artifacts.write_json(tmp / artifacts.SNAPSHOT_FILE, prepared.snapshot)
        artifacts.write_json(tmp / artifacts.TRAIN_RESULTS_FILE, metrics)
        plot_loss_curve(trainer.state.log_history, tmp / artifacts.LOSS_CURVE_FILE)
        artifacts.swap_in(tmp, final)
        write_model_card(final, dataclasses.asdict(info), recipe.resolved, metrics)  # after the swap: final path
        logger.info("final %s written to %s", "adapter" if recipe.model.use_peft else "model", final)
    trainer.accelerator.wait_for_everyone()
    return final


def train(recipe):
    """Run one recipe end to end; returns (trainer, final output directory)."""
    from sft.trainer import PreemptionCallback

    prepared = prepare(recipe)
    trainer = build_trainer(recipe, prepared)
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    try:
        result = trainer.train(resume_from_checkpoint=prepared.resume)
    finally:
        preemption.restore()
    if preemption.received is not None:
        trainer.accelerator.wait_for_everyone()  # no rank exits (and gets the rest killed) before the save is done
        raise Preempted(preemption.received, trainer.state.global_step, recipe.training.output_dir)
    metrics = dict(result.metrics)
    if prepared.eval_records is not None:
        metrics.update(final_dev_metrics(trainer))
    trainer.log_metrics("train", metrics)
    return trainer, save_final(trainer, recipe, prepared, metrics)
