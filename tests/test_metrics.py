"""sft/metrics.py plots (drawn by scikit-learn's displays): valid PNGs, degenerate inputs, and a reliability plot that
shows the difference between calibrated and over-confident probabilities."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from sft import metrics as M

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def binary():
    """400 rows whose top class is right 75% of the time: once with confidence 0.75 (calibrated), once with 0.99."""
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 400)
    right = rng.random(400) < 0.75
    top = np.where(right, gold, 1 - gold)

    def probs(confidence: float) -> np.ndarray:
        out = np.full((400, 2), 1 - confidence)
        out[np.arange(400), top] = confidence
        return out

    return gold, probs(0.75), probs(0.99)


def test_plots_are_png_files(tmp_path, binary):
    gold, calibrated, _ = binary
    paths = [
        M.plot_roc(gold, {"model": calibrated, "baseline": calibrated[::-1]}, tmp_path / "roc.png"),
        M.plot_confusion([[150, 50], [50, 150]], ["负面", "正面"], tmp_path / "confusion.png"),
        M.plot_confusion([[3, 0, 1], [0, 2, 0], [1, 0, 4]], ["a", "b", "c"], tmp_path / "confusion3.png"),
        M.plot_reliability(gold, calibrated, tmp_path / "reliability.png"),
    ]
    for path in paths:
        assert isinstance(path, Path) and path.parent == tmp_path
        width, height = png_size(path)
        assert width > 300 and height > 300 and path.stat().st_size > 5000, path
    assert not list(tmp_path.glob("*.tmp"))


def test_reliability_shows_over_confidence(tmp_path, binary):
    gold, calibrated, confident = binary
    assert M.expected_calibration_error(gold, calibrated) < 0.05 < 0.2 < M.expected_calibration_error(gold, confident)
    a = M.plot_reliability(gold, calibrated, tmp_path / "calibrated.png")
    b = M.plot_reliability(gold, confident, tmp_path / "confident.png")
    assert png_size(a) == png_size(b) and a.read_bytes() != b.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the title's arrow must be in the font
        both = M.plot_reliability(gold, confident, tmp_path / "both.png", calibrated=calibrated)  # --calibrate
        same = M.plot_reliability(gold, confident, tmp_path / "same.png", calibrated=confident)
    assert png_size(both) == png_size(b) and both.read_bytes() != same.read_bytes()  # the second curve is drawn


def test_degenerate_inputs_still_draw(tmp_path):
    """No rows, or one class only: ROC and reliability still write a (nearly empty) figure instead of failing."""
    probs = np.array([[0.2, 0.8], [0.4, 0.6]])
    M.plot_roc([1, 1], {"model": probs}, tmp_path / "roc_one_class.png")  # a ROC curve needs both classes
    M.plot_roc([], {"model": np.zeros((0, 2))}, tmp_path / "roc_empty.png")
    M.plot_reliability([], np.zeros((0, 2)), tmp_path / "reliability_empty.png")
    M.plot_reliability([1, 1], probs, tmp_path / "reliability_all_right.png")
    M.plot_confusion([[0, 0], [0, 0]], ["负面", "正面"], tmp_path / "confusion_empty.png")
    for path in tmp_path.iterdir():
        png_size(path)
