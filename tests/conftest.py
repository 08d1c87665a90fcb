"""Shared fixtures: the offline Qwen2.5 stand-in (real tokenizer + tiny random Qwen2) and data locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "tests" / "data" / "sample"


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
    """The real ChnSentiCorp files, read in place (never copied into the repo)."""
    value = os.environ.get("CHNSENTICORP_DIR")
    if not value:
        pytest.skip("CHNSENTICORP_DIR is not set: real-data tests need the ChnSentiCorp TSV directory")
    path = Path(value)
    if not (path / "train.tsv").is_file():
        pytest.fail(f"CHNSENTICORP_DIR={value} does not contain train.tsv")
    return path
