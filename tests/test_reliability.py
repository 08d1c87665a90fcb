"""A killed job, a preempted job, a crash while saving, a typo in the data path: each costs nothing but a message."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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
BROKEN = REPO / "tests" / "data" / "broken"


def argv(model_dir, out, *extra):
    return ["recipes/demo.yaml", "--model_name_or_path", str(model_dir), "--output_dir", str(out),
            "--data_dir", str(SAMPLE), "--logging_steps", "1", "--per_device_train_batch_size", "8",
            "--max_eval_samples", "16", "--do_predict", "false", *extra]


def start(args, script="sft/train.py", launcher=(sys.executable,)):
    """The command in a process group of its own, so that a failing test can stop it and all it started."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, script, *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc) -> None:
    """Kill the command, what it started, and the ranks a launcher started (torchrun gives them sessions of their own,
    out of reach of the process group)."""
    if proc.poll() is None:
        for pid in launched_ranks(proc).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def launched_ranks(launcher: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of the worker processes a launcher started (Linux /proc)."""
    ranks = {}
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        with contextlib.suppress(OSError):  # a child that has just exited
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            variables = dict(item.split("=", 1) for item in environ if "=" in item)
            if "RANK" in variables:
                ranks[int(variables["RANK"])] = int(pid)
    return ranks


def wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    stop_group(proc)
    raise AssertionError("timed out")


def adapter(out):
    return load_file(Path(out) / "final" / "adapter_model.safetensors")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """CPU training here is deterministic: the resumed adapter and dev metrics equal the uninterrupted run's
    (same seed, same data order restored from the checkpoint's RNG state) to 1e-6. The resumed process must run only
    the remaining steps (counted inside it): a silent restart from step 0 would end with the same adapter."""
    common = ["--max_steps", "24", "--save_steps", "4", "--eval_steps", "12"]
    killed = tmp_path / "killed"
    proc = start(argv(tiny_model_dir, killed, *common))
    wait_for(lambda: (killed / "checkpoint-8" / "trainer_state.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "final").exists()
    newest = [p for p in sft.artifacts.checkpoints(killed) if sft.artifacts.is_complete_checkpoint(p)][-1]
    step = json.loads((newest / "trainer_state.json").read_text())["global_step"]
    assert newest.name == f"checkpoint-{step}" and 8 <= step < 24

    assert main(argv(tiny_model_dir, killed, *common, "--resume_from_checkpoint", "auto")) == 0
    reference = tmp_path / "reference"
    assert main(argv(tiny_model_dir, reference, *common)) == 0

    info = json.loads((killed / "final" / "run_info.json").read_text())
    assert info["resumed_from"] == str(newest) and info["steps_run"] == 24 - step
    resumed_state = json.loads((killed / "checkpoint-24" / "trainer_state.json").read_text())
    assert resumed_state["global_step"] == 24
    assert [h["step"] for h in resumed_state["log_history"] if "loss" in h] == list(range(1, 25))
    ours, theirs = adapter(killed), adapter(reference)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    results = [json.loads((d / "final" / "train_results.json").read_text()) for d in (killed, reference)]
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "eval_auc"):
        assert results[0][key] == pytest.approx(results[1][key], abs=1e-6), key


def read_lines(proc) -> list[str]:
    """The subprocess's output lines, collected by a thread as they come."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def losses_logged(lines: list[str], n: int = 2):
    return lambda: sum("'loss'" in line for line in lines) >= n


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_saves_a_checkpoint_and_exits_with_a_resume_hint(tiny_model_dir, tmp_path, sig):
    """SIGTERM (what SLURM and Kubernetes send) and Ctrl-C: the step ends, a checkpoint is saved, exit 128 + signal."""
    out = tmp_path / "run"
    proc = start(argv(tiny_model_dir, out, "--max_steps", "2000", "--save_steps", "5000", "--eval_strategy", "no"))
    lines = read_lines(proc)
    wait_for(losses_logged(lines), proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 128 + sig
    time.sleep(0.5)  # the reader thread takes the last lines
    message = [line for line in lines if line.startswith("stopped: ")]
    assert message and f"interrupted by {sig.name}" in message[0] and "--resume_from_checkpoint auto" in message[0]
    saved = sft.artifacts.checkpoints(out)
    assert len(saved) == 1 and sft.artifacts.is_complete_checkpoint(saved[0])
    step = json.loads((saved[0] / "trainer_state.json").read_text())["global_step"]
    assert saved[0].name == f"checkpoint-{step}" and step >= 2 and f"checkpoint-{step}. Resume" in message[0]
    assert not (out / "final").exists()
    if sig == signal.SIGINT:
        return

    # Resume from that checkpoint: exactly the two remaining steps run.
    assert main(argv(tiny_model_dir, out, "--max_steps", str(step + 2), "--save_steps", "5000",
                     "--eval_strategy", "no", "--resume_from_checkpoint", "auto")) == 0
    info = json.loads((out / "final" / "run_info.json").read_text())
    assert info["resumed_from"] == str(saved[0]) and info["steps_run"] == 2
    state = json.loads((sft.artifacts.checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == step + 2


def test_a_second_ctrl_c_stops_at_once(tiny_model_dir, tmp_path):
    """After the first Ctrl-C the step still runs to its end; here that end takes a minute
    (tests/scripts/slow_after_signal.py). A second Ctrl-C stops the run at once: exit 130, no checkpoint."""
    out = tmp_path / "run"
    proc = start(argv(tiny_model_dir, out, "--max_steps", "2000", "--save_steps", "5000", "--eval_strategy", "no"),
                 script="tests/scripts/slow_after_signal.py")
    lines = read_lines(proc)
    wait_for(losses_logged(lines), proc)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: any("received SIGINT" in line for line in lines), proc)
    second = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=40) == 130  # the slow step would take 60 s
    finally:
        stop_group(proc)
    assert time.perf_counter() - second < 40
    time.sleep(0.5)
    message = [line for line in lines if line.startswith("stopped: ")]
    assert message == [line for line in lines if "Ctrl-C without saving a checkpoint" in line] and len(message) == 1
    assert "Traceback" not in "".join(lines)
    assert sft.artifacts.checkpoints(out) == []


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tiny_model_dir, tmp_path):
    """A signal that reaches one rank of a 2-process gloo run (here rank 1, which saves nothing itself): the flag is
    all-reduced at each step end, so both ranks stop after the same step, one checkpoint is written, and both exit
    143 with the resume hint."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_ddp.yaml"]
    proc = start(argv(tiny_model_dir, out, "--max_steps", "2000", "--save_steps", "5000", "--eval_strategy", "no"),
                 launcher=launch)
    try:
        lines = read_lines(proc)
        wait_for(losses_logged(lines), proc, timeout=300)
        ranks = launched_ranks(proc)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGTERM)
        assert proc.wait(timeout=180) != 0  # a rank that did not stop would wait for the other one forever
    finally:
        stop_group(proc)
    time.sleep(0.5)
    output = "".join(lines)
    # (the ranks write to one pipe: their lines may run into each other)
    stopped = re.findall(r"stopped: interrupted by SIGTERM at step (\d+); checkpoint saved in \S+\. Resume with the "
                         r"same command plus --resume_from_checkpoint auto", output)
    assert len(stopped) == 2 and stopped[0] == stopped[1], output[-3000:]
    step = int(stopped[0])
    assert [p.name for p in sft.artifacts.checkpoints(out)] == [f"checkpoint-{step}"]
    assert sft.artifacts.is_complete_checkpoint(out / f"checkpoint-{step}")
    # torchrun's failure report: each rank's own exit code
    codes = dict(re.findall(r"rank\s+: (\d) \(local_rank: \d\)\s+exitcode\s+: (-?\d+)", output))
    assert codes == {"0": "143", "1": "143"}, output[-3000:]
    assert not (out / "final").exists()


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
    (tmp_path / "final.tmp").mkdir()
    (tmp / "a").write_text("newer")
    sft.artifacts.swap_in(tmp, final)
    assert (final / "a").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


OLD, NEW = {"adapter_model.safetensors": b"old weights", "run_info.json": b"{}"}, {
    "adapter_model.safetensors": b"new weights", "run_info.json": b'{"kind": "lora"}'}


def output_dir_mid_swap(tmp_path) -> tuple[Path, Path, Path]:
    """An output_dir whose final/ is about to be replaced by the complete final.tmp/."""
    out = tmp_path / "run"
    for name, files in (("final", OLD), ("final.tmp", NEW)):
        (out / name).mkdir(parents=True)
        for file, content in files.items():
            (out / name / file).write_bytes(content)
    return out, out / "final", out / "final.tmp"


def contents(directory: Path) -> dict[str, bytes] | None:
    return {p.name: p.read_bytes() for p in directory.iterdir()} if directory.is_dir() else None


def next_run_prepares(model_dir, out) -> None:
    """The start of the next run of the same command (no model is loaded before this point)."""
    from sft.run import prepare

    prepare(parse_recipe(argv(model_dir, out, "--resume_from_checkpoint", "auto", "--eval_strategy", "no")))


def crash_on_second_rename(renames: list) -> Callable:
    real_replace = os.replace

    def replace(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        if len(renames) > 1:
            raise OSError("simulated crash between the two renames")
        real_replace(src, dst)

    return replace


def crash_on_removal(path, **kwargs):
    raise OSError(f"simulated crash before {path} was removed")


def test_a_fault_inside_the_final_swap_never_leaves_no_final(tiny_model_dir, tmp_path, monkeypatch):
    """Every step of the swap after the first fails (a second rename, removing the replaced output): final/ is still
    a complete output (here the new one: the names were exchanged by one rename), never missing, and the next run
    removes what is left. A swap by two renames would leave no final/ here."""
    out, final, tmp = output_dir_mid_swap(tmp_path)
    renames = []
    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash_on_second_rename(renames))
        m.setattr(shutil, "rmtree", crash_on_removal)
        with pytest.raises(OSError, match="simulated crash"):
            sft.artifacts.swap_in(tmp, final)
    assert contents(final) == NEW
    assert contents(tmp) == OLD and renames == []  # the replaced output waits under final.tmp: one exchange
    next_run_prepares(tiny_model_dir, out)
    assert contents(final) == NEW and sorted(p.name for p in out.iterdir() if p.name.startswith("final")) == ["final"]


def test_the_two_rename_fallback_is_recovered_by_the_next_run(tiny_model_dir, tmp_path, monkeypatch):
    """Where the names cannot be exchanged (not Linux, NFS...), the swap is two renames; a crash between them leaves
    final.old and no final/ until the next run of the command restores the old output."""
    out, final, tmp = output_dir_mid_swap(tmp_path)
    renames = []
    with monkeypatch.context() as m:
        m.setattr(sft.artifacts, "exchange_paths", lambda a, b: False)
        m.setattr(os, "replace", crash_on_second_rename(renames))
        with pytest.raises(OSError, match="simulated crash"):
            sft.artifacts.swap_in(tmp, final)
    assert renames == [("final", "final.old"), ("final.tmp", "final")]
    assert not final.exists() and contents(out / "final.old") == OLD and contents(tmp) == NEW
    next_run_prepares(tiny_model_dir, out)
    assert contents(final) == OLD and sorted(p.name for p in out.iterdir() if p.name.startswith("final")) == ["final"]


def test_check_snapshot_reads_the_checkpoints_own_snapshot_only(tmp_path):
    """A snapshot next to the checkpoint (the old layout) vouches for nothing: the checkpoint may have been copied
    there. An unreadable snapshot is one line, not a JSON traceback."""
    from sft.artifacts import ResumeError, check_snapshot

    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint.parent / "run_snapshot.json").write_text('{"lora_r": 16}')
    with pytest.raises(ResumeError, match="checkpoint-2: no run_snapshot.json"):
        check_snapshot(checkpoint, {"lora_r": 16})
    check_snapshot(checkpoint, {"lora_r": 16}, allow_unverified=True)
    (checkpoint / "run_snapshot.json").write_text('{"lora_r": 16')
    with pytest.raises(ResumeError, match=r"run_snapshot.json: unreadable run snapshot \("):
        check_snapshot(checkpoint, {"lora_r": 16})
    (checkpoint / "run_snapshot.json").write_text('{"lora_r": 16}')
    check_snapshot(checkpoint, {"lora_r": 16})
    with pytest.raises(ResumeError, match=r"\(lora_r: checkpoint 16 vs recipe 8\)$"):
        check_snapshot(checkpoint, {"lora_r": 8})


def test_overwrite_output_dir_clears_the_previous_run(tiny_model_dir, tmp_path):
    """A fresh run in a used output_dir is refused; with --overwrite_output_dir true the old checkpoints and final/
    go before anything else is written, so a later `auto` can never resume the stale run."""
    from sft.artifacts import ResumeError, checkpoints, decide_resume
    from sft.run import prepare

    out = tmp_path / "run"
    for step in (2, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (out / "final").mkdir()
    (out / "final" / "adapter_model.safetensors").write_bytes(b"stale")
    with pytest.raises(ResumeError, match="output_dir is not empty"):
        prepare(parse_recipe(argv(tiny_model_dir, out, "--eval_strategy", "no")))
    assert len(checkpoints(out)) == 2
    prepare(parse_recipe(argv(tiny_model_dir, out, "--eval_strategy", "no", "--overwrite_output_dir", "true")))
    assert checkpoints(out) == [] and not (out / "final").exists()
    assert decide_resume(out, "auto", overwrite=False) is None


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


LOADERS = ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM")


def spy_loaders(set_attribute) -> list[tuple[str, dict]]:
    """Record every `from_pretrained` call of the transformers loaders, and of PEFT's adapter loader (which takes no
    trust_remote_code: an adapter is weights and a JSON config, never code), still loading for real."""
    import peft
    import transformers

    calls = []
    for owner, name in [*((transformers, n) for n in LOADERS), (peft, "PeftModel")]:
        cls = getattr(owner, name)

        def spy(_cls, *args, _real=cls.from_pretrained, _name=name, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        set_attribute(cls, "from_pretrained", classmethod(spy))
    return calls


def spy_renames(set_attribute) -> list[tuple[Path, Path]]:
    """Record every os.replace (pathlib's too), still renaming for real."""
    real, renames = os.replace, []

    def replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real(src, dst)

    set_attribute(os, "replace", replace)
    return renames


@pytest.fixture(scope="module")
def skip_run(tiny_model_dir, tmp_path_factory):
    """One successful run with on_bad_rows: skip over a train file with one bad row; loaders and renames spied."""
    out = tmp_path_factory.mktemp("skip") / "run"
    with pytest.MonkeyPatch.context() as m:
        calls, renames = spy_loaders(m.setattr), spy_renames(m.setattr)
        code = main(argv(tiny_model_dir, out, "--train_file", str(BROKEN / "unknown_label_2.tsv"), "--on_bad_rows",
                         "skip", "--max_steps", "2", "--eval_strategy", "no"))
    assert code == 0
    return out, calls, renames


@pytest.fixture(scope="module")
def after_training(skip_run, tmp_path_factory):
    """evaluate, predict --file and merge of the skip run's final/, each with loaders and renames spied."""
    from eval.evaluate import main as evaluate_main
    from eval.merge import main as merge_main
    from eval.predict import main as predict_main

    final, work = str(skip_run[0] / "final"), tmp_path_factory.mktemp("after")
    (work / "reviews.txt").write_text("房间很干净\n服务太差了\n", encoding="utf-8")
    commands = {
        "evaluate": lambda: evaluate_main(["--adapter", final, "--data_dir", str(SAMPLE), "--max_samples", "8",
                                           "--out", str(work / "eval"), "--no_progress"]),
        "predict": lambda: predict_main(["--lora_path", final, "--file", str(work / "reviews.txt"), "--output",
                                         str(work / "predictions.jsonl")]),
        "merge": lambda: merge_main(["--adapter", final, "--out", str(work / "merged")]),
    }
    calls, renames = {}, {}
    for command, run in commands.items():
        with pytest.MonkeyPatch.context() as m:
            calls[command], renames[command] = spy_loaders(m.setattr), spy_renames(m.setattr)
            assert run() == 0, command
    return work, calls, renames


def test_a_successful_skip_run_writes_its_rejected_rows(skip_run):
    out = skip_run[0]
    rejects = [json.loads(line) for line in (out / "rejected_rows.jsonl").read_text(encoding="utf-8").splitlines()]
    bad_line = (BROKEN / "unknown_label_2.tsv").read_text(encoding="utf-8").splitlines()[3]
    assert [(r["file"], r["line"], r["raw"]) for r in rejects] == [(str(BROKEN / "unknown_label_2.tsv"), 4, bad_line)]
    assert "unknown label '2'" in rejects[0]["reason"]
    data = json.loads((out / "final" / "run_info.json").read_text())["data"]
    assert data["rejected_rows"] == 1 and data["rejects_file"] == str(out / "rejected_rows.jsonl")


def test_trust_remote_code_is_off_in_every_loader(skip_run, after_training):
    """Every tokenizer, config and model load in train, evaluate, predict and merge passes trust_remote_code=False
    (explicitly: the transformers default, None, would ask or fail on a repository with code)."""
    calls = {"train": skip_run[1], **after_training[1]}
    assert list(calls) == ["train", "evaluate", "predict", "merge"]
    for command, made in calls.items():
        loaded = {name for name, _ in made}
        assert {"AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"} <= loaded, command  # the spies saw the loads
        assert ("PeftModel" in loaded) == (command != "train"), command  # the adapter, applied to its base
        trusting = [(name, kwargs.get("trust_remote_code", "absent")) for name, kwargs in made
                    if name != "PeftModel" and kwargs.get("trust_remote_code") is not False]
        assert not trusting, f"{command}: {trusting}"


def test_outputs_are_written_under_a_temporary_name_then_renamed(skip_run, after_training):
    """A reader (or a crash) never sees half a file: the run's JSON files, recipe, loss curve and model card, every
    file of an evaluation, a predictions file and a merged model arrive by a rename from NAME.tmp."""
    out, work = skip_run[0], after_training[0]
    renames = [*skip_run[2], *(pair for pairs in after_training[2].values() for pair in pairs)]
    renamed = {dst: src for src, dst in renames}
    in_final_tmp = [out / "final.tmp" / name for name in ("run_info.json", "run_snapshot.json", "train_results.json",
                                                          "loss_curve.png")]  # then final.tmp is swapped in whole
    written = [*in_final_tmp, out / "recipe.yaml", out / "final" / "README.md", *(work / "eval").iterdir(),
               work / "predictions.jsonl", work / "merged"]
    assert len(list((work / "eval").iterdir())) >= 6  # predictions, metrics, report and three plots
    direct = [str(path) for path in written if renamed.get(path) != path.with_name(path.name + ".tmp")]
    assert not direct, direct


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
