"""The benchmark scripts run end to end on a tiny input (tiny random Qwen2, the shipped sample data) and end with
their one-line summary. These are smoke tests: the figures themselves are recorded in docs/benchmarks.md."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample"


def run_bench(script: str, *args: str, timeout: int = 120) -> list[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, proc.stderr[-3000:]
    return lines


def test_eval_speed_runs(tiny_model_dir):
    lines = run_bench("eval_speed.py", "--base", str(tiny_model_dir), "--n", "6", "--batch_size", "4",
                      "--chunk", "3", "--max_length", "96", "--data_dir", str(SAMPLE))
    assert lines[-1].startswith("SUMMARY eval_speed: scorer ")
    assert "identical predictions 6/6" in lines[-1]  # the scorer and the per-example loop agree
    assert any(line.startswith("| scorer |") for line in lines)


def test_train_tokens_runs(tiny_model_dir):
    lines = run_bench("train_tokens.py", "--recipe", "recipes/demo.yaml", "--model_name_or_path",
                      str(tiny_model_dir), "--max_train_samples", "24", "--batch_size", "4", "--steps", "1",
                      "--warmup", "1", "--check_rows", "4", "--data_dir", str(SAMPLE),
                      "--modes", "padded", "free", "free, head everywhere")
    assert lines[-1].startswith("SUMMARY train_tokens: padding-free real tokens 100.0%")
    check = next(line for line in lines if line.startswith("loss check"))
    assert "(goal <= 1e-4: met)" in check  # padding-free and padded batches give the same per-example loss


def test_gpu_memory_runs_as_a_cpu_smoke_test():
    lines = run_bench("gpu_memory.py", "--config", "tiny", "--device_ok_cpu", "--kinds", "lora", "--steps", "2",
                      "--warmup", "1", "--batch_size", "4", "--seq", "64", "--gradient_checkpointing", "false")
    assert lines[-1].startswith("SUMMARY gpu_memory: lora/padded ")
    assert "lora/free" in lines[-1]


def test_cpu_speed_knobs_runs(tiny_model_dir):
    lines = run_bench("cpu_speed_knobs.py", "--recipe", "recipes/demo.yaml", "--model_name_or_path",
                      str(tiny_model_dir), "--max_train_samples", "24", "--batch_size", "4", "--steps", "1",
                      "--warmup", "1", "--data_dir", str(SAMPLE))
    assert lines[-1].startswith("SUMMARY cpu_speed_knobs: recipe ")
    assert sum(line.startswith(("| recipe |", "| fp32 |", "| all layers |", "| fp32, all |")) for line in lines) == 4


def test_smollm2_path_prints_the_gguf_folder_and_its_dequantized_copy():
    lines = run_bench("smollm2_path.py")
    assert (Path(lines[-2]) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert (Path(lines[-1]) / "model.safetensors").is_file() and (Path(lines[-1]) / "tokenizer.json").is_file()


def test_serve_load_runs(tiny_model_dir):
    lines = run_bench("serve_load.py", "--base", str(tiny_model_dir), "--data_dir", str(SAMPLE), "--concurrency",
                      "1", "4", "--requests", "8", "--rounds", "2", "--seconds", "30", "--warmup", "2",
                      "--compare_at", "4", "--threads", "1", timeout=400)
    assert lines[-1].startswith("SUMMARY serve_load: texts/s by concurrency 1: ")
    assert "errors 0; micro-batching vs batch size 1 at concurrency 4: " in lines[-1]
    assert "the scorer alone, 4 texts per call vs 1: " in lines[-1]
    rows = [line.split(" | ") for line in lines if line.startswith(("| micro-batching", "| batch size 1"))]
    assert [row[:4] for row in rows] == [["| micro-batching (32)", "1", "8", "0"],
                                         ["| micro-batching (32)", "4", "8", "0"],
                                         ["| micro-batching (32), interleaved", "4", "8", "0"],
                                         ["| batch size 1, interleaved", "4", "8", "0"]]
    assert rows[-1][-1] == "1.0 |"  # the comparison server really scores one text per call
