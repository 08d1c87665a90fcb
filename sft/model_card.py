"""The training output's README.md as a Hugging Face model card, replacing the empty template PEFT writes.

`write_model_card` runs when training saves `final/`; `add_eval_results` runs after eval/evaluate.py scored a split.
The card is always rebuilt whole from its sources — run_info.json, recipe.yaml and eval_results.json (the dev metrics
and the figures of each evaluated split, kept next to the card) — so a second evaluation of a split replaces its
figures instead of appending a copy, and the other splits and the dev metrics survive every rewrite.

Front matter (built with huggingface_hub's ModelCardData / EvalResult, never hand-written YAML):
- `datasets` names a hub dataset only when one is known: `dataset_name` when the data came from the hub, or
  `lansinuote/ChnSentiCorp` for a local directory named ...chnsenticorp (the hub copy of the same splits). Other local
  data is described in the body but left out of `datasets`: a folder name is not a hub id and would link elsewhere.
- `model-index` holds the model's figures on the splits eval/evaluate.py scored (not the training-time dev metrics,
  which may cover a capped sample): accuracy, macro F1 and ROC-AUC.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sft.run import write_json, write_text_atomic

CARD_FILE = "README.md"
RESULTS_FILE = "eval_results.json"  # the structured figures the card is rebuilt from
PEFT_KINDS = ("lora", "qlora")
CHNSENTICORP_HUB_ID = "lansinuote/ChnSentiCorp"
FIGURE_KEYS = ("n", "accuracy", "f1", "auc", "ece", "brier")
# metrics.json key, hub metric id, display name
METRICS = (("accuracy", "accuracy", "accuracy"), ("f1", "f1", "macro F1"), ("auc", "roc_auc", "ROC-AUC"))
DEV_LABELS = {"eval_accuracy": "accuracy", "eval_f1": "macro F1", "eval_auc": "ROC-AUC", "eval_ece": "ECE",
              "eval_brier": "Brier", "eval_loss": "loss", "train_loss": "train loss (mean)",
              "train_runtime": "train runtime (s)", "epoch": "epochs"}
LORA_KNOBS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_layers_to_transform")
RECIPE_KNOBS = ("load_in_4bit", *LORA_KNOBS, "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
                "weight_decay", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_length", "max_train_samples", "completion_only_loss", "dtype",
                "bf16", "seed")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class DataSource(NamedTuple):
    hub_id: str | None  # for the front matter's `datasets`
    name: str  # the model-index dataset type/name
    description: str  # one markdown line for the body


# ----- public API -------------------------------------------------------------------------------------------------
def write_model_card(final_dir: str | Path, run_info: dict, recipe: dict, dev_metrics: dict | None = None) -> Path:
    """Write `final_dir/README.md`. `dev_metrics=None` keeps the stored ones (eval_results.json, else
    train_results.json), so rewriting the card never drops figures it already showed."""
    final = Path(final_dir)
    stored = _load_results(final)
    if dev_metrics is not None:
        stored["dev"] = _dev_figures(dev_metrics)
        write_json(final / RESULTS_FILE, stored)
    card = build_card(str(final_dir), run_info or {}, recipe or {}, stored)
    path = final / CARD_FILE
    write_text_atomic(path, str(card))
    return path


def add_eval_results(final_dir: str | Path, split: str, metrics: dict) -> Path:
    """Record eval/evaluate.py's metrics.json figures for `split` (replacing earlier ones) and rebuild the card;
    run_info.json and recipe.yaml of the same directory supply the rest, so an output without a card gets one."""
    final = Path(final_dir)
    stored = _load_results(final)
    stored["splits"][split] = _figures(metrics)
    write_json(final / RESULTS_FILE, stored)
    run_info = _read_json(final / "run_info.json")
    recipe_path = final / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else None
    return write_model_card(final_dir, run_info if isinstance(run_info, dict) else {},
                            recipe if isinstance(recipe, dict) else {})


def build_card(final_dir: str, run_info: dict, recipe: dict, stored: dict) -> ModelCard:
    """The whole card from its sources; `final_dir` is shown as given (a relative path stays relative)."""
    final, name = Path(final_dir), _model_name(final_dir, recipe)
    data = _card_data(final, run_info, recipe, stored.get("splits") or {}, name)
    body = "\n\n".join([
        _intro(final, name, run_info, recipe), _data_section(run_info, recipe), _recipe_section(run_info, recipe),
        _results_section(final_dir, stored), _usage_section(final_dir, _kind(run_info, recipe)),
        _versions_section(run_info),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


# ----- stored figures ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _load_results(final: Path) -> dict:
    """{"dev": trainer metrics or None, "splits": {split: figures}}; dev falls back to train_results.json."""
    stored = _read_json(final / RESULTS_FILE)
    stored = stored if isinstance(stored, dict) else {}
    dev = stored.get("dev")
    if dev is None and isinstance(train := _read_json(final / "train_results.json"), dict):
        dev = _dev_figures(train)
    return {"dev": dev, "splits": dict(stored.get("splits") or {})}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_interval(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)


def _figures(metrics: dict | None) -> dict | None:
    """The headline figures of a metrics.json dict and of its clean/baseline parts (per-class tables, confusion
    matrices and label-mass statistics stay in eval_<split>/): point estimates plus any `<key>_ci` intervals."""
    if not metrics:
        return None
    out: dict[str, Any] = {k: metrics[k] for k in FIGURE_KEYS if k in metrics}
    out |= {k: list(v) for k, v in metrics.items() if k.endswith("_ci") and _is_interval(v)}
    for part in ("clean", "baseline"):
        if metrics.get(part):
            out[part] = _figures(metrics[part])
    return out


def _dev_figures(metrics: dict) -> dict:
    """The trainer's final metrics, numbers only (throughput figures say nothing about the model)."""
    return {k: v for k, v in metrics.items()
            if _is_number(v) and not k.endswith(("_per_second", "eval_runtime"))}


# ----- front matter -----------------------------------------------------------------------------------------------
def _base(run_info: dict, recipe: dict) -> str:
    return str(run_info.get("base_model") or recipe.get("model_name_or_path") or "unknown base model")


def _kind(run_info: dict, recipe: dict) -> str:
    if run_info.get("kind"):
        return str(run_info["kind"])
    if recipe.get("use_peft") is False:
        return "full"
    return "qlora" if recipe.get("load_in_4bit") else "lora"


def _is_hub_id(base: str) -> bool:
    """owner/name and not a local directory (outputs/tiny-model looks like a hub id too)."""
    return bool(HUB_ID.match(base)) and not Path(base).exists()


def _verbalizers(final: Path, recipe: dict) -> list[str]:
    if recipe.get("verbalizers"):
        return [str(v) for v in recipe["verbalizers"]]
    template = _read_json(final / "template.json")
    return [str(v) for v in template.get("verbalizers", [])] if isinstance(template, dict) else []


def _data_source(run_info: dict, recipe: dict) -> DataSource:
    """Where the training data came from. Local files win over dataset_name, as in sft/data.py's load_splits."""
    files = dict((run_info.get("data") or {}).get("files") or {})
    files |= {s: recipe[f"{s}_file"] for s in ("train", "validation", "test") if recipe.get(f"{s}_file")}
    data_dir = recipe.get("data_dir")
    if data_dir or files:
        paths = [Path(data_dir)] if data_dir else [Path(p).parent for p in files.values()]
        local = ", ".join(f"`{p}` ({s})" for s, p in files.items()) or f"`{data_dir}`"
        if any(p.name.lower().endswith("chnsenticorp") for p in paths):
            return DataSource(CHNSENTICORP_HUB_ID, CHNSENTICORP_HUB_ID,
                              f"local copy of ChnSentiCorp (hub: `{CHNSENTICORP_HUB_ID}`): {local}")
        return DataSource(None, paths[0].name or "local", f"local files: {local}")
    if recipe.get("dataset_name"):
        return DataSource(recipe["dataset_name"], recipe["dataset_name"], f"hub dataset `{recipe['dataset_name']}`")
    return DataSource(None, "local", "not recorded")


def _eval_results(splits: dict, source: DataSource) -> list[EvalResult] | None:
    """The model's figures per evaluated split, as model-index entries (one per split and metric)."""
    results = [
        EvalResult(task_type="text-classification", task_name="Sentiment classification",
                   dataset_type=source.name, dataset_name=source.name.split("/")[-1], dataset_split=split,
                   metric_type=hub_id, metric_name=f"{label} ({split})", metric_value=round(figures[key], 4))
        for split, figures in _ordered(splits)
        for key, hub_id, label in METRICS
        if figures and _is_number(figures.get(key))
    ]
    return results or None


def _card_data(final: Path, run_info: dict, recipe: dict, splits: dict, name: str) -> ModelCardData:
    kind, base = _kind(run_info, recipe), _base(run_info, recipe)
    source = _data_source(run_info, recipe)
    tags = ["text-classification", "sentiment-analysis", *(["lora"] if kind in PEFT_KINDS else []),
            *(["qlora"] if kind == "qlora" else []), "sft", "trl"]
    if _is_hub_id(base):
        tags.append(f"base_model:{'adapter' if kind in PEFT_KINDS else 'finetune'}:{base}")
    cjk = any(CJK.search(v) for v in _verbalizers(final, recipe))
    return ModelCardData(
        base_model=run_info.get("base_model") or recipe.get("model_name_or_path"),  # None when not recorded
        library_name="peft" if kind in PEFT_KINDS else "transformers",
        datasets=[source.hub_id] if source.hub_id else None, language="zh" if cjk else None,
        metrics=[hub_id for _, hub_id, _ in METRICS], pipeline_tag="text-classification", tags=tags,
        model_name=name, eval_results=_eval_results(splits, source),
    )


# ----- body -------------------------------------------------------------------------------------------------------
def _model_name(final_dir: str, recipe: dict) -> str:
    """The run's name: the output directory holding final/ (the final directory itself when named otherwise)."""
    path = Path(final_dir).resolve()
    if path.name == "final" and path.parent.name:
        return path.parent.name
    return path.name or Path(str(recipe.get("output_dir") or "model")).name


def _is_int_run(value: list | tuple) -> bool:
    """4+ consecutive integers, e.g. lora_layers_to_transform: shown as a range."""
    if len(value) < 4 or not all(isinstance(v, int) for v in value):
        return False
    return list(value) == list(range(value[0], value[0] + len(value)))


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"{value[0]}–{value[-1]}" if _is_int_run(value) else ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _ordered(splits: dict) -> list[tuple[str, dict]]:
    rank = {"validation": 0, "test": 1}
    return sorted(splits.items(), key=lambda item: (rank.get(item[0], 2), item[0]))


def _intro(final: Path, name: str, run_info: dict, recipe: dict) -> str:
    kind, base = _kind(run_info, recipe), _base(run_info, recipe)
    what = {"lora": "A LoRA adapter", "qlora": "A QLoRA adapter (LoRA trained on the 4-bit quantised base)",
            "full": "A fully fine-tuned copy", "merged": "A merged model (a LoRA adapter folded into the weights)"}
    labels = _verbalizers(final, recipe)
    label_text = ", ".join(f"`{v}` (class {i})" for i, v in enumerate(labels)) or "the verbalizers in template.json"
    gguf = f" (loaded from the GGUF file `{run_info['gguf_file']}`)" if run_info.get("gguf_file") else ""
    return (f"# {name}\n\n{what.get(kind, f'A {kind} model')} of `{base}`{gguf} for sentiment classification, "
            "fine-tuned with TRL's `SFTTrainer` on a chat prompt whose answer is one label word. Labels: "
            f"{label_text}. A review is classified by the log-probabilities of the label tokens after the prompt, "
            "renormalised over the labels — no free generation. The prompt is in `template.json`, the full recipe "
            "in `recipe.yaml`, the run's provenance in `run_info.json`.")


def _data_section(run_info: dict, recipe: dict) -> str:
    data = run_info.get("data") or {}
    lines = ["## Data", "", f"- source: {_data_source(run_info, recipe).description}"]
    filters = data.get("filters") or {}
    if _is_number(filters.get("train_rows_after")):
        lines.append(f"- train rows after filters: {filters['train_rows_after']} of {filters.get('train_rows_before')}"
                     f" ({filters.get('duplicates_dropped', 0)} repeated texts and "
                     f"{filters.get('eval_overlap_dropped', 0)} texts also in validation/test dropped)")
    if recipe.get("max_train_samples"):
        lines.append(f"- train rows capped at `max_train_samples` = {recipe['max_train_samples']}")
    if _is_number(data.get("rejected_rows")):
        lines.append(f"- malformed rows skipped: {data['rejected_rows']}")
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in data.items()
              if _is_number(v) and k != "rejected_rows"]
    return "\n".join(lines)


def _recipe_section(run_info: dict, recipe: dict) -> str:
    peft = _kind(run_info, recipe) in PEFT_KINDS
    skip = {"max_steps"} if not (_is_number(recipe.get("max_steps")) and recipe["max_steps"] > 0) else set()
    skip |= (set() if peft else set(LORA_KNOBS)) | (set() if recipe.get("load_in_4bit") else {"load_in_4bit"})
    rows = [(k, recipe[k]) for k in RECIPE_KNOBS if recipe.get(k) is not None and k not in skip]
    world = run_info.get("world_size")
    if _is_number(world):
        rows.append(("processes", world))
        per_device, accumulation = recipe.get("per_device_train_batch_size"), recipe.get("gradient_accumulation_steps")
        if _is_number(per_device) and _is_number(accumulation):
            rows.append(("effective batch size", per_device * accumulation * world))
    if not rows:
        return "## Training recipe\n\nNot recorded."
    table = "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in rows)
    return f"## Training recipe\n\n| setting | value |\n|---|---|\n{table}\n\nAll settings: `recipe.yaml`."


def _cell(figures: dict, key: str) -> str:
    """`0.9123 [0.8960, 0.9270]` when the metrics carry an interval, else the point estimate; `-` when absent."""
    value = figures.get(key)
    if not _is_number(value):
        return "-"
    interval = figures.get(f"{key}_ci")
    return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]" if _is_interval(interval) else f"{value:.4f}"


def _split_table(split: str, figures: dict) -> str:
    rows = [("model", "all", figures), ("model", "clean", figures.get("clean"))]
    baseline = figures.get("baseline") or {}
    rows += [("TF-IDF + LR", "all", baseline), ("TF-IDF + LR", "clean", baseline.get("clean"))]
    lines = [f"### {split} split", "", "| system | rows | n | accuracy | macro F1 | ROC-AUC |", "|---" * 6 + "|"]
    lines += [f"| {system} | {subset} | {m.get('n', '-')} | " + " | ".join(_cell(m, k) for k, _, _ in METRICS) + " |"
              for system, subset, m in rows if m]
    if figures.get("clean"):
        lines += ["", "clean = rows whose text does not occur in the train split."]
    return "\n".join(lines)


def _results_section(final_dir: str, stored: dict) -> str:
    dev = stored.get("dev") or {}
    keys = [k for k in DEV_LABELS if k in dev] + sorted(k for k in dev if k.startswith("eval_") and k not in DEV_LABELS)
    parts = ["## Results", "", "### Dev metrics at the end of training", ""]
    if keys:
        parts += ["| metric | value |", "|---|---|", *(f"| {DEV_LABELS.get(k, k)} | {_fmt(dev[k])} |" for k in keys)]
    else:
        parts.append("Not recorded (no validation split during training, or its metrics were not saved).")
    splits = _ordered(stored.get("splits") or {})
    if not splits:
        parts += ["", f"No split evaluated yet: `python eval/evaluate.py --adapter {final_dir} --split test` "
                  "adds its figures here."]
    parts += [part for split, figures in splits if figures for part in ("", _split_table(split, figures))]
    if any(figures and figures.get("baseline") for _, figures in splits):
        parts += ["", "Baseline: TF-IDF + logistic regression fitted on the train split (eval/evaluate.py)."]
    return "\n".join(parts)


def _usage_section(final_dir: str, kind: str) -> str:
    arg, merged = shlex.quote(final_dir), shlex.quote(final_dir + "-merged")  # ordinary paths stay as they are
    merge = f"\npython eval/merge.py --adapter {arg} --out {merged}" if kind in PEFT_KINDS else ""
    return (
        "## How to use\n\n```python\nfrom eval.predict import SentimentPredictor\n\n"
        f"predictor = SentimentPredictor(lora_path={json.dumps(final_dir, ensure_ascii=False)})\n"
        'predictor.predict("房间很干净，服务也很热情")\n```\n\n```bash\n'
        f'python eval/predict.py --lora_path {arg} --text "房间很干净，服务也很热情"\n'
        f"python eval/evaluate.py --adapter {arg} --split test{merge}\n```"
    )


def _versions_section(run_info: dict) -> str:
    versions = run_info.get("versions") or {}
    lines = [f"- {name}: {version}" for name, version in versions.items()]
    lines.append(f"- git commit: {run_info.get('git_commit') or 'not recorded'}")
    return "## Framework versions\n\n" + "\n".join(lines)
