"""The training output's README.md as a Hugging Face model card (replacing PEFT's empty template), rebuilt whole on
every write from run_info.json, recipe.yaml and eval_results.json, so re-evaluating a split replaces its figures and
nothing else is lost. Front matter comes from ModelCardData / EvalResult, never hand-written YAML; `model-index` holds
only the splits eval/evaluate.py scored, not the training-time dev metrics, which may cover a capped sample."""

import json
import re
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sft import artifacts
from sft.eval_report import cell, verdict_text

CARD_FILE, RESULTS_FILE = artifacts.CARD_FILE, artifacts.EVAL_RESULTS_FILE
FIGURE_KEYS = ("n", "accuracy", "f1", "auc", "ece", "brier")
METRICS = (("accuracy", "accuracy", "accuracy"), ("f1", "f1", "macro F1"), ("auc", "roc_auc", "ROC-AUC"))  # key, hub
COMPARISON_KEYS = ("n", "verdict", "accuracy_difference", "accuracy_difference_ci", "mcnemar_p")
DEV_LABELS = {"eval_accuracy": "accuracy", "eval_f1": "macro F1", "eval_auc": "ROC-AUC", "eval_ece": "ECE",
              "eval_brier": "Brier", "eval_loss": "loss", "train_loss": "train loss (mean)",
              "train_runtime": "train runtime (s)", "epoch": "epochs"}
LORA_KNOBS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_layers_to_transform")
RECIPE_KNOBS = ("load_in_4bit", *LORA_KNOBS, "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
                "weight_decay", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_length", "max_train_samples", "completion_only_loss", "dtype",
                "bf16", "seed")
KIND_TEXT = {"lora": "A LoRA adapter", "qlora": "A QLoRA adapter (LoRA trained on the 4-bit quantised base)",
             "full": "A fully fine-tuned copy", "merged": "A merged model (a LoRA adapter folded into the weights)"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def write_model_card(final_dir: str | Path, run_info: dict, recipe: dict, dev_metrics: dict | None = None) -> Path:
    """Write `final_dir/README.md`. `dev_metrics=None` keeps the stored ones, so a rewrite never drops figures."""
    final = Path(final_dir)
    stored = stored_results(final, dev_metrics)
    if dev_metrics is not None:
        artifacts.write_json(final / RESULTS_FILE, stored)
    card = build_card(str(final_dir), run_info or {}, recipe or {}, stored)
    artifacts.write_text_atomic(final / CARD_FILE, str(card))
    return final / CARD_FILE


def add_eval_results(final_dir: str | Path, split: str, metrics: dict) -> Path:
    """Record (or replace) `split`'s metrics.json figures and rebuild the card, so an older output gets one too."""
    final = Path(final_dir)
    stored = stored_results(final)
    stored["splits"][split] = _figures(metrics)
    artifacts.write_json(final / RESULTS_FILE, stored)
    run_info = asdict(artifacts.RunInfo.load(final)) if (final / artifacts.RUN_INFO_FILE).is_file() else {}
    return write_model_card(final_dir, run_info, artifacts.read_recipe(final))


def build_card(final_dir: str, run_info: dict, recipe: dict, stored: dict) -> ModelCard:
    """The whole card from its sources; `final_dir` is shown as given (a relative path stays relative)."""
    kind = run_info.get("kind") or ("full" if recipe.get("use_peft") is False else
                                    "qlora" if recipe.get("load_in_4bit") else "lora")
    peft, base = kind in ("lora", "qlora"), run_info.get("base_model") or recipe.get("model_name_or_path")
    name = run_name(final_dir)
    labels = recipe.get("verbalizers") or _read_json(Path(final_dir) / artifacts.TEMPLATE_FILE).get("verbalizers")
    labels = [str(v) for v in labels or []]
    hub_data, data_name, data_text = _data_source(run_info, recipe)
    splits = sorted(((s, f) for s, f in (stored.get("splits") or {}).items() if f),
                    key=lambda item: ({"validation": 0, "test": 1}.get(item[0], 2), item[0]))
    tags = ["text-classification", "sentiment-analysis", *{"lora": ["lora"], "qlora": ["lora", "qlora"]}.get(kind, []),
            "sft", "trl"]
    if base and HUB_ID.match(base) and not Path(base).exists():  # outputs/tiny-model looks like owner/name too
        tags.append(f"base_model:{'adapter' if peft else 'finetune'}:{base}")
    results = [EvalResult(task_type="text-classification", task_name="Sentiment classification",
                          dataset_type=data_name, dataset_name=data_name.split("/")[-1], dataset_split=split,
                          metric_type=hub, metric_name=f"{label} ({split})", metric_value=round(figures[key], 4))
               for split, figures in splits for key, hub, label in METRICS if _is_number(figures.get(key))]
    data = ModelCardData(
        base_model=base, library_name="peft" if peft else "transformers",
        datasets=[hub_data] if hub_data else None, language="zh" if any(CJK.search(v) for v in labels) else None,
        metrics=[hub for _, hub, _ in METRICS], pipeline_tag="text-classification", tags=tags, model_name=name,
        eval_results=results or None)
    label_text = ", ".join(f"`{v}` (class {i})" for i, v in enumerate(labels)) or "the verbalizers in template.json"
    gguf = f" (loaded from the GGUF file `{run_info['gguf_file']}`)" if run_info.get("gguf_file") else ""
    intro = (f"# {name}\n\n{KIND_TEXT.get(kind, f'A {kind} model')} of `{base or 'unknown base model'}`{gguf} for "
             "sentiment classification, fine-tuned with TRL's `SFTTrainer` on a chat prompt whose answer is one label "
             f"word. Labels: {label_text}. A review is classified by the log-probabilities of the label tokens after "
             "the prompt, renormalised over the labels — no free generation. The prompt is in `template.json`, the "
             "full recipe in `recipe.yaml`, the run's provenance in `run_info.json`.")
    arg, merged = shlex.quote(final_dir), shlex.quote(final_dir + "-merged")  # a path with spaces stays one argument
    merge = f"\npython eval/merge.py --adapter {arg} --out {merged}" if peft else ""
    versions = [f"- {k}: {v}" for k, v in (run_info.get("versions") or {}).items()]
    usage = ("## How to use\n\n```python\nfrom eval.predict import SentimentPredictor\n\n"
             f"predictor = SentimentPredictor(lora_path={json.dumps(final_dir, ensure_ascii=False)})\n"
             'predictor.predict("房间很干净，服务也很热情")\n```\n\n```bash\n'
             f'python eval/predict.py --lora_path {arg} --text "房间很干净，服务也很热情"\n'
             f"python eval/evaluate.py --adapter {arg} --split test{merge}\n```\n\n## Framework versions\n\n"
             + "\n".join([*versions, f"- git commit: {run_info.get('git_commit') or 'not recorded'}"]))
    body = [intro, _training_sections(data_text, run_info, recipe, peft),
            _results_section(final_dir, stored.get("dev") or {}, splits), usage]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n")


def run_name(final_dir: str | Path) -> str:
    """The run's name: the directory holding final/, else final_dir's own name (the card's title, the served model)."""
    path = Path(final_dir).resolve()
    return path.parent.name if path.name == "final" and path.parent.name else path.name or "model"


def _read_json(path: Path) -> dict:  # {} when missing or not an object
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return data if isinstance(data, dict) else {}


def _is_number(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def stored_results(final_dir: str | Path, dev: dict | None = None) -> dict:
    """The figures the card shows (also GET /v1/model's): {"dev": `dev`, else the stored or train_results.json ones,
    numbers only (throughput says nothing about the model), "splits": {split: figures}}."""
    final = Path(final_dir)
    stored = _read_json(final / RESULTS_FILE)
    dev = (stored.get("dev") or _read_json(final / artifacts.TRAIN_RESULTS_FILE)) if dev is None else dev
    dev = {k: v for k, v in dev.items() if _is_number(v) and not k.endswith(("_per_second", "eval_runtime"))}
    return {"dev": dev, "splits": dict(stored.get("splits") or {})}


def _figures(metrics: dict | None) -> dict | None:
    """Headline figures (and `<key>_ci` intervals) of a metrics.json dict and of its clean/baseline parts; per-class
    tables, confusion matrices and label-mass statistics stay in eval_<split>/."""
    if not metrics:
        return None
    out: dict[str, Any] = {k: metrics[k] for k in FIGURE_KEYS if k in metrics}
    out |= {k: list(v) for k, v in metrics.items()
            if k.endswith("_ci") and isinstance(v, (list, tuple)) and len(v) == 2 and _is_number(*v)}
    comparison = metrics.get("comparison")
    if isinstance(comparison, dict) and all(k in comparison for k in COMPARISON_KEYS):  # the paired verdict
        out["comparison"] = {k: comparison[k] for k in COMPARISON_KEYS} | {
            "clean": {k: comparison["clean"][k] for k in COMPARISON_KEYS} if comparison.get("clean") else None}
    return out | {part: _figures(metrics[part]) for part in ("clean", "baseline") if metrics.get(part)}


def _data_source(run_info: dict, recipe: dict) -> tuple[str | None, str, str]:
    """(hub id for `datasets`, model-index dataset name, body line). Local files win over dataset_name, as in
    sft/data.py's load_splits; other local data gets no hub id, since a folder name would link to someone else's."""
    files = dict((run_info.get("data") or {}).get("files") or {})
    files |= {s: recipe[f"{s}_file"] for s in ("train", "validation", "test") if recipe.get(f"{s}_file")}
    data_dir, hub = recipe.get("data_dir"), recipe.get("dataset_name")
    if not (data_dir or files):
        return (hub, hub, f"hub dataset `{hub}`") if hub else (None, "local", "not recorded")
    paths = [Path(data_dir)] if data_dir else [Path(p).parent for p in files.values()]
    local = ", ".join(f"`{p}` ({s})" for s, p in files.items()) or f"`{data_dir}`"
    if any(p.name.lower().endswith("chnsenticorp") for p in paths):
        hub = "lansinuote/ChnSentiCorp"  # the hub copy of the same splits
        return hub, hub, f"local copy of ChnSentiCorp (hub: `{hub}`): {local}"
    return None, paths[0].name or "local", f"local files: {local}"


def _fmt(value: Any) -> str:
    """A cell: 4+ consecutive ints (lora_layers_to_transform) as a range, floats to 4 significant digits."""
    if isinstance(value, (list, tuple)):
        run = len(value) > 3 and all(type(v) is int for v in value) and list(value) == [*range(value[0], value[-1] + 1)]
        return f"{value[0]}–{value[-1]}" if run else ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|---" * len(header) + "|", *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def _training_sections(source: str, run_info: dict, recipe: dict, peft: bool) -> str:
    """## Data, then ## Training recipe: LoRA knobs only for adapters, plus processes and the effective batch size."""
    data = run_info.get("data") or {}
    filters, lines = data.get("filters") or {}, ["## Data", "", f"- source: {source}"]
    if _is_number(filters.get("train_rows_after")):
        lines.append(f"- train rows after filters: {filters['train_rows_after']} of {filters.get('train_rows_before')}"
                     f" ({filters.get('duplicates_dropped', 0)} repeated texts and "
                     f"{filters.get('eval_overlap_dropped', 0)} texts also in validation/test dropped)")
    if recipe.get("max_train_samples"):
        lines.append(f"- train rows capped at `max_train_samples` = {recipe['max_train_samples']}")
    if _is_number(data.get("rejected_rows")):
        lines.append(f"- malformed rows skipped: {data['rejected_rows']}")
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in data.items() if _is_number(v) and k != "rejected_rows"]
    steps, world = recipe.get("max_steps"), run_info.get("world_size")
    shown = {k: peft for k in LORA_KNOBS} | {"load_in_4bit": bool(recipe.get("load_in_4bit")),
                                              "max_steps": _is_number(steps) and steps > 0}
    rows = [(k, recipe[k]) for k in RECIPE_KNOBS if recipe.get(k) is not None and shown.get(k, True)]
    batch = (recipe.get("per_device_train_batch_size"), recipe.get("gradient_accumulation_steps"), world)
    rows += [("processes", world)] if _is_number(world) else []
    rows += [("effective batch size", batch[0] * batch[1] * world)] if _is_number(*batch) else []
    table = [*_table(("setting", "value"), [(f"`{k}`", _fmt(v)) for k, v in rows]), "", "All settings: `recipe.yaml`."]
    lines += ["", "## Training recipe", "", *(table if rows else ["Not recorded."])]
    return "\n".join(lines)


def _has_ci(figures: dict) -> bool:
    return any(k.endswith("_ci") for k in figures) or bool(figures.get("comparison"))


def _results_section(final_dir: str, dev: dict, splits: list[tuple[str, dict]]) -> str:
    keys = [k for k in DEV_LABELS if k in dev] + sorted(k for k in dev if k.startswith("eval_") and k not in DEV_LABELS)
    parts = ["## Results", "", "### Dev metrics at the end of training", ""]
    parts += _table(("metric", "value"), [(DEV_LABELS.get(k, k), _fmt(dev[k])) for k in keys]) if keys else [
        "Not recorded (no validation split during training, or its metrics were not saved)."]
    if not splits:
        parts += ["", f"No split evaluated yet: `python eval/evaluate.py --adapter {final_dir} --split test` "
                  "adds its figures here."]
    for split, figures in splits:
        baseline = figures.get("baseline") or {}
        rows = [("model", "all", figures), ("model", "clean", figures.get("clean")),
                ("TF-IDF + LR", "all", baseline), ("TF-IDF + LR", "clean", baseline.get("clean"))]
        cells = [(who, subset, m.get("n", "-"), *(cell(m, k) for k, *_ in METRICS)) for who, subset, m in rows if m]
        parts += ["", f"### {split} split", "", *_table(("system", "rows", "n", *(t for *_, t in METRICS)), cells)]
        parts += ["", "clean = rows whose text does not occur in the train split."] if figures.get("clean") else []
        comparison = figures.get("comparison") or {}
        verdicts = [f"- model vs TF-IDF + LR, {subset} rows: {verdict_text(c)}"
                    for subset, c in (("all", comparison), ("clean", comparison.get("clean"))) if c]
        parts += ["", *verdicts] if verdicts else []
    if any(_has_ci(figures) for _, figures in splits):
        parts += ["", "[a, b]: 95% bootstrap interval; verdict: McNemar's exact test at the 5% level "
                  "(eval/evaluate.py)."]
    if any(figures.get("baseline") for _, figures in splits):
        parts += ["", "Baseline: TF-IDF + logistic regression fitted on the train split (eval/evaluate.py)."]
    return "\n".join(parts)
