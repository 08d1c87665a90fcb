"""End-to-end training on the tiny offline model: demo recipe, LoRA/QLoRA/full, label-only loss, resume,
multi-process DDP and DeepSpeed ZeRO-2/3 on CPU (real gloo ranks), launch configs."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.artifacts import check_adapter_weights
from sft.config import parse_recipe
from sft.run import train
from sft.trainer import left_align as left_align_original

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample"
FAST = ["--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
        "--max_eval_samples", "16", "--per_device_train_batch_size", "8", "--do_predict", "false"]


def demo_argv(model_dir, out, *extra):
    return ["recipes/demo.yaml", "--model_name_or_path", str(model_dir), "--output_dir", str(out),
            "--data_dir", str(SAMPLE), *FAST, *extra]


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory):
    """One in-process demo run shared by several tests (training is the slow part). It saves every step, so the
    default save_total_limit (3) keeps checkpoints 2, 3 and 4 for the resume tests."""
    out = tmp_path_factory.mktemp("demo")
    trainer, final = train(parse_recipe(demo_argv(tiny_model_dir, out, *DEMO_RUN)))
    return trainer, final, out


DEMO_RUN = ("--save_steps", "1")  # demo_run's arguments: a resume compared with it must use the same


def test_demo_writes_a_self_describing_adapter(demo_run):
    trainer, final, out = demo_run
    assert final == out / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "template.json",
                 "recipe.yaml", "run_info.json", "train_results.json", "loss_curve.png", "run_snapshot.json"):
        assert (final / name).is_file(), name
    assert not (out / "final.tmp").exists()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt*"))  # no pickles in the final output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    snapshot = json.loads((final / "run_snapshot.json").read_text())
    for checkpoint in out.glob("checkpoint-*"):  # each checkpoint says what it was trained on, wherever it goes
        assert json.loads((checkpoint / "run_snapshot.json").read_text()) == snapshot, checkpoint.name
    info = json.loads((final / "run_info.json").read_text())
    assert info["resumed_from"] is None and info["steps_run"] == 4
    assert info["kind"] == "lora" and info["world_size"] == 1 and info["base_signature"]["vocab_size"] == 151936
    assert info["data"]["files"]["train"].endswith("train.tsv") and info["data"]["rejected_rows"] == 0
    assert info["versions"]["trl"] and info["git_commit"]
    assert check_adapter_weights(final) > 0
    # Dev label metrics were computed at each evaluation, like any metric.
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all(0 <= h["eval_accuracy"] <= 1 and "eval_auc" in h and "eval_f1" in h for h in evals)


def test_reloaded_adapter_gives_the_in_memory_logits(demo_run):
    from sft.model import load_for_inference

    trainer, final, _ = demo_run
    model, tokenizer, template = load_for_inference(str(final), dtype="float32", device="cpu")
    ids = torch.tensor([template.inference_ids("房间很干净，服务也好。", tokenizer)])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    base = load_for_inference(None, base=str(trainer.model.peft_config["default"].base_model_name_or_path),
                              dtype="float32", device="cpu")[0]
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, got, atol=1e-4)  # the adapter does something


@pytest.mark.parametrize("num_items", [None, "label tokens"])
@pytest.mark.parametrize("layout", ["padding-free", "padded"])
def test_label_position_loss_equals_trl_loss(demo_run, layout, num_items, monkeypatch):
    """The label-position loss equals TRL's, and the label-position path really ran (a spy on left_align, which only
    that path calls): an equality between TRL's loss and itself would prove nothing."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    import sft.trainer

    trainer, _, _ = demo_run
    collate = trainer.data_collator
    if layout == "padded":  # right-padded rows: compute_loss left-aligns them first
        collate = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)
    batch = collate([trainer.train_dataset[i] for i in range(6)])
    assert ("attention_mask" in batch) == (layout == "padded")
    # what Trainer passes during training: the number of label tokens in the whole (accumulated) batch
    count = (batch["labels"][:, 1:] != -100).sum() if num_items else None
    calls = []

    def spy(inputs):
        calls.append(1)
        return left_align_original(inputs)

    monkeypatch.setattr(sft.trainer, "left_align", spy)
    trainer.model.eval()  # no LoRA dropout: both losses see the same network
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count)
        assert calls == [1], "the label-position path did not run"
        trainer.label_position_loss = False
        try:
            trl = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count)
        finally:
            trainer.label_position_loss = True
    assert calls == [1]
    assert ours.item() == pytest.approx(trl.item(), abs=1e-5)


def test_left_align_keeps_the_logits_and_puts_every_label_in_the_last_columns(demo_run):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft.trainer import left_align

    trainer, _, _ = demo_run  # the demo trains padding-free: build the padded batch TRL makes without it
    collate = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)
    batch = collate([trainer.train_dataset[i] for i in range(8)])
    mask = batch["attention_mask"]
    assert not mask[:, -1].all()  # right-padded rows of different lengths
    aligned = left_align(dict(batch))
    width, labelled = mask.size(1), (batch["labels"] != -100).sum(1)
    assert (labelled == labelled[0]).all()  # label word + <|im_end|> + newline in every row
    columns = (aligned["labels"] != -100).any(0).nonzero().flatten().tolist()
    assert columns == list(range(width - int(labelled[0]), width))  # the union the LM head runs at
    trainer.model.eval()
    with torch.no_grad():
        right = trainer.model(input_ids=batch["input_ids"], attention_mask=mask).logits
        left = trainer.model(**{k: aligned[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    for r in range(mask.size(0)):
        n = int(mask[r].sum())
        assert torch.equal(aligned["input_ids"][r, width - n:], batch["input_ids"][r, :n])
        assert torch.allclose(left[r, width - n:], right[r, :n], atol=1e-4)
    assert left_align(aligned) is aligned  # already aligned (and padding-free batches) pass through


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_only_the_intended_parameters_change(tiny_model_dir, tmp_path, mode):
    extra = {"lora": [], "qlora": ["--use_qlora"], "full": ["--use_peft", "false", "--learning_rate", "1e-3"]}[mode]
    recipe = parse_recipe(demo_argv(tiny_model_dir, tmp_path, *extra, "--max_steps", "3", "--eval_steps", "1"))
    from sft.model import load_model, model_init_kwargs

    before = _snapshot(load_model(str(tiny_model_dir), **model_init_kwargs(recipe.model)))
    trainer, final = train(recipe)  # QLoRA evaluates at every step: train -> eval -> train must keep working
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
             for n, p in trainer.model.named_parameters()}
    compared = {n for n, p in after.items() if n in before and p.shape == before[n].shape}
    # PEFT renaming its parameters would leave nothing to compare, and "nothing changed" would pass vacuously
    if mode == "qlora":  # 4-bit weights are packed into other shapes: embeddings, norms and the head remain
        assert {n for n in compared if "norm" in n} and "model.embed_tokens.weight" in compared
    else:
        assert compared == set(before), sorted(set(before) - compared)[:3]
    changed = {n for n in compared if not torch.equal(after[n].detach().float(), before[n].float())}
    lora = {n for n, p in trainer.model.named_parameters() if "lora_" in n}
    if mode == "full":
        assert not lora and len(changed) >= len(before) // 2
        assert (final / "model.safetensors").is_file()
    else:
        assert changed == set(), f"base weights changed: {sorted(changed)[:3]}"
        assert lora and all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert trainable == lora
        assert check_adapter_weights(final) > 0
    if mode == "qlora":
        import bitsandbytes as bnb

        layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
        assert json.loads((final / "run_info.json").read_text())["kind"] == "qlora"


def test_lora_on_top_layers_with_cpu_bf16_autocast(tiny_model_dir, tmp_path, monkeypatch):
    """The CPU speed knobs of recipes/cpu_smollm2_lora.yaml: LoRA on chosen layers only, bf16 autocast on CPU (kept
    also where this machine would emulate it: the tiny model costs nothing)."""
    import sft.model
    from sft.model import ModelLoadError

    monkeypatch.setattr(sft.model, "cpu_has_native_bf16", lambda: True)

    recipe = parse_recipe(demo_argv(tiny_model_dir, tmp_path, "--max_steps", "2", "--eval_strategy", "no",
                                    "--lora_layers_to_transform", "1", "--use_cpu", "true", "--bf16", "true"))
    assert recipe.training.bf16 and recipe.training.use_cpu  # kept: the recipe asked for CPU autocast
    assert not parse_recipe(demo_argv(tiny_model_dir, tmp_path, "--bf16", "true")).training.bf16  # GPU recipe on CPU
    trainer, final = train(recipe)
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    lora = [n for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert lora and all(".layers.1." in n for n in lora)
    assert json.loads((final / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    assert check_adapter_weights(final) > 0
    bad = parse_recipe(demo_argv(tiny_model_dir, tmp_path / "bad", "--lora_layers_to_transform", "1", "2"))
    with pytest.raises(ModelLoadError, match=r"lora_layers_to_transform: \[2\] not in 0..1"):
        train(bad)


def copy_checkpoints(source: Path, out: Path, *steps: int) -> None:
    import shutil

    for step in steps:
        shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")


def adapter_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def test_resume_auto_continues_from_the_newest_complete_checkpoint(demo_run, tiny_model_dir, tmp_path, caplog):
    """Three checkpoints, the newest cut short (no trainer_state.json): auto resumes checkpoint-3, says so, runs the
    one remaining step (counted inside the run: a restart would run 4) and ends with the uninterrupted adapter."""
    _, reference_final, reference_out = demo_run
    out = tmp_path / "run"
    copy_checkpoints(reference_out, out, 2, 3, 4)
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    with caplog.at_level(logging.INFO, logger="sft.artifacts"):
        trainer, final = train(parse_recipe(demo_argv(tiny_model_dir, out, *DEMO_RUN, "--resume_from_checkpoint",
                                                      "auto")))
    assert "ignoring incomplete checkpoints (no trainer_state.json): checkpoint-4" in caplog.text
    assert f"resume_from_checkpoint=auto: resuming from {out / 'checkpoint-3'}" in caplog.text
    info = json.loads((final / "run_info.json").read_text())
    assert info["resumed_from"] == str(out / "checkpoint-3") and info["steps_run"] == 1
    assert trainer.state.global_step == 4
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4]  # the history up to step 3 came from the checkpoint
    ours, reference = adapter_weights(final), adapter_weights(reference_final)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.allclose(ours[key], reference[key], atol=1e-6), key


def test_resume_reads_the_checkpoint_weights(demo_run, tiny_model_dir, tmp_path):
    """CPU runs are deterministic, so a run of the same arguments that silently restarted from step 0 would end with
    exactly the reference adapter. Resumed from a checkpoint whose LoRA weights were altered, it must end elsewhere."""
    from safetensors.torch import save_file

    _, reference_final, reference_out = demo_run
    out = tmp_path / "run"
    copy_checkpoints(reference_out, out, 2)
    path = out / "checkpoint-2" / "adapter_model.safetensors"
    save_file({k: v * 1.5 for k, v in adapter_weights(path.parent).items()}, path)
    _, final = train(parse_recipe(demo_argv(tiny_model_dir, out, *DEMO_RUN, "--resume_from_checkpoint",
                                            str(out / "checkpoint-2"))))
    info = json.loads((final / "run_info.json").read_text())
    assert info["resumed_from"] == str(out / "checkpoint-2") and info["steps_run"] == 2
    ours, reference = adapter_weights(final), adapter_weights(reference_final)
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) > 1e-3


def test_a_checkpoint_without_its_snapshot_resumes_only_when_allowed(demo_run, tiny_model_dir, tmp_path, caplog):
    from sft.artifacts import ResumeError

    _, _, reference_out = demo_run
    out = tmp_path / "run"
    copy_checkpoints(reference_out, out, 3)
    (out / "checkpoint-3" / "run_snapshot.json").unlink()
    argv = demo_argv(tiny_model_dir, out, "--resume_from_checkpoint", "auto", "--eval_strategy", "no")
    with pytest.raises(ResumeError, match="checkpoint-3: no run_snapshot.json.*--allow_unverified_resume true"):
        train(parse_recipe(argv))
    with caplog.at_level(logging.WARNING, logger="sft.artifacts"):
        _, final = train(parse_recipe([*argv, "--allow_unverified_resume", "true"]))
    assert "checkpoint-3: no run_snapshot.json; resuming without checking it" in caplog.text
    assert json.loads((final / "run_info.json").read_text())["steps_run"] == 1


def run_cli(argv, env=None, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_resume_errors_are_clear(tiny_model_dir, tmp_path):
    out = tmp_path / "busy"
    (out / "checkpoint-7").mkdir(parents=True)
    base = [sys.executable, "sft/train.py", *demo_argv(tiny_model_dir, out)]
    refused = run_cli(base + ["--resume_from_checkpoint", "none"])
    assert refused.returncode == 2 and "output_dir is not empty" in refused.stderr
    missing = run_cli(base + ["--resume_from_checkpoint", str(tmp_path / "nope")])
    assert missing.returncode == 2 and "nope: checkpoint to resume from does not exist" in missing.stderr
    broken = run_cli(base + ["--resume_from_checkpoint", str(out / "checkpoint-7")])
    assert broken.returncode == 2 and "not a complete checkpoint" in broken.stderr
    for result in (refused, missing, broken):
        assert "Traceback" not in result.stderr


def test_resume_with_another_template_is_refused(demo_run, tiny_model_dir, tmp_path):
    import shutil

    _, _, reference_out = demo_run
    out = tmp_path / "run"
    shutil.copytree(reference_out / "checkpoint-2", out / "checkpoint-2")  # it carries its run_snapshot.json
    result = run_cli([sys.executable, "sft/train.py", *demo_argv(tiny_model_dir, out),
                      "--resume_from_checkpoint", "auto", "--verbalizers", "差评", "好评"])
    assert result.returncode == 2
    assert "recipe differs from the checkpoint's run (template:" in result.stderr


def test_resume_with_another_lora_shape_is_refused(demo_run, tiny_model_dir, tmp_path):
    """A checkpoint's LoRA weights mean something only with the same r, alpha, target modules and layers."""
    import shutil

    from sft.artifacts import ResumeError

    _, _, reference_out = demo_run
    for i, change in enumerate((["--lora_r", "8"], ["--lora_alpha", "8"], ["--lora_target_modules", "q_proj"],
                                ["--lora_layers_to_transform", "1"])):
        out = tmp_path / f"run{i}"
        shutil.copytree(reference_out / "checkpoint-2", out / "checkpoint-2")
        key = change[0][2:]
        with pytest.raises(ResumeError, match=f"recipe differs from the checkpoint's run .*{key}: checkpoint"):
            train(parse_recipe(demo_argv(tiny_model_dir, out, "--resume_from_checkpoint", "auto", *change)))


def test_demo_script_runs_from_the_command_line(tiny_model_dir, tmp_path):
    result = run_cli([sys.executable, "sft/train.py", *demo_argv(tiny_model_dir, tmp_path / "cli")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "cli" / "final" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def torch_extensions_dir(tmp_path_factory):
    """DeepSpeed compiles a small op with g++/ninja on first use (~30 s): once per test session, in a temp dir."""
    return tmp_path_factory.mktemp("torch_extensions")


@pytest.mark.parametrize("launch", ["cpu_ddp", "zero2", "zero3"])
def test_two_process_cpu_runs(tiny_model_dir, tmp_path, torch_extensions_dir, launch):
    """Real 2-rank gloo runs: DDP and DeepSpeed ZeRO-2/3, one adapter written, world size 2 seen inside the run."""
    out = tmp_path / launch
    extra = [] if launch == "cpu_ddp" else ["--num_processes", "2"]
    predict = ["--do_predict", "true"] if launch == "cpu_ddp" else []  # test scoring sharded over the 2 ranks
    result = run_cli(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/{launch}.yaml", *extra,
         "sft/train.py", *demo_argv(tiny_model_dir, out), *predict],
        env={"TORCH_EXTENSIONS_DIR": str(torch_extensions_dir), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "final" / "run_info.json").read_text())
    assert info["world_size"] == 2
    # what the run itself recorded: gloo DDP over CPU ranks, or DeepSpeed with the launch config's ZeRO stage
    assert (info["distributed_type"], info["zero_stage"]) == {
        "cpu_ddp": ("MULTI_CPU", None), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3)}[launch]
    assert check_adapter_weights(out / "final") > 0  # the ZeRO-3 empty-adapter guard passes
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("final")) == ["final"]
    if predict:
        metrics = json.loads((out / "final" / "eval_test" / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["n"] == 60
        assert result.stdout.count("TF-IDF + LR baseline ") == 1  # the closing lines, printed by the main rank only


@pytest.mark.parametrize("path", sorted((REPO / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_launch_configs_load_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.num_machines == 1
    if getattr(config, "deepspeed_config", None):
        assert "deepspeed_config_file" not in config.deepspeed_config or config.mixed_precision in (None, "no")
    if path.name == "zero3.yaml":
        assert config.deepspeed_config["zero3_init_flag"] and config.deepspeed_config["zero3_save_16bit_model"]
    if path.name == "fsdp_qlora.yaml":
        assert str(config.distributed_type).endswith("FSDP")


def test_fsdp_qlora_loading_paths():
    from trl import ModelConfig

    from sft.model import device_map_for, quantization_config

    args = ModelConfig(model_name_or_path="m", load_in_4bit=True, dtype="bfloat16", use_bnb_nested_quant=True)
    config = quantization_config(args, "FSDP")
    assert config.bnb_4bit_quant_storage == torch.bfloat16 and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_quant_type == "nf4"
    assert quantization_config(args, "NO").bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default
    assert device_map_for(True, "FSDP", 3, cuda=True) is None
    assert device_map_for(True, "DEEPSPEED", 3, cuda=True) is None
    assert device_map_for(True, "MULTI_GPU", 3, cuda=True) == {"": 3}
    assert device_map_for(True, "NO", 0, cuda=False) is None
    assert device_map_for(False, "NO", 0, cuda=True) is None


def test_best_checkpoint_by_dev_accuracy_becomes_the_final_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    recipe = parse_recipe(demo_argv(tiny_model_dir, tmp_path, "--max_steps", "6", "--load_best_model_at_end",
                                    "true", "--metric_for_best_model", "eval_accuracy", "--greater_is_better",
                                    "true", "--save_total_limit", "5", "--learning_rate", "5e-3"))
    trainer, final = train(recipe)
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [2, 4, 6, 6]  # the last: the restored best model, evaluated for the record
    evals = evals[:3]
    best_step = max(evals, key=lambda h: (h["eval_accuracy"], -h["step"]))["step"]  # ties keep the earliest
    assert trainer.state.best_metric == pytest.approx(max(h["eval_accuracy"] for h in evals))
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    best = load_file(Path(trainer.state.best_model_checkpoint) / "adapter_model.safetensors")
    ours = load_file(final / "adapter_model.safetensors")
    assert ours.keys() == best.keys() and all(torch.equal(ours[k], best[k]) for k in ours)
    results = json.loads((final / "train_results.json").read_text())
    assert results["eval_accuracy"] == pytest.approx(trainer.state.best_metric)


AVX2_ONLY = "flags\t\t: fpu sse2 avx avx2 fma\n"
WITH_BF16 = "flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n"


def test_cpu_bf16_detection_reads_the_cpu_flags():
    from sft.model import cpu_has_native_bf16

    assert not cpu_has_native_bf16(AVX2_ONLY)
    assert cpu_has_native_bf16(WITH_BF16)
    assert cpu_has_native_bf16("Features\t: fp asimd bf16 i8mm\n")  # Arm


@pytest.mark.parametrize("cpuinfo, kept", [(AVX2_ONLY, False), (WITH_BF16, True)])
def test_cpu_bf16_autocast_falls_back_to_fp32_without_native_bf16(cpuinfo, kept, monkeypatch, tmp_path, caplog):
    """An AVX2-only CPU emulates bf16: the CPU recipe's bf16 autocast would make each step many times slower."""
    from trl import SFTConfig

    import sft.model
    from sft.run import configure_training_args

    real = sft.model.cpu_has_native_bf16
    monkeypatch.setattr(sft.model, "cpu_has_native_bf16", lambda: real(cpuinfo))
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[])
    configure_training_args(args)
    assert args.bf16 is kept and args.mixed_precision == ("bf16" if kept else "no")
    assert ("no native bf16" in caplog.text) is (not kept)
