"""Recipes: every shipped recipe parses; keys are the libraries' own; errors are one line each."""

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
