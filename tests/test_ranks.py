"""Sharding across ranks: the dev metrics that training logs are computed on each rank's share of the rows, and
equal those of one process, on 2 real gloo ranks (also with fewer rows than ranks)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample"


def test_dev_metrics_on_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    from accelerate import PartialState

    from sft.data import DataArguments, load_splits
    from sft.model import load_model, load_tokenizer
    from sft.template import PromptTemplate
    from sft.trainer import dev_label_metrics

    dev = load_splits(DataArguments(data_dir=str(SAMPLE)), ("validation",))["validation"]
    model, tokenizer = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    template, counts = PromptTemplate(max_length=128), (5, 1)  # 1: fewer rows than ranks
    one = {n: dev_label_metrics(PartialState(), model, tokenizer, template, dev.select(range(n)), 2) for n in counts}

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "tests" / "scripts" / "dev_metrics_probe.py"), str(tiny_model_dir), str(SAMPLE), "5,1",
           str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for n in counts:
        # each rank scored its own share, padded to equal size: ceil(n / 2) texts, not all of them
        assert [r[str(n)]["scored"] for r in ranks] == [(n + 1) // 2] * 2
        numbers = {k: v for k, v in one[n].items() if v is not None}  # AUC is undefined on a single row
        for r in ranks:
            got = r[str(n)]["metrics"]
            assert {k for k, v in got.items() if v is None} == one[n].keys() - numbers.keys()
            assert {k: got[k] for k in numbers} == pytest.approx(numbers, abs=1e-9)
