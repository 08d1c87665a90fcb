"""TRL's SFTTrainer plus what a classifier needs: label metrics at every evaluation, LM head at label positions only.

Token accuracy is not label accuracy (LLaMA-Factory users were shown 99% token accuracy for 90% real accuracy), so
each evaluation also scores the validation texts with the same label scorer as eval/evaluate.py, sharded across
ranks the same way, and reports `eval_accuracy`, `eval_f1`, `eval_auc` like any other metric: they are logged,
written to the checkpoints' trainer_state.json, and usable as `metric_for_best_model`.

The loss is TRL's (NLL on the completion tokens), but the LM head runs only where a label is predicted. TRL 1.16
compacts to those positions only on Triton devices (`_fused_forward`); elsewhere every position goes through the
head, and with Qwen's 151,936-row vocabulary that head dominates a small model and a short label.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from sft.artifacts import SNAPSHOT_FILE, write_json

logger = logging.getLogger(__name__)


class ClassificationSFTTrainer(SFTTrainer):
    def __init__(self, *args, template=None, dev_split=None, dev_batch_size: int | None = None,
                 label_position_loss: bool = True, snapshot: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_position_loss = label_position_loss
        self.template = template
        self.dev_split = dev_split  # datasets.Dataset with text/label, or None to skip label metrics
        self.dev_batch_size = dev_batch_size or self.args.per_device_eval_batch_size
        self.snapshot = snapshot  # sft.artifacts.make_snapshot: written into every checkpoint
        self.step_counter = StepCounter()
        self.add_callback(self.step_counter)

    def _save_checkpoint(self, model, trial) -> None:
        """Every checkpoint-N/ carries the run snapshot, written before trainer_state.json (which makes a checkpoint
        complete), so a checkpoint copied elsewhere and resumed is still checked against the recipe."""
        if self.snapshot is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / SNAPSHOT_FILE, self.snapshot)
        super()._save_checkpoint(model, trial)

    def label_metrics(self) -> dict[str, float]:
        return dev_label_metrics(self.accelerator.state, self.model, self.processing_class, self.template,
                                 self.dev_split, self.dev_batch_size, progress=self.is_local_process_zero())

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.dev_split is not None and self.template is not None:
            for key, value in self.label_metrics().items():
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain_nll = self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
        if not (self.label_position_loss and plain_nll) or return_outputs or self.aux_loss_enabled:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs = left_align(inputs)
        labels = inputs["labels"][:, 1:]  # the token predicted at position p is labels[p + 1]
        positions = (labels != -100).any(dim=0).nonzero().flatten()
        if positions.numel() == 0:
            positions = positions.new_zeros(1)  # a batch without labels still yields a differentiable zero
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=positions)
        logits = outputs.logits.float()  # (batch, len(positions), vocab)
        targets = labels[:, positions]
        valid = targets != -100
        log_probs = logits.log_softmax(-1)
        token_log_probs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        num_tokens = valid.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -(token_log_probs * valid).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        # The same metrics TRL logs, computed at the label positions.
        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(valid.sum()).sum()
            correct = gather(((logits.argmax(-1) == targets) & valid).sum()).sum()
            entropy = gather((-(log_probs.exp() * log_probs).sum(-1) * valid).sum()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
            self._metrics[mode]["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
            if mode == "train":
                if "attention_mask" in inputs:
                    local = inputs["attention_mask"].sum()
                else:
                    local = torch.tensor(inputs["position_ids"].size(1), device=labels.device)
                self._total_train_tokens += gather(local).sum().item() // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss


def dev_label_metrics(state, model, tokenizer, template, split, batch_size: int, progress: bool = False) -> dict:
    """Accuracy, macro F1, AUC and label mass of the label scorer on a text/label split. Each rank scores its share
    (shard_and_gather: equal shares, so ZeRO-3's collective forwards line up); the figures are those of one
    process scoring everything."""
    from sft.metrics import classification_metrics
    from sft.ranks import shard_and_gather
    from sft.scoring import Scores, score_texts

    texts = list(split["text"])

    def score(rows: list[int]):
        return score_texts(model, tokenizer, template, [texts[i] for i in rows], batch_size=batch_size,
                           progress=progress).logprobs

    scores = Scores(tuple(template.verbalizers), shard_and_gather(state, len(texts), score))
    metrics = classification_metrics(list(split["label"]), scores.probs, list(template.verbalizers))
    return {"accuracy": metrics["accuracy"], "f1": metrics["f1"], "auc": metrics["auc"],
            "label_mass": float(scores.label_mass.mean())}


def left_align(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded batch -> the same rows left-padded, with explicit position_ids.

    The LM head runs at the union of the rows' label positions (`logits_to_keep` takes one index list for the whole
    batch). Right-padded, every row's label sits at a different column, so a batch of 32 ran the head at up to 96
    positions per row; left-aligned, all labels end at the last column and the union is the 3 label positions.
    position_ids restart at each row's first real token, so the logits are those of the right-padded batch.
    Padding-free batches (no attention_mask) and batches without right padding pass through unchanged."""
    mask = inputs.get("attention_mask")
    if mask is None or "position_ids" in inputs or bool(mask[:, -1].all()):
        return inputs
    width = mask.size(1)
    pads = width - mask.sum(dim=1, keepdim=True)  # right padding of each row (real tokens come first)
    index = (torch.arange(width, device=mask.device).unsqueeze(0) - pads) % width
    aligned = {k: (v.gather(1, index) if torch.is_tensor(v) and v.shape == mask.shape else v)
               for k, v in inputs.items()}
    aligned["position_ids"] = (aligned["attention_mask"].long().cumsum(1) - 1).clamp(min=0)
    return aligned


def disable_bnb_cpu_repack(model) -> int:
    """bitsandbytes 0.50 on CPU repacks 4-bit weights during an inference forward pass (for its AVX512-bf16
    kernel); the next training step then fails with "a view of a leaf Variable that requires grad is being used in
    an in-place operation". Turning that path off on every Linear4bit keeps train -> eval -> train working.
    Returns the number of layers changed (0 on GPU or for unquantized models)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


class StepCounter(TrainerCallback):
    """Optimizer steps run by this process: a resumed run must run only the remaining ones, a restart all of them
    (recorded as RunInfo.steps_run)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class PreemptionCallback(TrainerCallback):
    """SIGTERM (what SLURM and Kubernetes send before killing a job) or Ctrl-C: finish the current optimizer step,
    save a checkpoint, stop. A second Ctrl-C interrupts at once. train.py then exits non-zero with a resume hint.

    Ranks agree through an all-reduce of the flag, so a signal that reached one rank stops all of them at the same
    step (a checkpoint save is collective under DeepSpeed and FSDP)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received %s: saving a checkpoint at the end of this step, then stopping",
                       signal.Signals(signum).name)

    def _any_rank_received(self, args) -> bool:
        flag = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = args.device if torch.distributed.get_backend() == "nccl" else "cpu"
            tensor = torch.tensor([int(flag)], device=device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = bool(tensor.item())
            if flag and self.received is None:
                self.received = signal.SIGTERM
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            control.should_save = True
            control.should_training_stop = True
        return control

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
