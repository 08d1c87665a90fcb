"""Logging for the entry points: our own progress at INFO, known-harmless library noise filtered out.

Each filter below names a message that every run printed and that asks nothing of the user. `--verbose` (every
script) skips them all and logs the libraries at INFO too.
"""

from __future__ import annotations

import logging
import os
import warnings

OWN_LOGGERS = ("sft", "eval", "bench", "__main__")


def setup_logging(verbose: bool = False, main_process: bool = True) -> None:
    """Our loggers at INFO on the main process (WARNING elsewhere); the libraries at WARNING unless verbose."""
    level = logging.INFO if main_process else logging.WARNING
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        quiet_library_noise()


def quiet_library_noise() -> None:
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed warns "Setting accelerator to CPU. If you have GPU ... we were unable to detect it" at import on
        # every machine without CUDA; naming the CPU accelerator is the choice it makes anyway, without the warning.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # bitsandbytes 0.50 looks for optional CPU 4-bit kernels in the `kernels` package at import and warns when it is
    # absent; its built-in CPU kernels are used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # ... and offline (sft.sources goes offline before that import when the hub does not answer), `kernels` first
    # warns that it skips the publisher check of that kernel; none is cached, so the built-in ones are used.
    logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)
    # torch's DataLoader warns that pin_memory has no effect without an accelerator (Trainer's default is True).
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true but no accelerator")
    # transformers 5.24 renamed gradient_checkpointing; TRL 1.16's SFTConfig still sets the old name on every run.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    # ... and PEFT 0.21 still calls model.is_gradient_checkpointing, renamed the same way.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
