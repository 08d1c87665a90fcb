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
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MIN_LABEL_MASS = 0.5  # mean probability on the label words below this is worth a warning
ZERO_SHOT_MAX_LENGTH = 512  # token limit of the default template when a base model is scored without an adapter


@dataclass
class Scores:
    """Per-text scores, in input order. Arrays have one row per text and one column per class."""

    verbalizers: tuple[str, ...]
    logprobs: np.ndarray  # (n, num_labels) float64: log p(label tokens | prompt)
    probs: np.ndarray = field(init=False)  # softmax of logprobs over the classes: p(class | answer is a label)
    preds: np.ndarray = field(init=False)  # argmax class index
    label_mass: np.ndarray = field(init=False)  # total probability on the label words (1.0: always a label)

    def __post_init__(self) -> None:
        self.logprobs = np.asarray(self.logprobs, dtype=np.float64).reshape(-1, len(self.verbalizers))
        exp = np.exp(self.logprobs - self.logprobs.max(axis=1, keepdims=True))
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
        out = tokenizer.apply_chat_template(prompt + template.completion_messages(label), tokenize=True)
        full = list(out["input_ids"] if hasattr(out, "keys") else out)
        ids = tokenizer.encode(word, add_special_tokens=False)
        if full[: len(prompt_ids)] != prompt_ids or full[len(prompt_ids) : len(prompt_ids) + len(ids)] != ids:
            raise ValueError(f"verbalizer {word!r} does not tokenize the same inside the chat template")
        labels.append(ids)
    for a, ids_a in enumerate(labels):
        for b, ids_b in enumerate(labels):
            if a != b and ids_b[: len(ids_a)] == ids_a:
                logger.warning(
                    "label %r is a token prefix of %r: its probability includes the longer label's",
                    template.verbalizers[a],
                    template.verbalizers[b],
                )
    return labels


def _unwrap(model):
    """The transformers model behind DDP / PEFT wrappers (PEFT injects LoRA layers in place, so they stay active)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


def _pad(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        start = width - len(s) if side == "left" else 0
        ids[r, start : start + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, start : start + len(s)] = 1
    return ids, mask


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
    labels = label_token_ids(template, tokenizer)
    feeds = sorted({tuple(ids[:-1]) for ids in labels})  # label prefixes to append; () for single tokens
    feed_of = [feeds.index(tuple(ids[:-1])) for ids in labels]
    prompts = [template.inference_ids(text, tokenizer) for text in texts]
    logprobs = np.zeros((len(texts), len(labels)), dtype=np.float64)

    base = _unwrap(model)
    backbone, head = base.get_decoder(), base.get_output_embeddings()
    device = base.get_input_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(texts), desc="scoring", unit="text", disable=not progress)
    try:
        with torch.inference_mode():
            extra = max(len(f) for f in feeds)
            for batch in _batches([len(p) for p in prompts], extra, len(feeds), batch_size, max_tokens_per_batch):
                seqs = [prompts[i] + list(feed) for i in batch for feed in feeds]
                ids, mask = _pad(seqs, pad_id, padding_side)
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                hidden = backbone(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=position_ids.to(device),
                    use_cache=False,
                ).last_hidden_state
                starts = mask.argmax(-1).tolist()  # first real token of each row (0 with right padding)

                # (row, column) of each scored position, the label token read there, and which (text, class) owns it
                rows, cols, targets, owners = [], [], [], []
                for b, i in enumerate(batch):
                    for c, ids_c in enumerate(labels):
                        r = b * len(feeds) + feed_of[c]
                        for j, token in enumerate(ids_c):
                            rows.append(r)
                            cols.append(starts[r] + len(prompts[i]) - 1 + j)
                            targets.append(token)
                            owners.append(b * len(labels) + c)
                flat = torch.tensor(rows) * ids.shape[1] + torch.tensor(cols)
                unique, inverse = torch.unique(flat, return_inverse=True)  # run the head once per position
                h = hidden.reshape(-1, hidden.shape[-1])[unique.to(hidden.device)]
                logp = torch.log_softmax(head(h.to(head.weight.device)).float(), dim=-1).cpu()
                token_logp = logp[inverse, torch.tensor(targets)].double()
                summed = torch.zeros(len(batch) * len(labels), dtype=torch.float64)
                summed.index_add_(0, torch.tensor(owners), token_logp)
                logprobs[batch] = summed.view(len(batch), len(labels)).numpy()
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)

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
