"""A killed job, a preempted job, a crash while saving, a typo in the data path: each costs nothing but a message."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sft.artifacts
import sft.metrics
import sft.model
from sft.config import RecipeError, parse_recipe
from sft.train import main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample"


def argv(model_dir, out, *extra):
    return ["recipes/demo.yaml", "--model_name_or_path", str(model_dir), "--output_dir", str(out),
            "--data_dir", str(SAMPLE), "--logging_steps", "1", "--per_device_train_batch_size", "8",
            "--max_eval_samples", "16", "--do_predict", "false", *extra]


def start(args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "sft/train.py", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def adapter(out):
    return load_file(Path(out) / "final" / "adapter_model.safetensors")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """CPU training here is deterministic: the resumed adapter and dev metrics equal the uninterrupted run's
    (same seed, same data order restored from the checkpoint's RNG state) to 1e-6."""
    common = ["--max_steps", "24", "--save_steps", "4", "--eval_steps", "12"]
    killed = tmp_path / "killed"
    proc = start(argv(tiny_model_dir, killed, *common))
    wait_for(lambda: (killed / "checkpoint-8" / "trainer_state.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "final").exists()
    newest = sft.artifacts.checkpoints(killed)[-1]
    step = json.loads((newest / "trainer_state.json").read_text())["global_step"] if (
        newest / "trainer_state.json").is_file() else None

    assert main(argv(tiny_model_dir, killed, *common, "--resume_from_checkpoint", "auto")) == 0
    reference = tmp_path / "reference"
    assert main(argv(tiny_model_dir, reference, *common)) == 0

    resumed_state = json.loads((killed / "checkpoint-24" / "trainer_state.json").read_text())
    assert resumed_state["global_step"] == 24
    if step is not None:  # the resumed run's history starts with the killed run's steps
        assert any(h.get("step") == step for h in resumed_state["log_history"])
    ours, theirs = adapter(killed), adapter(reference)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    results = [json.loads((d / "final" / "train_results.json").read_text()) for d in (killed, reference)]
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "eval_auc"):
        assert results[0][key] == pytest.approx(results[1][key], abs=1e-6), key


def test_sigterm_saves_a_checkpoint_and_exits_with_a_resume_hint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(argv(tiny_model_dir, out, "--max_steps", "2000", "--save_steps", "5000", "--eval_strategy", "no"))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    wait_for(lambda: sum("'loss'" in line for line in lines) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    reader.join(timeout=10)
    message = [line for line in lines if line.startswith("stopped: ")]
    assert message and "interrupted by SIGTERM" in message[0] and "--resume_from_checkpoint auto" in message[0]
    saved = sft.artifacts.checkpoints(out)
    assert len(saved) == 1 and sft.artifacts.is_complete_checkpoint(saved[0])
    step = json.loads((saved[0] / "trainer_state.json").read_text())["global_step"]
    assert saved[0].name == f"checkpoint-{step}" and step >= 2
    assert not (out / "final").exists()

    # Resume from that checkpoint and finish two more steps.
    assert main(argv(tiny_model_dir, out, "--max_steps", str(step + 2), "--save_steps", "5000",
                     "--eval_strategy", "no", "--resume_from_checkpoint", "auto")) == 0
    state = json.loads((sft.artifacts.checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == step + 2
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_a_crash_during_the_final_save_keeps_the_previous_output(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fast = ["--max_steps", "2", "--save_steps", "2", "--eval_strategy", "no"]
    assert main(argv(tiny_model_dir, out, *fast)) == 0
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the final output")

    monkeypatch.setattr(sft.metrics, "plot_loss_curve", crash)  # the last file written into final.tmp
    longer = ["--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no", "--resume_from_checkpoint", "auto"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(argv(tiny_model_dir, out, *longer))
    after = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    assert after == before  # the old, complete output: not a mix, not half a file
    assert (out / "final.tmp").exists() and not (out / "final.tmp" / "loss_curve.png").exists()

    monkeypatch.undo()
    assert main(argv(tiny_model_dir, out, *longer)) == 0  # the same command again: resumes and completes
    assert not (out / "final.tmp").exists() and not (out / "final.old").exists()
    new = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    assert new.keys() == before.keys() and new["adapter_model.safetensors"] != before["adapter_model.safetensors"]


def test_swap_in_replaces_a_directory_by_renames(tmp_path):
    final, tmp = tmp_path / "final", tmp_path / "final.tmp"
    final.mkdir()
    (final / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    sft.artifacts.swap_in(tmp, final)
    assert (final / "a").read_text() == "new" and not tmp.exists() and not (tmp_path / "final.old").exists()


@pytest.fixture
def model_loads(monkeypatch):
    """Record (and forbid) model loading: early checks must fail before it."""
    calls = []

    def fake_load(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded before the early checks failed")

    monkeypatch.setattr(sft.model, "load_model", fake_load)
    return calls


@pytest.mark.parametrize("case", ["data_dir", "output_dir", "resume"])
def test_early_checks_fail_before_any_model_loads(tiny_model_dir, tmp_path, capsys, model_loads, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    extra = {
        "data_dir": ["--data_dir", str(tmp_path / "no_such_data")],
        "output_dir": ["--output_dir", str(blocker / "out")],
        "resume": ["--resume_from_checkpoint", str(tmp_path / "no_such_checkpoint")],
    }[case]
    started = time.perf_counter()
    code = main(argv("/no/such/model", tmp_path / "out", *extra))
    elapsed = time.perf_counter() - started
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and model_loads == []
    assert len(err) == 1
    assert {"data_dir": "no_such_data", "output_dir": "not writable", "resume": "no_such_checkpoint"}[case] in err[0]
    assert elapsed < 5, f"early check took {elapsed:.1f}s"
    assert not (tmp_path / "out").exists()  # nothing written


def test_security_defaults(tiny_model_dir, tmp_path, capsys):
    # trust_remote_code is off unless the recipe sets it, everywhere a model or tokenizer is loaded.
    recipe = parse_recipe(argv(tiny_model_dir, tmp_path / "out"))
    assert recipe.training.trust_remote_code is False
    kwargs = sft.model.model_init_kwargs(recipe.model)
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True
    assert parse_recipe([*argv(tiny_model_dir, tmp_path), "--trust_remote_code", "true"]).training.trust_remote_code

    # Weights load from safetensors only: a pickle-only checkpoint is refused with one line.
    from transformers import AutoModelForCausalLM

    capsys.readouterr()
    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # a pickle: loading it could run code
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (pickled / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    assert main(argv(pickled, tmp_path / "out2", "--max_steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "safetensors" in err[-1]

    # Recipes are data: a YAML tag that would run code is refused, and nothing runs.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'model_name_or_path: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(RecipeError, match="evil.yaml:1"):
        parse_recipe([str(evil)])
    assert not marker.exists()
    torch.manual_seed(0)  # keep later tests independent of this one
