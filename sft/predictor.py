"""SentimentPredictor: load a training output once, classify texts many times (the Python API of prediction).

eval/predict.py (command line) and merge.py's verification use it; probabilities come from the same label scorer
as evaluation (sft/scoring.py), renormalised over the labels, and temperature-scaled when the training output holds
a calibration.json (written by `eval/evaluate.py --calibrate`).
"""

from __future__ import annotations

import dataclasses
import logging

from sft.artifacts import CALIBRATION_FILE, read_temperature
from sft.scoring import ZERO_SHOT_MAX_LENGTH, score_texts

logger = logging.getLogger(__name__)

DEMO_TEXTS = (
    "房间很干净，服务员态度热情，早餐也很丰富，下次还会再来。",
    "等了一个多小时才上菜，味道一般，价格还贵，不会再来了。",
    "这本书内容充实，翻译流畅，值得一读。",
    "电脑用了三天就黑屏，客服推来推去，非常失望。",
    "物流很快，包装完好，性价比不错。",
)


class SentimentPredictor:
    """Load once, predict many. `lora_path` is a training output directory (LoRA adapter or full model);
    `base_model_name` overrides the base recorded there; with `lora_path=None` the base is scored zero-shot.
    `temperature` divides the label log-probs before the softmax; None: the one in `lora_path/calibration.json`,
    else 1 (raw). The predicted label is the same at any temperature."""

    def __init__(
        self,
        base_model_name: str | None = None,
        lora_path: str | None = None,
        device=None,
        dtype="auto",
        batch_size: int = 16,
        temperature: float | None = None,
    ):
        from sft.model import load_for_inference

        if lora_path is None and base_model_name is None:
            raise ValueError("give lora_path (a training output directory) and/or base_model_name")
        recorded = read_temperature(lora_path) if lora_path is not None else None  # a broken file fails before loading
        self.temperature = float(temperature if temperature is not None else recorded or 1.0)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if temperature is None and recorded is not None:
            logger.info("probabilities calibrated with temperature %.4g from %s/%s", recorded, lora_path,
                        CALIBRATION_FILE)
        self.model, self.tokenizer, self.template = load_for_inference(lora_path, base_model_name, dtype, device)
        if lora_path is None:
            self.template = dataclasses.replace(self.template, max_length=ZERO_SHOT_MAX_LENGTH)
        self.batch_size = batch_size

    @property
    def labels(self) -> tuple[str, ...]:
        return self.template.verbalizers

    def predict(self, text: str) -> dict:
        return self.predict_batch([text])[0]

    def predict_batch(self, texts: list[str], progress: bool = False) -> list[dict]:
        """One {"label", "label_id", "probs"} per text, in input order."""
        scores = score_texts(self.model, self.tokenizer, self.template, list(texts), batch_size=self.batch_size,
                             progress=progress)
        scores = dataclasses.replace(scores, temperature=self.temperature)
        return [{k: v for k, v in scores.row(i).items() if k != "label_mass"} for i in range(len(scores))]
