"""Model and tokenizer loading for training and inference: dtype, attention, 4-bit, device map, pad token.

Everything that decides *how* weights are loaded lives here, so training, evaluation, prediction and merging
load a base model the same way. The recipe keys are TRL's `ModelConfig` fields; the LoRA config comes straight
from TRL's `get_peft_config`, the 4-bit config from `get_quantization_config` plus the two fixes it lacks (compute
dtype "auto" and the storage dtype FSDP/ZeRO-3 need).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Qwen pads with <|endoftext|>. Padding with the eos <|im_end|> would mask the real end-of-turn out of the loss.
QWEN_PAD_TOKEN = "<|endoftext|>"


class ModelLoadError(ValueError):
    """A model, tokenizer or adapter that cannot be used as asked; one line naming the path."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_local_path(name_or_path: str, what: str = "model") -> None:
    """A path that looks local but is missing would otherwise be sent to the hub as a repo id."""
    from sft.sources import looks_local

    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"{name_or_path}: {what} path does not exist")


def from_pretrained(loader, name_or_path: str, **kwargs):
    """`loader.from_pretrained` whose hub/offline failure for a name that is not a local path says so in one line
    (a relative path like outputs/my-model is also a valid-looking hub id)."""
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        if Path(name_or_path).expanduser().exists():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{name_or_path}: no such local directory, and the hub could not provide it "
                                f"({first})") from None


@dataclass
class LoadingArguments:
    """Model options TRL's ModelConfig does not have."""

    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside model_name_or_path; dequantized once into a cached "
                                           "safetensors folder that Trainer can train (sft/sources.py)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer path or id when it differs from model_name_or_path."}
    )
    lora_layers_to_transform: list[int] | None = field(
        default=None,
        metadata={"help": "Decoder layers that get LoRA (PEFT layers_to_transform), e.g. the top ones: backward "
                          "stops at the lowest adapted layer, so fewer layers means cheaper steps. Default: all."},
    )


def lora_config(model_args, loading: LoadingArguments, num_hidden_layers: int):
    """TRL's `get_peft_config` plus `layers_to_transform`; None for full fine-tuning.

    Layer indices outside the model are an error: PEFT would silently adapt only the ones that exist."""
    from trl import get_peft_config

    config = get_peft_config(model_args)
    layers = loading.lora_layers_to_transform
    if config is None or layers is None:
        return config
    bad = [i for i in layers if not 0 <= i < num_hidden_layers]
    if bad or not layers:
        raise ModelLoadError(f"lora_layers_to_transform: {bad or layers} not in 0..{num_hidden_layers - 1} "
                             f"({model_args.model_name_or_path} has {num_hidden_layers} layers)")
    config.layers_to_transform = sorted(set(layers))
    return config


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'auto' (or None) -> bf16 on a GPU that supports it, fp32 otherwise (CPU fp16/bf16 training is slow or lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """x86 AVX512-BF16 / AMX-BF16 or Arm's BF16 extension. Without them, CPU bf16 autocast is emulated: on an AVX2
    machine the first SmolLM2 LoRA step took 400 s against about 100 s in fp32 (benchmarks 4c). Unknown -> True."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return True
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", cpuinfo) is not None


def resolve_attn_implementation(requested: str | None) -> str:
    """sdpa by default; flash_attention_2 only when the package is installed (else warn and fall back)."""
    if requested in (None, "auto"):
        return "sdpa"
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        logger.warning("attn_implementation=flash_attention_2 but flash-attn is not installed: using sdpa")
        return "sdpa"
    return requested


def quantization_config(model_args, distributed_type: str = "NO"):
    """TRL's BitsAndBytesConfig with a concrete compute dtype; the storage dtype must match the compute dtype
    under FSDP / ZeRO-3 so the sharded flat parameters have one dtype."""
    from trl import get_quantization_config

    config = get_quantization_config(model_args)
    if config is None or not config.load_in_4bit:
        return config
    compute = resolve_dtype(model_args.dtype)
    config.bnb_4bit_compute_dtype = compute
    if model_args.bnb_4bit_quant_storage is None and distributed_type in ("FSDP", "DEEPSPEED"):
        config.bnb_4bit_quant_storage = compute
    return config


def device_map_for(quantized: bool, distributed_type: str, local_process_index: int, cuda: bool) -> dict | None:
    """Only a quantized model needs a device map (bitsandbytes quantizes on load, onto one device per process).
    FSDP and DeepSpeed place parameters themselves, and on CPU there is nothing to place."""
    if not quantized or not cuda or distributed_type in ("FSDP", "DEEPSPEED"):
        return None
    return {"": local_process_index}


def load_tokenizer(name_or_path: str, revision: str = "main", trust_remote_code: bool = False):
    """Load a tokenizer and make sure pad != eos (Qwen: pad <|endoftext|>, eos <|im_end|>)."""
    from transformers import AutoTokenizer

    check_local_path(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{name_or_path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                "incomplete download?")
    tokenizer = from_pretrained(AutoTokenizer, name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if QWEN_PAD_TOKEN in tokenizer.get_vocab() and tokenizer.eos_token != QWEN_PAD_TOKEN:
            tokenizer.pad_token = QWEN_PAD_TOKEN
        elif tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ModelLoadError(
                f"{name_or_path}: the tokenizer has no pad token distinct from eos {tokenizer.eos_token!r}; "
                "padding with eos would mask the end-of-turn token out of the loss"
            )
    return tokenizer


def ensure_chat_template(tokenizer, name_or_path: str, chat_template_path: str | None = None) -> None:
    """The prompt is a chat, so the tokenizer needs a chat template: take `chat_template_path` (a .jinja file, as
    TRL's SFTConfig does) or fail with one line instead of deep inside apply_chat_template."""
    from sft.template import TemplateError

    if chat_template_path and chat_template_path.endswith((".jinja", ".j2")):
        path = Path(chat_template_path)
        if not path.is_file():
            raise FileNotFoundError(f"{chat_template_path}: chat_template_path does not exist")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"{name_or_path}: the tokenizer has no chat template; set chat_template_path to a .jinja "
                         "file (e.g. trl/chat_templates/qwen2_5.jinja)")


def model_init_kwargs(
    model_args,
    trust_remote_code: bool = False,
    distributed_type: str = "NO",
    local_process_index: int = 0,
) -> dict:
    """Keyword arguments for `AutoModelForCausalLM.from_pretrained`, from the recipe's model keys (a GGUF base is
    already a plain safetensors folder here: sft.sources dequantized it)."""
    quant = quantization_config(model_args, distributed_type)
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": resolve_attn_implementation(model_args.attn_implementation),
        "dtype": resolve_dtype(model_args.dtype),
        "use_safetensors": True,
        "device_map": device_map_for(
            quant is not None, distributed_type, local_process_index, torch.cuda.is_available()
        ),
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


def load_model(name_or_path: str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` with a clear error for a missing local path."""
    from transformers import AutoModelForCausalLM

    check_local_path(name_or_path)
    return from_pretrained(AutoModelForCausalLM, name_or_path, **kwargs)


# ----- inference: the output directory of a training run is all a user needs ------------------------------------
def check_base_matches(adapter_dir: str | Path, run_info, base: str, base_config) -> None:
    """An adapter applied to another architecture or vocabulary fails deep inside PEFT or, worse, loads and is wrong."""
    from sft.artifacts import base_signature

    expected = run_info.base_signature or {}
    found = base_signature(base_config)
    diffs = [f"{k}: adapter {expected[k]} vs base {found[k]}" for k in expected if expected[k] != found.get(k)]
    if diffs:
        raise ModelLoadError(
            f"{adapter_dir}: adapter was trained on {run_info.base_model!r}, which does not match --base "
            f"{base!r} ({'; '.join(diffs)})"
        )
    if base != run_info.base_model:
        logger.warning("applying %s (trained on %s) to %s: same architecture", adapter_dir, run_info.base_model, base)


def load_for_inference(
    adapter_dir: str | None,
    base: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """Return (model, tokenizer, template) ready for scoring, in eval mode.

    `adapter_dir` is a training output (LoRA adapter or full model) and supplies the base model, tokenizer and
    prompt template; `adapter_dir=None` scores `base` zero-shot with the default template. A QLoRA adapter is
    applied to the base loaded unquantised in `dtype`.
    """
    from sft.artifacts import RunInfo, is_adapter
    from sft.sources import resolve_model
    from sft.template import PromptTemplate

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    common = {"trust_remote_code": trust_remote_code, "dtype": resolve_dtype(dtype), "use_safetensors": True}
    if adapter_dir is None:
        if base is None:
            raise ValueError("zero-shot scoring (--adapter none) needs --base MODEL")
        folder = resolve_model(base)
        model, tokenizer = load_model(folder, **common), load_tokenizer(folder, **_trc(common))
        template = PromptTemplate()
    else:
        run_info = RunInfo.load(adapter_dir)
        template = PromptTemplate.load(adapter_dir)
        tokenizer = load_tokenizer(adapter_dir, **_trc(common))
        if is_adapter(adapter_dir):
            model = load_adapter(adapter_dir, run_info, base, common)
        else:  # full fine-tune or merged: the directory is a complete model
            model = load_model(str(adapter_dir), **common)
    return model.to(device).eval(), tokenizer, template


def _trc(common: dict) -> dict:
    return {"trust_remote_code": common["trust_remote_code"]}


def load_adapter(adapter_dir: str, run_info, base: str | None, common: dict):
    """The base (recorded in run_info.json unless `base` overrides it), checked against the adapter's signature,
    with the LoRA adapter applied."""
    from peft import PeftModel
    from transformers import AutoConfig

    from sft.sources import recorded_base, resolve_model

    recorded = base is None
    base = base or recorded_base(run_info, adapter_dir)
    folder = resolve_model(base, run_info.gguf_file if recorded else None, Path(adapter_dir))
    config = from_pretrained(AutoConfig, folder, **_trc(common))
    check_base_matches(adapter_dir, run_info, run_info.base_model if recorded else base, config)
    try:
        return PeftModel.from_pretrained(load_model(folder, **common), adapter_dir)
    except RuntimeError as e:  # weights of another shape: PEFT's multi-line size-mismatch report
        if "size mismatch" not in str(e):
            raise
        detail = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)
        raise ModelLoadError(f"{adapter_dir}: adapter does not fit base {base!r} ({detail})") from None
