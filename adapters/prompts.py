"""Soft prompts read from PEFT's format: prefix tuning (and P-tuning v2), prompt tuning and P-tuning.

All three save one tensor, `prompt_embeddings`, already passed through any reparameterisation (prefix
projection MLP, P-tuning's MLP/LSTM encoder), which is what PEFT itself uses in inference mode.

- Prefix tuning: ``[P, layers * 2 * kv_heads * head_dim]``. Viewed as ``[P, 2 * layers, kv_heads, head_dim]``,
  entry ``2l`` is layer l's keys and ``2l + 1`` its values. PEFT puts them in the KV cache before the prompt, as
  they are (no rotary embedding), and the prompt's positions start at P.
- Prompt tuning / P-tuning: ``[P, hidden]`` virtual token embeddings prepended to the prompt's embeddings; the
  virtual tokens take positions 0..P-1 and the prompt starts at P.
"""

from __future__ import annotations

import torch
from deltaserve.adapters.base import (
    AdapterFormatError,
    AdapterKind,
    AdapterMismatchError,
    BaseModelSpec,
    UnsupportedAdapterError,
)
from deltaserve.adapters.peft_files import PeftFiles, check_finite
from deltaserve.adapters.weights import ParsedAdapter, Prefix

_KEY = "prompt_embeddings"


def _embeddings(files: PeftFiles, spec: BaseModelSpec) -> tuple[torch.Tensor, int]:
    """The saved prompt_embeddings and num_virtual_tokens, checked against each other."""
    extra = sorted(set(files.tensors) - {_KEY})
    if extra:
        raise AdapterFormatError(f"unexpected tensor {extra[0]!r} in a {files.peft_type} adapter's weights")
    if _KEY not in files.tensors:
        raise AdapterFormatError(f"{files.path!r} has no {_KEY!r} tensor")
    if spec.geometry is None:
        raise UnsupportedAdapterError(f"{files.peft_type} needs the model's geometry, which this server lacks")
    try:
        submodules = int(files.config.get("num_transformer_submodules") or 1)
    except (TypeError, ValueError, OverflowError):
        raise AdapterFormatError("adapter_config.json: num_transformer_submodules must be an integer") from None
    if submodules != 1:
        raise UnsupportedAdapterError("soft prompts for encoder-decoder models are not served")
    embeddings = files.tensors[_KEY]
    try:
        count = int(files.config.get("num_virtual_tokens", 0))
    except (TypeError, ValueError, OverflowError):
        raise AdapterFormatError("adapter_config.json: num_virtual_tokens must be an integer") from None
    if count <= 0:
        raise AdapterFormatError("adapter_config.json: num_virtual_tokens must be positive")
    if embeddings.dim() != 2 or embeddings.shape[0] != count or not embeddings.is_floating_point():
        raise AdapterFormatError(
            f"tensor {_KEY!r} has shape {tuple(embeddings.shape)}; expected {count} rows (num_virtual_tokens)"
        )
    check_finite(_KEY, embeddings)
    return embeddings.to(torch.float32), count


def parse_prefix_tuning(files: PeftFiles, spec: BaseModelSpec) -> ParsedAdapter:
    embeddings, count = _embeddings(files, spec)
    geometry = spec.geometry
    width = geometry.num_layers * 2 * geometry.num_kv_heads * geometry.head_dim
    if embeddings.shape[1] != width:
        raise AdapterMismatchError(
            f"tensor {_KEY!r} has {embeddings.shape[1]} columns; this base model needs layers*2*kv_heads*head_dim = "
            f"{geometry.num_layers}*2*{geometry.num_kv_heads}*{geometry.head_dim} = {width}"
        )
    # [P, 2L, Hkv, D] -> [2L, Hkv, P, D]; even entries are keys, odd are values.
    entries = embeddings.view(count, 2 * geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    entries = entries.permute(1, 2, 0, 3)
    prefix = Prefix(keys=entries[0::2].contiguous(), values=entries[1::2].contiguous())
    return ParsedAdapter(path=files.path, kind=AdapterKind.PREFIX_TUNING, prefix=prefix)


def parse_prompt_tuning(files: PeftFiles, spec: BaseModelSpec) -> ParsedAdapter:
    """Prompt tuning and P-tuning: both serve saved virtual token embeddings."""
    embeddings, _ = _embeddings(files, spec)
    hidden = spec.geometry.hidden_size
    if embeddings.shape[1] != hidden:
        raise AdapterMismatchError(
            f"tensor {_KEY!r} has {embeddings.shape[1]} columns; the base model's hidden size is {hidden}"
        )
    kind = AdapterKind.P_TUNING if files.peft_type == "P_TUNING" else AdapterKind.PROMPT_TUNING
    return ParsedAdapter(path=files.path, kind=kind, virtual_tokens=embeddings.contiguous())
