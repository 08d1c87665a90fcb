"""The batched label scorer must equal a brute-force reference: one plain forward per (text, full label sequence)."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from sft.scoring import Scores, label_token_ids, pad_batch, score_texts
from sft.template import PromptTemplate

TEXTS = [
    "这个酒店很好，服务周到，下次还来。",
    "太差了，再也不来了。" * 12,  # long: truncated by max_length, so prompt lengths differ a lot
    "一般般",
    "屏幕有坏点，运行很卡，不推荐购买。",
    "书的内容很精彩，纸张质量也不错！",
    "物流太慢了，包装也破了。",
    "入住两晚，房间很干净，早餐很丰盛。",
    "还行吧，没有想象中那么好，也没有那么差，价格偏贵。",
    "好",
]
MULTI = ("非常负面", "正面评价", "中性")  # every label is several tokens
MIXED = ("负面", "正面评价", "非常负面")  # one single-token label, two sharing no prefix with it


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_logprobs(model, tokenizer, template, texts) -> np.ndarray:
    """One forward per text and label over prompt + the label's tokens; no padding, no batching."""
    out = np.zeros((len(texts), template.num_labels))
    with torch.no_grad():
        for i, text in enumerate(texts):
            prompt = template.inference_ids(text, tokenizer)
            for c, word in enumerate(template.verbalizers):
                label = tokenizer.encode(word, add_special_tokens=False)
                logits = model(input_ids=torch.tensor([prompt + label])).logits[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                out[i, c] = sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(label))
    return out


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    """The tiny model with larger random weights, so label log-probs differ by whole nats between texts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.1)
    return model


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir, tmp_path_factory, lora_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), lora_dropout=0.5)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()


def test_verbalizer_token_counts(qwen_tokenizer):
    default = label_token_ids(PromptTemplate(), qwen_tokenizer)
    assert [len(ids) for ids in default] == [1, 1]
    assert all(len(ids) > 1 for ids in label_token_ids(PromptTemplate(verbalizers=MULTI), qwen_tokenizer))
    assert [len(ids) > 1 for ids in label_token_ids(PromptTemplate(verbalizers=MIXED), qwen_tokenizer)] == [
        False, True, True
    ]


@pytest.mark.parametrize("verbalizers", [("负面", "正面"), MULTI, MIXED], ids=["single", "multi", "mixed"])
def test_batched_equals_reference(sharp_model, qwen_tokenizer, verbalizers):
    template = PromptTemplate(verbalizers=verbalizers, max_length=96)
    expected = reference_logprobs(sharp_model, qwen_tokenizer, template, TEXTS)
    assert np.ptp(expected[:, 0]) > 1.0  # a discriminating model: errors in positions would show
    for side in ("left", "right"):
        for batch_size in (1, 7):
            got = score_texts(sharp_model, qwen_tokenizer, template, TEXTS, batch_size=batch_size,
                              padding_side=side, progress=False)
            np.testing.assert_allclose(got.logprobs, expected, atol=1e-4, err_msg=f"{side} padding, bs {batch_size}")

    order = list(range(len(TEXTS)))
    random.Random(0).shuffle(order)
    shuffled = score_texts(sharp_model, qwen_tokenizer, template, [TEXTS[i] for i in order], batch_size=4,
                           progress=False)
    np.testing.assert_allclose(shuffled.logprobs, expected[order], atol=1e-4)


def test_scores_are_consistent(sharp_model, qwen_tokenizer):
    scores = score_texts(sharp_model, qwen_tokenizer, PromptTemplate(), TEXTS, progress=False)
    assert isinstance(scores, Scores) and len(scores) == len(TEXTS)
    np.testing.assert_allclose(scores.probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(scores.label_mass, np.exp(scores.logprobs).sum(axis=1))
    assert (scores.preds == scores.probs.argmax(axis=1)).all()
    row = scores.row(0)
    assert row["label"] == ("负面", "正面")[row["label_id"]] and set(row["probs"]) == {"负面", "正面"}
    empty = score_texts(sharp_model, qwen_tokenizer, PromptTemplate(), [], progress=False)
    assert empty.logprobs.shape == (0, 2)


def test_lora_model_scores_through_the_adapter(lora_model, tiny_model_dir, qwen_tokenizer):
    """Calling the inner backbone of a PeftModel must still run the injected LoRA layers."""
    from transformers import AutoModelForCausalLM

    for verbalizers in (("负面", "正面"), MULTI):
        template = PromptTemplate(verbalizers=verbalizers, max_length=96)
        expected = reference_logprobs(lora_model, qwen_tokenizer, template, TEXTS[:5])
        got = score_texts(lora_model, qwen_tokenizer, template, TEXTS[:5], batch_size=3, progress=False)
        np.testing.assert_allclose(got.logprobs, expected, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    without = score_texts(base, qwen_tokenizer, template, TEXTS[:5], progress=False)
    assert np.abs(without.logprobs - got.logprobs).max() > 1e-3  # the adapter changed the scores


def test_parallel_wrapper_is_unwrapped(lora_model, qwen_tokenizer):
    """accelerate's extract_model_from_parallel takes off DDP/DataParallel (DataParallel runs on a CPU-only machine
    as a plain pass-through); the PeftModel inside still scores through its adapter; the wrapper's mode is restored."""
    template = PromptTemplate(max_length=96)
    expected = score_texts(lora_model, qwen_tokenizer, template, TEXTS[:3], progress=False).logprobs
    wrapped = torch.nn.DataParallel(lora_model).train()
    try:
        got = score_texts(wrapped, qwen_tokenizer, template, TEXTS[:3], progress=False).logprobs
        assert wrapped.training and lora_model.training
    finally:
        wrapped.eval()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_pad_batch_sides():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")


def test_train_mode_is_restored_and_ignored(lora_model, qwen_tokenizer):
    """A training callback passes a model in train mode (LoRA dropout 0.5 here): scoring runs in eval mode."""
    template = PromptTemplate(max_length=96)
    expected = score_texts(lora_model, qwen_tokenizer, template, TEXTS[:4], progress=False).logprobs
    lora_model.train()
    try:
        got = score_texts(lora_model, qwen_tokenizer, template, TEXTS[:4], progress=False).logprobs
        assert lora_model.training
    finally:
        lora_model.eval()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_token_budget_caps_batches(sharp_model, qwen_tokenizer, monkeypatch):
    template = PromptTemplate(verbalizers=MULTI, max_length=96)
    shapes = []
    backbone = sharp_model.get_decoder()
    original = backbone.forward

    def spy(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone, "forward", spy)
    budget = 600
    got = score_texts(sharp_model, qwen_tokenizer, template, TEXTS, batch_size=32, max_tokens_per_batch=budget,
                      progress=False)
    monkeypatch.undo()
    rows_per_text = 3  # three distinct label prefixes
    assert sum(rows for rows, _ in shapes) == rows_per_text * len(TEXTS)
    assert all(rows * width <= budget or rows == rows_per_text for rows, width in shapes)
    assert len(shapes) > 1
    expected = score_texts(sharp_model, qwen_tokenizer, template, TEXTS, batch_size=32, progress=False)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-4)


def test_low_label_mass_warns_once_in_plain_words(sharp_model, qwen_tokenizer, caplog, monkeypatch):
    from sft import scoring

    monkeypatch.setattr(scoring, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="sft.scoring"):
        scores = score_texts(sharp_model, qwen_tokenizer, PromptTemplate(), TEXTS[:2], progress=False)
        score_texts(sharp_model, qwen_tokenizer, PromptTemplate(), TEXTS[2:4], progress=False)
    assert scores.label_mass.mean() < 0.5  # a random model does not answer with the labels
    warnings = [r.getMessage() for r in caplog.records if "label words" in r.getMessage()]
    assert len(warnings) == 1, warnings  # a second scoring in the same process stays quiet
    assert "random base" in warnings[0] and "differs from the one it was trained on" in warnings[0]
