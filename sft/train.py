"""Fine-tune a Qwen chat model for text classification with TRL's SFTTrainer (LoRA, QLoRA or full).

    python sft/train.py recipes/demo.yaml [--key value ...]
    accelerate launch --config_file launch/single_gpu.yaml sft/train.py recipes/qlora.yaml

A thin script: parse the recipe (sft/config.py), run it (sft/run.py: fail-fast checks before the model load, the
trainer, the atomic `<output_dir>/final`), score the test split with do_predict (sft/evaluation.py), print where
the result is and how good it is.
"""

import signal
import sys
from pathlib import Path


def predict_test_split(recipe, final: Path) -> dict | None:
    """do_predict: score the test split with the saved final/ exactly as eval/evaluate.py would (reloaded from
    disk, so the figures are the ones any later evaluation of final/ reproduces); metrics on the main process."""
    from sft.evaluation import EvalOptions, evaluate

    return evaluate(EvalOptions(str(final), "test", max_length=recipe.run.predict_max_length,
                                batch_size=recipe.training.per_device_eval_batch_size))


def closing_lines(recipe, final: Path, test_metrics: dict | None) -> list[str]:
    """What the user reads last: where the result is, how good it is, and what to do with it."""
    from sft.artifacts import REPORT_FILE, eval_dir
    from sft.eval_report import summary_lines
    from sft.sources import BUILTIN

    lines = ["", f"{'adapter' if recipe.model.use_peft else 'model'}: {final}"]
    if test_metrics is not None:
        lines += summary_lines(test_metrics)
        lines.append(f"report: {eval_dir(final, 'test') / REPORT_FILE}")
    if str(recipe.model.model_name_or_path).startswith(BUILTIN):
        lines.append("note: the base is a tiny RANDOMLY initialised model: this run checks the plumbing (data, "
                     "template, training, saving, scoring), and chance accuracy (about 0.5) is expected. "
                     "A model that learns on a CPU: python sft/train.py recipes/cpu_smollm2_lora.yaml")
    lines.append(f"predict: python eval/predict.py --lora_path {final} --text \"房间很干净，服务也很热情\"")
    return lines


def main(argv: list[str] | None = None) -> int:
    from sft.config import RecipeError, make_parser, parse_recipe, usage
    from sft.quiet import setup_logging
    from sft.ranks import is_main_rank
    from sft.sources import check_hub_before_library_imports

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging("--verbose" in argv, main_process=is_main_rank())
    check_hub_before_library_imports()
    if {"-h", "--help"} & set(argv):
        print(usage())
        return 0
    if not argv:
        print(f"{usage()}\nerror: no recipe given", file=sys.stderr)
        return 2
    if "--help_all" in argv:
        print(make_parser().format_help())
        return 0

    from sft.artifacts import ResumeError
    from sft.data import DataError
    from sft.model import ModelLoadError
    from sft.ranks import init_cpu_distributed
    from sft.run import Preempted, train
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
        # Stopping already: the SIGTERM a launcher (torchrun) sends the ranks still exiting must not turn this
        # orderly exit, with its own code, into a kill.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training began): no checkpoint of this step
        print("stopped: interrupted by Ctrl-C without saving a checkpoint of the current step; the same command plus "
              "--resume_from_checkpoint auto resumes from the newest complete checkpoint, if any", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
