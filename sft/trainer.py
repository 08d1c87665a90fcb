"""TRL's SFTTrainer plus what a classifier needs: label metrics on the dev split at every evaluation.

Token accuracy is not label accuracy (LLaMA-Factory users were shown 99% token accuracy for 90% real accuracy), so
each evaluation also scores the validation texts with the same label scorer as eval/evaluate.py and reports
`eval_accuracy`, `eval_f1`, `eval_auc` like any other metric: they are logged, written to the checkpoints'
trainer_state.json, and usable as `metric_for_best_model`.
"""

from __future__ import annotations

import logging

from trl import SFTTrainer

logger = logging.getLogger(__name__)


class ClassificationSFTTrainer(SFTTrainer):
    def __init__(self, *args, template=None, dev_split=None, dev_batch_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.template = template
        self.dev_split = dev_split  # datasets.Dataset with text/label, or None to skip label metrics
        self.dev_batch_size = dev_batch_size or self.args.per_device_eval_batch_size

    def label_metrics(self) -> dict[str, float]:
        """Score the dev split with the label scorer. Every rank scores the whole split: the numbers are identical
        on all ranks and ZeRO-3, whose forward passes are collective, never sees ranks with different batch counts."""
        from eval.metrics import classification_metrics
        from eval.scoring import score_texts

        scores = score_texts(
            self.model,
            self.processing_class,
            self.template,
            list(self.dev_split["text"]),
            batch_size=self.dev_batch_size,
            progress=self.is_local_process_zero(),
        )
        metrics = classification_metrics(list(self.dev_split["label"]), scores.probs, list(self.template.verbalizers))
        return {
            "accuracy": metrics["accuracy"],
            "f1": metrics["f1"],
            "auc": metrics["auc"],
            "label_mass": float(scores.label_mass.mean()),
        }

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.dev_split is not None and self.template is not None:
            for key, value in self.label_metrics().items():
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output


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
