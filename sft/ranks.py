"""Processes: joining a multi-process launch on a CPU-only machine, and scoring rows shared out across ranks.

Training and evaluation both run under `accelerate launch`; this module is where they agree on how the ranks are set
up and how a list of rows is split between them and put back together in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch


def init_cpu_distributed() -> bool:
    """Make a multi-process `accelerate launch` (DDP or DeepSpeed) run real gloo ranks on a CPU-only machine.

    accelerate 1.15 picks the process-group backend from the GPU it finds; with none, `PartialState()` silently
    falls back to one process per rank (each rank then trains alone and all of them write the output). Creating the
    shared state first, on gloo, fixes that; TrainingArguments then reuses it (accelerator_config.
    use_configured_state) and evaluation shards across it. Returns True when it did so; a no-op on GPU machines and
    in single-process runs.
    """
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if not launched or torch.cuda.is_available():
        return False
    from accelerate import PartialState

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        PartialState(backend="gloo")  # DeepSpeed's own init_distributed, on gloo
    else:
        PartialState(cpu=True)  # MULTI_CPU on gloo: DistributedDataParallel over CPU ranks
    return True


def process_state():
    """accelerate's PartialState, joined on gloo first when a CPU-only machine runs several processes."""
    from accelerate import PartialState

    init_cpu_distributed()
    return PartialState()


def distributed_type(state) -> str:
    """'NO', 'MULTI_CPU', 'MULTI_GPU', 'DEEPSPEED', 'FSDP'... (the enum's name, as launch configs spell it)."""
    return str(state.distributed_type).split(".")[-1]


def is_main_rank() -> bool:
    """Before any process group exists (logging setup): the launcher's RANK variable."""
    return os.environ.get("RANK", "0") == "0"


def shard_and_gather(state, n: int, score: Callable[[list[int]], np.ndarray]) -> np.ndarray:
    """score(indices) -> (len(indices), k) on each rank's share of rows 0..n-1; the (n, k) result, in row order, on
    every rank.

    Shares are contiguous and padded to equal size by repeating the last row (accelerate's apply_padding), so every
    rank runs the same number of forward passes — ZeRO-3's forwards are collective — also with fewer rows than
    ranks; the repeated rows are dropped when the pieces are put back together."""
    from accelerate.utils import gather_object

    with state.split_between_processes(list(range(n)), apply_padding=True) as mine:
        rows = np.asarray(score(list(mine)), dtype=float) if mine else np.zeros((0, 0))
        local = [(i, row.tolist()) for i, row in zip(mine, rows, strict=True)]
    by_index = dict(gather_object(local)) if state.num_processes > 1 else dict(local)
    if sorted(by_index) != list(range(n)):
        raise RuntimeError(f"gathered {len(by_index)} distinct rows for {n}: rows were lost between ranks")
    return np.array([by_index[i] for i in range(n)], dtype=float).reshape(n, -1) if n else np.zeros((0, 0))
