"""Recipes: every shipped recipe parses; keys are the libraries' own; errors are one line each."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft.config import RecipeError, dump_resolved, parse_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    recipe = parse_recipe([str(path)])
    assert recipe.model.model_name_or_path
    assert recipe.training.output_dir.startswith("outputs/")
    if "qwen" in recipe.model.model_name_or_path.lower():
        assert recipe.template.verbalizers == ["负面", "正面"]
    assert len(recipe.template.verbalizers) == 2
    # TRL's defaults that would be wrong for this job are stated explicitly in every recipe.
    for key in ("learning_rate", "max_length", "bf16", "gradient_checkpointing", "num_train_epochs"):
        assert key in recipe.resolved, f"{path.name} does not state {key}"
    assert "save_steps" in recipe.resolved or recipe.resolved.get("save_strategy") == "no", path.name


def test_recipe_values_reach_the_dataclasses():
    recipe = parse_recipe([str(REPO / "recipes/qlora.yaml")])
    assert recipe.model.load_in_4bit and recipe.model.use_bnb_nested_quant
    assert recipe.model.bnb_4bit_quant_type == "nf4" and recipe.model.bnb_4bit_quant_storage == "bfloat16"
    assert recipe.training.optim == "paged_adamw_8bit"
    assert recipe.training.learning_rate == pytest.approx(2e-4)  # YAML reads 2.0e-4 fine; 2e-4 is a string
    assert recipe.model.lora_target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert recipe.training.lr_scheduler_type == "cosine" and recipe.training.warmup_steps == pytest.approx(0.1)
    assert recipe.training.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_cli_overrides_and_seed_aliases():
    recipe = parse_recipe([str(REPO / "recipes/lora.yaml"), "--use_qlora", "--lora_r", "8", "--lora_alpha", "16",
                           "--lora_dropout", "0.1", "--num_epochs", "2", "--batch_size", "4", "--learning_rate",
                           "1e-4", "--gradient_checkpointing", "false", "--resume_from_checkpoint", "none"])
    assert recipe.model.load_in_4bit and recipe.model.use_peft
    assert (recipe.model.lora_r, recipe.model.lora_alpha, recipe.model.lora_dropout) == (8, 16, 0.1)
    assert recipe.training.num_train_epochs == 2 and recipe.training.per_device_train_batch_size == 4
    assert recipe.training.learning_rate == pytest.approx(1e-4)
    assert recipe.training.gradient_checkpointing is False
    assert recipe.training.resume_from_checkpoint == "none"
    saved = dump_resolved(recipe)
    assert "load_in_4bit: true" in saved and "num_train_epochs: '2'" not in saved


def test_string_number_in_yaml_is_converted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\nlearning_rate: 2e-4\nnum_train_epochs: 2\n", encoding="utf-8")
    recipe = parse_recipe([str(path)])
    assert recipe.training.learning_rate == pytest.approx(2e-4)


@pytest.mark.parametrize(
    "content, message",
    [
        ("model_name_or_path: m\nlearning_rat: 1.0e-4\n", "unknown key 'learning_rat'; did you mean learning_rate"),
        ("model_name_or_path: m\nlora_r: sixteen\n", "key 'lora_r': invalid value 'sixteen'"),
        ("model_name_or_path: m\nbf16: 3\n", "key 'bf16': expected"),
        ("model_name_or_path: m\nnum_train_epochs: [1, 2]\n", "key 'num_train_epochs': expected a single value"),
        ("model_name_or_path: m\non_bad_rows: ignore\n", "key 'on_bad_rows': 'ignore' is not one of"),
        ("model_name_or_path: m\nlearning_rate: 1e-4\n  bad: [\n", "r.yaml:3:"),
        ("- just\n- a list\n", "must be a mapping"),
        ("learning_rate: 1.0e-4\n", "model_name_or_path is required"),
    ],
)
def test_recipe_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RecipeError) as err:
        parse_recipe([str(path)])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_and_unknown_cli_key():
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        parse_recipe(["nope.yaml"])
    with pytest.raises(RecipeError, match="command line: unknown key 'lora_rank'; did you mean local_rank, lora_r"):
        parse_recipe([str(REPO / "recipes/demo.yaml"), "--lora_rank", "8"])


def test_cli_prints_one_line_and_exits_2():
    result = subprocess.run(
        [sys.executable, "sft/train.py", "recipes/demo.yaml", "--learning_rat", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: command line: unknown key 'learning_rat'; did you mean learning_rate?")
    assert "Traceback" not in result.stderr


def test_checkpoint_defaults_suit_long_jobs(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\n", encoding="utf-8")
    recipe = parse_recipe([str(path)])
    assert (recipe.training.save_steps, recipe.training.save_total_limit) == (100, 3)
    assert parse_recipe([str(path), "--save_steps", "7"]).training.save_steps == 7


def test_override_spellings(tmp_path):
    """TRL's --config, --key=value, the dashed --key-name, a bare boolean flag and a multi-valued key."""
    demo = str(REPO / "recipes/demo.yaml")
    recipe = parse_recipe(["--config", demo, "--lora_r=8", "--lora-alpha", "4", "--use_peft", "--no_dev_metrics",
                           "--lora_target_modules", "q_proj", "v_proj", "--output_dir", str(tmp_path)])
    assert (recipe.model.lora_r, recipe.model.lora_alpha, recipe.model.use_peft) == (8, 4, True)
    assert recipe.model.lora_target_modules == ["q_proj", "v_proj"] and recipe.run.dev_metrics is False
    assert recipe.path == demo and recipe.training.output_dir == str(tmp_path)
    assert recipe.resolved["lora_target_modules"] == ["q_proj", "v_proj"] and recipe.resolved["lora_r"] == 8


def test_yaml_aliases_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_TEST_VAR", "unset")
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\nenv: {SFT_TEST_VAR: 1}\nuse_qlora: true\nnum_epochs: 2\n", encoding="utf-8")
    recipe = parse_recipe([str(path)])
    assert recipe.model.load_in_4bit and recipe.model.use_peft and recipe.training.num_train_epochs == 2
    assert "use_qlora" not in recipe.resolved and recipe.resolved["env"] == {"SFT_TEST_VAR": 1}
    assert os.environ["SFT_TEST_VAR"] == "1"  # TRL's `env:` handling


def test_runtime_wins_and_is_not_saved(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\nlogging_steps: 5\nseed: 1\n", encoding="utf-8")
    recipe = parse_recipe([str(path), "--seed", "2"], runtime={"seed": 3, "logging_steps": 9})
    assert (recipe.training.seed, recipe.training.logging_steps) == (3, 9)
    assert recipe.resolved == {"model_name_or_path": "m", "logging_steps": 5, "seed": 2}


def test_resolved_recipe_loads_again(tmp_path):
    recipe = parse_recipe([str(REPO / "recipes/qlora.yaml"), "--num_epochs", "2", "--lora_dropout", "0.1"])
    saved = tmp_path / "recipe.yaml"
    saved.write_text(dump_resolved(recipe), encoding="utf-8")
    again = parse_recipe([str(saved)])
    assert again.resolved == recipe.resolved
    assert again.training.num_train_epochs == 2 and again.model.lora_dropout == 0.1
    assert again.training.gradient_checkpointing_kwargs == {"use_reentrant": False}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bf16", "3"], "command line: key 'bf16': expected true/false, got 3"),
        (["--on_bad_rows", "ignore"], "command line: key 'on_bad_rows': 'ignore' is not one of ['error', 'skip']"),
        (["--lora_r", "x"], "command line: key 'lora_r': invalid value 'x'"),
        (["--lora_r"], "command line: key 'lora_r': expected one argument"),
        (["--lora_r", "8", "9"], "command line: unexpected arguments ['9'] (overrides are --key value)"),
        (["--learning_rat=1"], "command line: unknown key 'learning_rat'; did you mean learning_rate?"),
        (["--config"], "command line: --config needs a recipe path"),
    ],
)
def test_cli_errors_are_one_line(extra, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe([str(REPO / "recipes/demo.yaml"), *extra])
    assert str(err.value) == message


def test_empty_recipe_and_list_items(tmp_path):
    empty, bad_item = tmp_path / "empty.yaml", tmp_path / "bad.yaml"
    empty.write_text("# nothing\n", encoding="utf-8")
    bad_item.write_text("model_name_or_path: m\nlora_layers_to_transform: [1, x]\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="empty.yaml: the recipe is empty"):
        parse_recipe([str(empty)])
    with pytest.raises(RecipeError, match="bad.yaml: key 'lora_layers_to_transform': invalid value 'x'"):
        parse_recipe([str(bad_item)])
