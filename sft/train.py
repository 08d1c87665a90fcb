"""Fine-tune a Qwen chat model for text classification with TRL's SFTTrainer (LoRA, QLoRA or full).

    python sft/train.py recipes/demo.yaml [--key value ...]
    accelerate launch --config_file launch/single_gpu.yaml sft/train.py recipes/qlora.yaml

Order matters for people on shared clusters: recipe, output directory, resume decision and data are checked
before the (possibly 20-minute) model load, so a typo costs seconds. The final adapter goes to
`<output_dir>/final` atomically and carries everything evaluation needs (template, base model, recipe).
"""

import os
import sys

if __name__ == "__main__":  # run as a script: keep sft/ off sys.path so data.py / model.py shadow nothing
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import logging  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

logger = logging.getLogger("sft.train")


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, step: int, output_dir: str):
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
            f"{output_dir}/checkpoint-{step}. Resume with the same command plus --resume_from_checkpoint auto"
        )


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


def prepare(recipe) -> Prepared:
    """Everything that can fail fast, in order, before a model is loaded: output_dir, resume decision, data,
    base model location, tokenizer and template, snapshot check. Only then is anything in output_dir changed."""
    from accelerate import PartialState

    from sft import run
    from sft.config import dump_resolved
    from sft.data import load_splits, write_rejects_file
    from sft.model import ensure_chat_template, load_tokenizer
    from sft.sources import resolve_model
    from sft.template import PromptTemplate

    args, state = recipe.training, PartialState()
    out = Path(args.output_dir)
    writable_dir(out)
    resume = run.decide_resume(out, args.resume_from_checkpoint, recipe.run.overwrite_output_dir)
    wants_eval = args.eval_strategy != "no"
    names = ("train", *(["validation"] if wants_eval else []), *(["test"] if args.do_predict else []))
    splits = load_splits(recipe.data, names, rejects_path=recipe.data.rejects_file or str(out / "rejected_rows.jsonl"),
                         write_rejects=False)

    with state.main_process_first():  # a built-in or GGUF base is built once, by the main process
        base = resolve_model(recipe.model.model_name_or_path, recipe.loading.gguf_file)
        own_tokenizer = recipe.loading.tokenizer_name_or_path
        tokenizer_source = resolve_model(own_tokenizer) if own_tokenizer else base
    tokenizer = load_tokenizer(tokenizer_source, recipe.model.model_revision, args.trust_remote_code)
    ensure_chat_template(tokenizer, own_tokenizer or recipe.model.model_name_or_path, args.chat_template_path)
    template = PromptTemplate.from_args(recipe.template, args.max_length)
    train = to_records(splits["train"], template, tokenizer, "train")
    eval_records = to_records(splits["validation"], template, tokenizer, "dev") if wants_eval else None
    snapshot = run.make_snapshot(recipe.model, recipe.loading, template.to_dict(),
                                 splits["train"]["text"], splits["train"]["label"])
    if resume is not None:
        run.check_snapshot(resume, snapshot)

    if state.is_main_process:
        if resume is None and recipe.run.overwrite_output_dir:
            run.clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        if splits.load_report.get("rejects"):
            write_rejects_file(splits.load_report["rejects_file"], splits.load_report.pop("rejects"))
        run.write_json(out / run.SNAPSHOT_FILE, snapshot)
        (out / "recipe.yaml").write_text(dump_resolved(recipe), encoding="utf-8")
    state.wait_for_everyone()
    return Prepared(base, tokenizer, template, splits, train, eval_records, resume, snapshot)


def configure_training_args(args) -> None:
    """Settle the library defaults that would be wrong here."""
    if args.padding_free:
        # TRL refuses padding_free with max_length unless inputs are pre-truncated; the template already fits
        # every example into template.max_length, so TRL's own truncation is not needed.
        args.max_length = None
    if args.gradient_checkpointing and args.gradient_checkpointing_kwargs is None:
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False  # nothing to pin to without an accelerator


def save_final(trainer, recipe, prepared: Prepared, extra_metrics: dict) -> Path:
    """Write <output_dir>/final atomically (temp dir + rename) and check the adapter is not empty."""
    from sft import run
    from sft.model import base_signature
    from sft.model_card import write_model_card
    from sft.sources import base_location

    template, snapshot = prepared.template, prepared.snapshot
    out = Path(recipe.training.output_dir)
    final, tmp = out / run.FINAL_DIR, out / (run.FINAL_DIR + ".tmp")
    if trainer.accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # every rank joins: ZeRO-3 gathers the sharded weights here
    if trainer.accelerator.is_main_process:
        peft = recipe.model.use_peft
        if peft:
            run.check_adapter_weights(tmp)
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe below says the same, as data
        template.save(tmp)
        (tmp / "recipe.yaml").write_text((out / "recipe.yaml").read_text(encoding="utf-8"), encoding="utf-8")
        base_config = trainer.model.get_base_model().config if peft else trainer.model.config
        run_info = {
            "base_model": recipe.model.model_name_or_path,
            "base_model_local": base_location(recipe.model.model_name_or_path, final),
            "model_revision": recipe.model.model_revision,
            "gguf_file": recipe.loading.gguf_file,
            "base_signature": base_signature(base_config),
            "kind": ("qlora" if recipe.model.load_in_4bit else "lora") if peft else "full",
            "world_size": trainer.accelerator.num_processes,
            "working_dir": os.getcwd(),  # the recipe's relative data paths were relative to it
            "data": getattr(prepared.splits, "load_report", None),  # files read, rejected rows, filters
            "versions": run.library_versions(),
            "git_commit": run.git_commit(),
        }
        run.write_json(tmp / "run_info.json", run_info)
        run.write_json(tmp / run.SNAPSHOT_FILE, snapshot)
        run.write_json(tmp / "train_results.json", extra_metrics)
        run.plot_loss_curve(trainer.state.log_history, tmp / "loss_curve.png")
        run.swap_in(tmp, final)
        write_model_card(final, run_info, recipe.resolved, extra_metrics)  # after the swap: it shows final's path
        logger.info("final %s written to %s", "adapter" if peft else "model", final)
    trainer.accelerator.wait_for_everyone()
    return final


def train(recipe):
    """Run one recipe end to end; returns (trainer, final output directory)."""
    from sft.model import load_model, lora_config, model_init_kwargs
    from sft.trainer import ClassificationSFTTrainer, PreemptionCallback, disable_bnb_cpu_repack

    prepared = prepare(recipe)
    args = recipe.training
    configure_training_args(args)

    state = args.distributed_state
    kwargs = model_init_kwargs(recipe.model, args.trust_remote_code, str(state.distributed_type).split(".")[-1],
                               state.local_process_index)
    model = load_model(prepared.base, **kwargs)
    disable_bnb_cpu_repack(model)
    trainer = ClassificationSFTTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train_records,
        eval_dataset=prepared.eval_records,
        processing_class=prepared.tokenizer,
        peft_config=lora_config(recipe.model, recipe.loading, model.config.num_hidden_layers),
        template=prepared.template,
        dev_split=prepared.splits["validation"] if prepared.eval_records is not None and recipe.run.dev_metrics
        else None,
        label_position_loss=recipe.run.label_position_loss,
    )
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    try:
        result = trainer.train(resume_from_checkpoint=prepared.resume)
    finally:
        preemption.restore()
    if preemption.received is not None:
        raise Preempted(preemption.received, trainer.state.global_step, args.output_dir)
    metrics = dict(result.metrics)
    if prepared.eval_records is not None:  # the final model's dev metrics, without re-running a fresh evaluation
        last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        fresh = last is not None and last["step"] == trainer.state.global_step and not args.load_best_model_at_end
        metrics.update({k: v for k, v in last.items() if k.startswith("eval_")} if fresh else trainer.evaluate())
    trainer.log_metrics("train", metrics)
    return trainer, save_final(trainer, recipe, prepared, metrics)


def predict_test_split(recipe, final: Path) -> dict | None:
    """do_predict: score the test split with the saved final/ exactly as eval/evaluate.py would (reloaded from
    disk, so the figures are the ones any later evaluation of final/ reproduces); metrics on the main process."""
    from eval.evaluate import evaluate_adapter

    return evaluate_adapter(str(final), "test", max_length=recipe.run.predict_max_length,
                            batch_size=recipe.training.per_device_eval_batch_size)


def closing_lines(recipe, final: Path, test_metrics: dict | None) -> list[str]:
    """What the user reads last: where the result is, how good it is, and what to do with it."""
    from eval.evaluate import summary_lines
    from sft.sources import BUILTIN

    lines = ["", f"{'adapter' if recipe.model.use_peft else 'model'}: {final}"]
    if test_metrics is not None:
        lines += summary_lines(test_metrics)
        lines.append(f"report: {final / 'eval_test' / 'report.md'}")
    if str(recipe.model.model_name_or_path).startswith(BUILTIN):
        lines.append("note: the base is a tiny RANDOMLY initialised model: this run checks the plumbing (data, "
                     "template, training, saving, scoring), and chance accuracy (about 0.5) is expected. "
                     "A model that learns on a CPU: python sft/train.py recipes/cpu_smollm2_lora.yaml")
    lines.append(f"predict: python eval/predict.py --lora_path {final} --text \"房间很干净，服务也很热情\"")
    return lines


def main(argv: list[str] | None = None) -> int:
    from sft.config import RecipeError, make_parser, parse_recipe, usage
    from sft.quiet import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging("--verbose" in argv, main_process=os.environ.get("RANK", "0") == "0")
    if {"-h", "--help"} & set(argv):
        print(usage())
        return 0
    if not argv:
        print(f"{usage()}\nerror: no recipe given", file=sys.stderr)
        return 2
    if "--help_all" in argv:
        print(make_parser().format_help())
        return 0

    from sft.data import DataError
    from sft.model import ModelLoadError, init_cpu_distributed
    from sft.run import ResumeError
    from sft.template import TemplateError

    try:
        runtime = {"accelerator_config": {"use_configured_state": True}} if init_cpu_distributed() else None
        recipe = parse_recipe([a for a in argv if a != "--verbose"], runtime)
        trainer, final = train(recipe)
        test_metrics = predict_test_split(recipe, final) if recipe.training.do_predict else None
        if trainer.accelerator.is_main_process:
            print("\n".join(closing_lines(recipe, final, test_metrics)))
        trainer.end()  # finish trackers, destroy the process group
    except (RecipeError, DataError, ResumeError, OSError, TemplateError, ModelLoadError) as e:  # OSError: paths
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
