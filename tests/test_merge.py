"""eval/merge.py: the merged standalone model reproduces the adapter's label probabilities, or nothing is kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval.merge import VERIFY_TEXTS
from eval.merge import main as merge_main
from sft.model import load_for_inference
from sft.scoring import score_texts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory, lora_adapter) -> Path:
    adapter = lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "run", seed=3)
    (adapter / "recipe.yaml").write_text(f"model_name_or_path: {tiny_model_dir}\n", encoding="utf-8")
    (adapter / "calibration.json").write_text('{"temperature": 1.5}', encoding="utf-8")  # eval/evaluate.py --calibrate
    return adapter


def label_probs(directory: Path) -> np.ndarray:
    model, tokenizer, template = load_for_inference(str(directory), dtype="float32")
    return score_texts(model, tokenizer, template, list(VERIFY_TEXTS), progress=False).probs


def test_merged_model_equals_adapter(adapter_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(adapter_dir), "--out", str(out)]) == 0
    assert "merged model written" in capsys.readouterr().out
    assert not Path(f"{out}.tmp").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    for name in ("template.json", "recipe.yaml", "tokenizer.json", "calibration.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run_info.json").read_text(encoding="utf-8"))
    assert info["kind"] == "merged" and info["adapter_kind"] == "lora" and info["merged_from"] == str(adapter_dir)

    merged, adapter = label_probs(out), label_probs(adapter_dir)
    np.testing.assert_allclose(merged, adapter, atol=1e-3)
    # the adapter matters: the plain base gives other probabilities
    base_model, tokenizer, _ = load_for_inference(None, str(tiny_model_dir), dtype="float32")
    _, _, template = load_for_inference(str(adapter_dir), dtype="float32")
    base = score_texts(base_model, tokenizer, template, list(VERIFY_TEXTS), progress=False).probs
    assert np.abs(base - adapter).max() > 1e-3

    # an existing output is not replaced without --overwrite
    assert merge_main(["--adapter", str(adapter_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert merge_main(["--adapter", str(adapter_dir), "--out", str(out), "--overwrite"]) == 0


def test_failed_verification_keeps_nothing(adapter_dir, tmp_path, monkeypatch, capsys):
    """A merge that loses the LoRA update (simulated: unload without merging) must fail with exit code 1."""
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(adapter_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: merged model differs from the adapter")
    assert not out.exists() and not Path(f"{out}.tmp").exists()


def test_errors(tmp_path, tiny_model_dir, capsys):
    assert merge_main(["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "adapter directory does not exist" in capsys.readouterr().err
    full = tmp_path / "full"  # a full fine-tune has nothing to merge
    full.mkdir()
    (full / "run_info.json").write_text('{"kind": "full", "base_model": "x"}', encoding="utf-8")
    assert merge_main(["--adapter", str(full), "--out", str(tmp_path / "o")]) == 2
    assert "nothing to merge" in capsys.readouterr().err
