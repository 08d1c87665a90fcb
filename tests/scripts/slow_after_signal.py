"""Run sft/train.py, except that once a stop signal has arrived, the current optimizer step takes a minute to end
(as a long step on a large model does). A second Ctrl-C must then stop the run at once, not after the step.

    python tests/scripts/slow_after_signal.py recipes/demo.yaml --key value ...
"""

import sys
import threading
import time

from transformers import TrainerCallback

import sft.trainer
from sft.train import main

signalled = threading.Event()
handle = sft.trainer.PreemptionCallback._handle


def noting_handle(self, signum, frame):
    signalled.set()
    handle(self, signum, frame)


class SlowStepEndAfterSignal(TrainerCallback):
    """Runs before PreemptionCallback (added first), so the step whose checkpoint the signal asked for never ends."""

    def on_step_end(self, args, state, control, **kwargs):
        if signalled.is_set():
            time.sleep(60)


init = sft.trainer.ClassificationSFTTrainer.__init__


def slow_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.add_callback(SlowStepEndAfterSignal())


sft.trainer.PreemptionCallback._handle = noting_handle
sft.trainer.ClassificationSFTTrainer.__init__ = slow_init
sys.exit(main(sys.argv[1:]))
