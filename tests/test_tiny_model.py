"""The offline Qwen2.5 stand-in must match the real tokenizer's facts the pipeline depends on."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.tiny_model import QWEN3_ONLY_TOKENS


def test_tokenizer_matches_qwen2_5(qwen_tokenizer):
    tok = qwen_tokenizer
    assert len(tok) == 151665
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.encode("正面", add_special_tokens=False) == [106557]
    assert tok.encode("负面", add_special_tokens=False) == [103276]
    vocab = tok.get_vocab()
    assert not any(t in vocab for t in QWEN3_ONLY_TOKENS)


def test_chat_template_is_qwen2_5(qwen_tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    # Without a system message Qwen2.5 (unlike Qwen3) inserts its default one.
    text = qwen_tokenizer.apply_chat_template(messages[1:], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_saved_directory_loads_like_a_hub_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size >= len(tok)
    assert (tiny_model_dir / "model.safetensors").is_file()
    out = model(**tok("你好", return_tensors="pt"))
    assert out.logits.shape[-1] == model.config.vocab_size
