"""The no-model-loaded guard of the bad-input tests: an early check must fail before any model weights load.

In-process, tests/test_bad_inputs.py's `no_model_loads` fixture installs it with a failing `on_load`. Around a real
command it is a wrapper that runs the script exactly as `python SCRIPT ARGS...` would:

    python tests/model_guard.py sft/train.py recipes/demo.yaml --data_dir nowhere

and a model load ends that process at once with exit code 97 (MODEL_LOADED_EXIT) and a `model_guard:` line.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Callable

MODEL_LOADED_EXIT = 97


def forbid_model_loads(set_attribute: Callable, on_load: Callable[[str], None]) -> None:
    """Replace `sft.model.load_model` (every script's one way to load weights) by a call to `on_load(message)`.
    `set_attribute` is `setattr` or pytest's `monkeypatch.setattr`."""
    import sft.model

    def refuse(name_or_path, **kwargs):
        on_load(f"model weights were loaded from {name_or_path} before the error")

    set_attribute(sft.model, "load_model", refuse)


def _exit(message: str) -> None:
    print(f"model_guard: {message}", file=sys.stderr, flush=True)
    os._exit(MODEL_LOADED_EXIT)  # not an exception: the script's own error handling must not turn it into exit 2


if __name__ == "__main__":
    script, *arguments = sys.argv[1:]
    forbid_model_loads(setattr, _exit)
    sys.argv = [script, *arguments]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` sets it
    runpy.run_path(script, run_name="__main__")
