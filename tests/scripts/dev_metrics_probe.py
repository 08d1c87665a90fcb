"""Run under `accelerate launch`: the trainer's dev label metrics on the first N sample dev rows (for each N of a
comma-separated list), sharded across the ranks. Writes OUT/rank<i>.json: per N, the metrics and the number of texts
this rank scored."""

import json
import sys
from pathlib import Path

import sft.scoring
from sft.data import DataArguments, load_splits
from sft.model import load_model, load_tokenizer
from sft.ranks import process_state
from sft.template import PromptTemplate
from sft.trainer import dev_label_metrics

model_dir, data_dir, row_counts, out = sys.argv[1], sys.argv[2], sys.argv[3].split(","), Path(sys.argv[4])
state = process_state()
scored = []
real_score_texts = sft.scoring.score_texts


def counting_score_texts(model, tokenizer, template, texts, **kwargs):
    scored.append(len(texts))
    return real_score_texts(model, tokenizer, template, texts, **kwargs)


sft.scoring.score_texts = counting_score_texts
dev = load_splits(DataArguments(data_dir=data_dir), ("validation",))["validation"]
model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
results = {"world_size": state.num_processes}
for rows in row_counts:
    scored.clear()
    metrics = dev_label_metrics(state, model, tokenizer, PromptTemplate(max_length=128), dev.select(range(int(rows))),
                                batch_size=2)
    results[rows] = {"metrics": metrics, "scored": sum(scored)}
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{state.process_index}.json").write_text(json.dumps(results))
state.wait_for_everyone()
state.destroy_process_group()
