"""The prompt template: one builder for training and inference, truncation that never cuts the label."""

import pytest
from trl import SFTConfig

from sft.template import PromptTemplate

REVIEWS = ["房间很干净，服务热情。", "电脑太慢了，非常失望", "这本书一般", "好" * 2000]


def test_messages_and_completion():
    template = PromptTemplate()
    messages = template.prompt_messages("不错")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"].endswith("评论：不错")
    assert "负面、正面" in messages[1]["content"]
    assert template.completion_messages(1) == [{"role": "assistant", "content": "正面"}]
    with pytest.raises(ValueError, match="out of range"):
        template.completion_messages(2)


def test_verbalizers_validated_and_n_classes():
    with pytest.raises(ValueError, match="distinct"):
        PromptTemplate(verbalizers=("好", "好"))
    three = PromptTemplate(verbalizers=("负面", "中性", "正面"))
    assert three.num_labels == 3 and "负面、中性、正面" in three.user_content("x")


def test_fit_keeps_start_and_respects_max_length(qwen_tokenizer):
    template = PromptTemplate(max_length=96)
    review = "这家酒店的位置非常好，" * 200
    fitted = template.fit(review, qwen_tokenizer)
    assert review.startswith(fitted) and 0 < len(fitted) < len(review)
    for label in (0, 1):
        record = template.training_record(review, label, qwen_tokenizer)
        ids = qwen_tokenizer.apply_chat_template(record["prompt"] + record["completion"])["input_ids"]
        assert len(ids) <= 96
        assert qwen_tokenizer.decode(ids).endswith(template.verbalizers[label] + "<|im_end|>\n")
    # Short reviews are untouched; no max_length means no truncation.
    assert template.fit("很好", qwen_tokenizer) == "很好"
    assert PromptTemplate().fit(review, qwen_tokenizer) == review


def test_fit_refuses_a_max_length_that_leaves_no_room(qwen_tokenizer):
    with pytest.raises(ValueError, match="no room for the review"):
        PromptTemplate(max_length=20).fit("很好很好", qwen_tokenizer)


def test_save_load_roundtrip(tmp_path):
    template = PromptTemplate(system_prompt="S", verbalizers=("差", "好"), max_length=128)
    template.save(tmp_path)
    assert PromptTemplate.load(tmp_path) == template
    with pytest.raises(FileNotFoundError, match="template.json"):
        PromptTemplate.load(tmp_path / "missing")


@pytest.mark.parametrize("padding_free", [False, True])
def test_prompt_identity_with_trl_tokenization(tiny_model_dir, qwen_tokenizer, tmp_path, padding_free):
    """What SFTTrainer trains on = inference prompt + label tokens; only the label turn carries loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from sft.trainer import ClassificationSFTTrainer

    template = PromptTemplate(max_length=128)
    labels = [1, 0, 0, 1]
    pairs = zip(REVIEWS, labels, strict=True)
    records = Dataset.from_list([template.training_record(r, y, qwen_tokenizer) for r, y in pairs])
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                     max_length=None if padding_free else 128, padding_free=padding_free,
                     per_device_train_batch_size=4)
    trainer = ClassificationSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=records,
        processing_class=qwen_tokenizer,
    )
    end_of_turn = qwen_tokenizer.convert_tokens_to_ids(["<|im_end|>"]) + qwen_tokenizer.encode("\n")
    for row, review, label in zip(trainer.train_dataset, REVIEWS, labels, strict=True):
        prompt = template.inference_ids(review, qwen_tokenizer)
        label_ids = qwen_tokenizer.encode(template.verbalizers[label], add_special_tokens=False)
        assert row["input_ids"][: len(prompt)] == prompt
        assert row["input_ids"][len(prompt):] == label_ids + end_of_turn
        trained = [t for t in row["labels"] if t != -100]
        assert trained == label_ids + end_of_turn
        assert len(row["input_ids"]) <= 128
    # The 2,000-character review kept its label.
    assert trainer.train_dataset[3]["labels"][-3] == 106557

    # The collated batch (what the model really sees): labels != -100 exactly on label + <|im_end|> + "\n".
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    kept = batch["labels"][batch["labels"] != -100].tolist()
    expected = []
    for label in labels:
        expected += [(106557, 103276)[1 - label]] + end_of_turn
    assert kept == expected
    assert ("position_ids" in batch) == padding_free


def test_missing_chat_template_is_one_clear_error(tiny_model_dir, tmp_path):
    from sft.model import ensure_chat_template, load_tokenizer
    from sft.template import TemplateError
    from sft.tiny_model import qwen2_5_chat_template

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template; set chat_template_path"):
        ensure_chat_template(tokenizer, "my-base-model")
    jinja = tmp_path / "qwen2_5.jinja"
    jinja.write_text(qwen2_5_chat_template(), encoding="utf-8")
    ensure_chat_template(tokenizer, "my-base-model", str(jinja))
    assert PromptTemplate().inference_ids("好", tokenizer)[-3:] == tokenizer.encode(
        "<|im_start|>assistant\n", add_special_tokens=False)
