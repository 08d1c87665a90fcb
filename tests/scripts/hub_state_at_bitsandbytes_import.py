"""Run an entry point (`python hub_state_at_bitsandbytes_import.py SCRIPT ARGS...`) and print to stderr whether the
process was offline when bitsandbytes was first imported: on a CPU with AVX512-BF16, bitsandbytes asks the hub for
a kernel at import time, and a hub that never answers would hang it (sft.sources.check_hub_before_library_imports)."""

import importlib.abc
import os
import runpy
import sys


class WatchBitsandbytes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes":
            print(f"HF_HUB_OFFLINE at bitsandbytes import: {os.environ.get('HF_HUB_OFFLINE', 'unset')}",
                  file=sys.stderr, flush=True)
            sys.meta_path.remove(self)
        return None  # the normal finders import it


sys.meta_path.insert(0, WatchBitsandbytes())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
