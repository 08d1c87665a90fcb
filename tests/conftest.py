"""Shared fixtures: the offline Qwen2.5 stand-in (real tokenizer + tiny random Qwen2) and data locations."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# Tests never reach the hub (CI has no network): fail fast instead of retrying connections. Built-in and dequantized
# models go to a cache of the test session's own, so a test run neither reads nor fills the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QWEN_SFT_CACHE", tempfile.mkdtemp(prefix="qwen-sft-cache-"))

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "tests" / "data" / "sample"
REAL_DATA = REPO / "data" / "chnsenticorp"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Qwen2 + Qwen2.5 tokenizer directory, loadable with AutoModelForCausalLM / AutoTokenizer."""
    from sft.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="session")
def qwen_tokenizer(tiny_model_dir):
    from sft.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def chnsenticorp_dir() -> Path:
    """The real ChnSentiCorp splits, shipped in the repo (data/README.md)."""
    return REAL_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices on 2 shared cores: a second OpenMP thread only spins. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lora_adapter():
    """Factory: a training-output directory as sft/train.py writes it, with a LoRA that really changes outputs."""
    return make_lora_adapter


def make_lora_adapter(base_dir: Path, out_dir: Path, seed: int = 0, template=None,
                      lora_dropout: float = 0.0) -> Path:
    """A training-output directory as sft/train.py writes it, with a LoRA that really changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.artifacts import RUN_INFO_FILE, base_signature
    from sft.model import load_tokenizer
    from sft.template import PromptTemplate

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=lora_dropout)
    model = get_peft_model(base, config)
    model.save_pretrained(out_dir)
    load_tokenizer(str(base_dir)).save_pretrained(out_dir)
    (template or PromptTemplate(max_length=128)).save(out_dir)
    run_info = {"base_model": str(base_dir), "base_signature": base_signature(base.config), "gguf_file": None,
                "kind": "lora"}
    (Path(out_dir) / RUN_INFO_FILE).write_text(json.dumps(run_info), encoding="utf-8")
    return Path(out_dir)
