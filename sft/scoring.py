"""Label scoring: log p(label word | prompt) for every class, in one forward pass per batch.

Evaluation, prediction and the training callback all score through `score_texts`, so a number printed anywhere in
the project means the same thing. Prompts come only from `PromptTemplate.inference_ids` (the prompt the model was
trained on). For each text and class the score is the log-probability of the verbalizer's full token sequence
right after the generation prompt; `probs` renormalises those over the classes and `label_mass` is how much
probability the model puts on the label words at all (low mass means the model wants to say something else: the
prompt or the template drifted from training).

Single-token verbalizers (Qwen: 负面, 正面) are read from one row per text. Multi-token verbalizers are scored by
teacher forcing: each prompt is fed with every distinct label prefix appended (labels sharing a prefix share the
row) and the label tokens' log-probs are summed. The LM head runs only at the positions that are scored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from sft.template import chat_ids

logger = logging.getLogger(__name__)

MIN_LABEL_MASS = 0.5  # mean probability on the label words below this is worth a warning
ZERO_SHOT_MAX_LENGTH = 512  # token limit of the default template when a base model is scored without an adapter


@dataclass
class Scores:
    """Per-text scores, in input order. Arrays have one row per text and one column per class."""

    verbalizers: tuple[str, ...]
    logprobs: np.ndarray  # (n, num_labels) float64: log p(label tokens | prompt)
    temperature: float = 1.0  # probs = softmax(logprobs / T); T from calibration.json (eval/evaluate.py --calibrate)
    probs: np.ndarray = field(init=False)  # softmax of logprobs over the classes: p(class | answer is a label)
    preds: np.ndarray = field(init=False)  # argmax class index (the same at any temperature)
    label_mass: np.ndarray = field(init=False)  # total probability on the label words (1.0: always a label)

    def __post_init__(self) -> None:
        self.logprobs = np.asarray(self.logprobs, dtype=np.float64).reshape(-1, len(self.verbalizers))
        scaled = self.logprobs / self.temperature
        exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        self.probs = exp / exp.sum(axis=1, keepdims=True)
        self.preds = self.logprobs.argmax(axis=1)
        self.label_mass = np.exp(self.logprobs).sum(axis=1)

    def __len__(self) -> int:
        return len(self.logprobs)

    def row(self, i: int) -> dict:
        """One text's result as plain Python values (what predict.py and predictions.jsonl show)."""
        pred = int(self.preds[i])
        return {
            "label": self.verbalizers[pred],
            "label_id": pred,
            "probs": {v: float(p) for v, p in zip(self.verbalizers, self.probs[i], strict=True)},
            "label_mass": float(self.label_mass[i]),
        }


def label_token_ids(template, tokenizer) -> list[list[int]]:
    """Token ids of each verbalizer as they appear after the generation prompt in a training example."""
    prompt = template.prompt_messages("x")
    prompt_ids = template.prompt_ids("x", tokenizer)
    labels = []
    for label, word in enumerate(template.verbalizers):
        full = chat_ids(tokenizer, prompt + template.completion_messages(label))
        ids = tokenizer.encode(word, add_special_tokens=False)
        if full[: len(prompt_ids) + len(ids)] != prompt_ids + ids:
            raise ValueError(f"verbalizer {word!r} does not tokenize the same inside the chat template")
        labels.append(ids)
    _warn_prefix_labels(template.verbalizers, labels)
    return labels


def _warn_prefix_labels(verbalizers: Sequence[str], labels: list[list[int]]) -> None:
    """A label that is a token prefix of another is still scored, but its mass silently includes the longer one's."""
    for a, ids_a in enumerate(labels):
        for b, ids_b in enumerate(labels):
            if a != b and ids_b[: len(ids_a)] == ids_a:
                logger.warning("label %r is a token prefix of %r: its probability includes the longer label's",
                               verbalizers[a], verbalizers[b])


class _Feeds(NamedTuple):
    """What is appended to each prompt. Every distinct label prefix (all tokens but the last; () for a single-token
    label) is one row per text, so labels sharing a prefix share a row (all single-token labels: one row)."""

    labels: list[list[int]]  # token ids of each class's verbalizer
    prefixes: list[tuple[int, ...]]  # distinct label prefixes, one padded row each
    row_of: list[int]  # class -> index of its prefix in `prefixes`


def _label_feeds(template, tokenizer) -> _Feeds:
    """The label ids and their distinct prefixes (sorted, so the row layout does not depend on class order)."""
    labels = label_token_ids(template, tokenizer)
    prefixes = sorted({tuple(ids[:-1]) for ids in labels})
    return _Feeds(labels, prefixes, [prefixes.index(tuple(ids[:-1])) for ids in labels])


def _prompts(template, tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Prompt ids of every text, built only by `inference_ids`: exactly the prompt part of a training example."""
    return [template.inference_ids(text, tokenizer) for text in texts]


class _Parts(NamedTuple):
    """The pieces of the model a batch runs through: the decoder stack and the LM head are called apart so that the
    head (vocabulary-sized) runs only at the scored positions."""

    backbone: torch.nn.Module
    head: torch.nn.Module
    device: torch.device  # where the input ids go (the embeddings' device)


def _model_parts(model: torch.nn.Module) -> _Parts:
    """Backbone and head of the transformers model behind DDP / DeepSpeed / FSDP and PEFT wrappers (PEFT injects
    LoRA layers in place, so calling the inner model's modules still runs the adapter)."""
    from accelerate.utils import extract_model_from_parallel

    base = extract_model_from_parallel(model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return _Parts(base.get_decoder(), base.get_output_embeddings(), base.get_input_embeddings().weight.device)


def _batches(lengths: list[int], row_extra: int, rows_per_text: int, batch_size: int, max_tokens: int | None):
    """Indices grouped longest first: at most `batch_size` texts and `max_tokens` padded tokens per forward."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        cost = (len(batch) + 1) * rows_per_text * (lengths[batch[0] if batch else i] + row_extra)
        if batch and (len(batch) >= batch_size or (max_tokens is not None and cost > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token lists padded with `pad_id` to the longest; `side="left"` right-aligns
    the sequences, as generation needs them. The project's one padder (scoring, benchmarks)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        start = width - len(s) if side == "left" else 0
        ids[r, start : start + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, start : start + len(s)] = 1
    return ids, mask


def _scored_positions(
    batch: list[int], prompts: list[list[int]], feeds: _Feeds, starts: list[int]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(row, column, target, owner) of every label token in a batch: the padded row and column whose next-token
    distribution predicts it, the token id, and the flat (text, class) index whose log-prob sum it joins.
    `starts` is the first real token of each row (0 with right padding)."""
    rows, cols, targets, owners = [], [], [], []
    for b, i in enumerate(batch):
        for c, ids in enumerate(feeds.labels):
            r = b * len(feeds.prefixes) + feeds.row_of[c]
            first = starts[r] + len(prompts[i]) - 1  # the last prompt token predicts the first label token
            rows += [r] * len(ids)
            cols += range(first, first + len(ids))
            targets += ids
            owners += [b * len(feeds.labels) + c] * len(ids)
    return rows, cols, targets, owners


def _score_batch(
    parts: _Parts, feeds: _Feeds, prompts: list[list[int]], batch: list[int], pad_id: int, padding_side: str
) -> np.ndarray:
    """(len(batch), classes) float64 block of log p(label tokens | prompt) from one forward: the backbone over every
    (text, label prefix) row, then the LM head only at the distinct scored positions, where a full-sequence head
    would spend most of the time and memory on logits nobody reads."""
    seqs = [prompts[i] + list(prefix) for i in batch for prefix in feeds.prefixes]
    ids, mask = pad_batch(seqs, pad_id, padding_side)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
    hidden = parts.backbone(
        input_ids=ids.to(parts.device),
        attention_mask=mask.to(parts.device),
        position_ids=position_ids.to(parts.device),
        use_cache=False,
    ).last_hidden_state
    rows, cols, targets, owners = _scored_positions(batch, prompts, feeds, mask.argmax(-1).tolist())
    flat = torch.tensor(rows) * ids.shape[1] + torch.tensor(cols)
    unique, inverse = torch.unique(flat, return_inverse=True)  # run the head once per position
    h = hidden.reshape(-1, hidden.shape[-1])[unique.to(hidden.device)]
    logp = torch.log_softmax(parts.head(h.to(parts.head.weight.device)).float(), dim=-1).cpu()
    summed = torch.zeros(len(batch) * len(feeds.labels), dtype=torch.float64)
    summed.index_add_(0, torch.tensor(owners), logp[inverse, torch.tensor(targets)].double())
    return summed.view(len(batch), len(feeds.labels)).numpy()


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while scoring (a training callback passes a model in train mode); the mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def score_texts(
    model,
    tokenizer,
    template,
    texts: list[str],
    batch_size: int = 32,
    max_tokens_per_batch: int | None = None,
    progress: bool = True,
    padding_side: str = "right",
    min_label_mass: float = MIN_LABEL_MASS,
) -> Scores:
    """Score every text against every class; the model's train/eval mode is restored afterwards."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    feeds = _label_feeds(template, tokenizer)
    prompts = _prompts(template, tokenizer, texts)
    parts = _model_parts(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    extra = max(len(prefix) for prefix in feeds.prefixes)
    batches = _batches([len(p) for p in prompts], extra, len(feeds.prefixes), batch_size, max_tokens_per_batch)
    logprobs = np.zeros((len(texts), len(feeds.labels)), dtype=np.float64)
    bar = tqdm(total=len(texts), desc="scoring", unit="text", disable=not progress)
    with bar, _eval_mode(model), torch.inference_mode():
        for batch in batches:
            logprobs[batch] = _score_batch(parts, feeds, prompts, batch, pad_id, padding_side)
            bar.update(len(batch))

    scores = Scores(tuple(template.verbalizers), logprobs)
    if len(scores) and scores.label_mass.mean() < min_label_mass:
        warn_low_label_mass(float(scores.label_mass.mean()), template.verbalizers)
    return scores


_warned: set[tuple[str, ...]] = set()


def warn_low_label_mass(mean_mass: float, verbalizers: tuple[str, ...]) -> None:
    """Once per process and label set: a training run evaluates many times, an interactive session scores many
    lines, and the explanation does not change."""
    if tuple(verbalizers) in _warned:
        return
    _warned.add(tuple(verbalizers))
    logger.warning(
        "the model puts only %.2g of its probability on the label words (%s) after the prompt. Predictions still "
        "pick the likelier label, but the model would rather say something else: expected for an untrained or "
        "random base (the demo), a sign of trouble for a fine-tuned adapter (a prompt or template that differs "
        "from the one it was trained on). Shown once.", mean_mass, "/".join(verbalizers))
