"""The prompt template: the ONLY place where a classification prompt is built.

Training (TRL prompt-completion records), evaluation and prediction all go through `PromptTemplate`, so the
tokens the model sees at inference are exactly the prompt part of what it was trained on. The review is the only
part that may be shortened: it is truncated by tokens (keeping its start) so that prompt + the longest label
always fit in `max_length` and the label is never cut off.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sft.artifacts import TEMPLATE_FILE
from sft.data import DEFAULT_LABEL_NAMES

DEFAULT_SYSTEM_PROMPT = "你是一个中文情感分析助手。"
DEFAULT_INSTRUCTION = "请判断下面这条评论的情感倾向，只回答以下标签之一：{labels}。"
DEFAULT_VERBALIZERS = [spellings[0] for spellings in DEFAULT_LABEL_NAMES]  # 负面, 正面


class TemplateError(ValueError):
    """The template cannot be built with this tokenizer or these settings (one line)."""


@dataclass
class TemplateArguments:
    """Recipe keys for the prompt (parsed by TrlParser next to SFTConfig / ModelConfig)."""

    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "System message of every prompt."})
    instruction: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Instruction placed before the review; '{labels}' is replaced by the verbalizers."},
    )
    verbalizers: list[str] = field(
        default_factory=lambda: list(DEFAULT_VERBALIZERS),
        metadata={"help": "Answer word of each class, in class order (class i -> verbalizers[i])."},
    )

    def __post_init__(self) -> None:
        check_verbalizers(self.verbalizers)  # at recipe parsing, before any data or model is loaded


def check_verbalizers(verbalizers) -> tuple[str, ...]:
    verbalizers = tuple(verbalizers)
    if len(verbalizers) < 2:
        raise TemplateError(f"verbalizers: need at least 2 classes, got {list(verbalizers)}")
    if len(set(verbalizers)) != len(verbalizers) or any(not v.strip() for v in verbalizers):
        raise TemplateError(f"verbalizers must be distinct non-empty words, got {list(verbalizers)}")
    return verbalizers


@dataclass(frozen=True)
class PromptTemplate:
    """Turns (review, label) into chat messages; `max_length` bounds prompt + label in tokens (None: no limit)."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    instruction: str = DEFAULT_INSTRUCTION
    verbalizers: tuple[str, ...] = tuple(DEFAULT_VERBALIZERS)
    max_length: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "verbalizers", check_verbalizers(self.verbalizers))

    @classmethod
    def from_args(cls, args: TemplateArguments, max_length: int | None) -> PromptTemplate:
        return cls(args.system_prompt, args.instruction, tuple(args.verbalizers), max_length)

    # ----- messages -----------------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.verbalizers)

    def user_content(self, review: str) -> str:
        instruction = self.instruction.replace("{labels}", "、".join(self.verbalizers))
        return f"{instruction}\n评论：{review}"

    def prompt_messages(self, review: str) -> list[dict[str, str]]:
        """System + user turns for one (already fitted) review."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_content(review)},
        ]

    def completion_messages(self, label: int) -> list[dict[str, str]]:
        if not 0 <= label < self.num_labels:
            raise ValueError(f"label {label} out of range for verbalizers {list(self.verbalizers)}")
        return [{"role": "assistant", "content": self.verbalizers[label]}]

    # ----- tokens -------------------------------------------------------------------------------------------
    def prompt_ids(self, review: str, tokenizer) -> list[int]:
        """Token ids of the inference prompt (chat template + generation prompt) for an already fitted review."""
        return chat_ids(tokenizer, self.prompt_messages(review), add_generation_prompt=True)

    def completion_budget(self, tokenizer) -> int:
        """Tokens the longest label turn adds after the generation prompt (label + end-of-turn + newline)."""
        return _completion_budget(tokenizer, self)

    def fit(self, review: str, tokenizer) -> str:
        """Shorten `review` (keeping its start) until prompt + longest label fit in `max_length` tokens."""
        if self.max_length is None:
            return review
        limit = self.max_length - self.completion_budget(tokenizer)
        excess = len(self.prompt_ids(review, tokenizer)) - limit
        if excess <= 0:
            return review
        offsets = tokenizer(review, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = len(offsets) - excess
        while keep > 0:
            candidate = review[: offsets[keep - 1][1]]
            excess = len(self.prompt_ids(candidate, tokenizer)) - limit
            if excess <= 0:
                return candidate
            keep -= excess  # a token merge at the cut can cost one more token: shrink by what is still over
        raise TemplateError(
            f"max_length={self.max_length} leaves no room for the review: the template alone needs "
            f"{len(self.prompt_ids('', tokenizer)) + self.completion_budget(tokenizer)} tokens"
        )

    def training_record(self, review: str, label: int, tokenizer) -> dict[str, Any]:
        """A conversational prompt-completion record for TRL's SFTTrainer (loss on the completion only)."""
        return {
            "prompt": self.prompt_messages(self.fit(review, tokenizer)),
            "completion": self.completion_messages(label),
        }

    def inference_ids(self, review: str, tokenizer) -> list[int]:
        """Prompt ids used by scoring and prediction: fit, then the same chat template as in training."""
        return self.prompt_ids(self.fit(review, tokenizer), tokenizer)

    # ----- persistence: the adapter directory carries the template -----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["verbalizers"] = list(self.verbalizers)
        return data

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TEMPLATE_FILE
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> PromptTemplate:
        path = Path(directory) / TEMPLATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no prompt template saved here (is this a training output directory?)")
        data = json.loads(path.read_text(encoding="utf-8"))
        unknown = set(data) - {"system_prompt", "instruction", "verbalizers", "max_length"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**{**data, "verbalizers": tuple(data["verbalizers"])})


def chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """`apply_chat_template` returning a plain list of ids (transformers 5 returns a BatchEncoding by default)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@lru_cache(maxsize=32)
def _completion_budget(tokenizer, template: PromptTemplate) -> int:
    """Cached per (tokenizer object, template): it renders the chat template once per label."""
    prompt = template.prompt_messages("x")
    base = len(chat_ids(tokenizer, prompt, add_generation_prompt=True))
    return max(
        len(chat_ids(tokenizer, prompt + template.completion_messages(i))) - base for i in range(template.num_labels)
    )
