"""AdaLoRA read from PEFT's format, served as a LoRA of the ranks that survived pruning.

PEFT's SVD form per target layer is ``y = base(x) + B ((A * E) x) * scaling / (ranknum + 1e-5)`` with
``A: [r, in]``, the singular values ``E: [r, 1]``, ``B: [out, r]``, ``scaling = lora_alpha`` (or ``r`` when
alpha is 0) and ``ranknum`` the initial rank ``init_r``, which PEFT keeps when it prunes. The saved file holds
only the surviving ranks (its `rank_pattern` says which), so ``A' = A * E`` and ``B' = B * scaling / (init_r +
1e-5)`` are an ordinary LoRA of those ranks.
"""

from __future__ import annotations

import torch
from deltaserve.adapters.base import AdapterFormatError, AdapterKind, AdapterMismatchError, BaseModelSpec
from deltaserve.adapters.lora import refuse_unsupported_features
from deltaserve.adapters.peft_files import PeftFiles, check_finite, group_module_tensors, linear_shape
from deltaserve.adapters.weights import ModuleDelta, ParsedAdapter

_PARTS = frozenset({"lora_A", "lora_B", "lora_E"})


def _module_delta(module: str, parts: dict[str, torch.Tensor], factor: float, spec: BaseModelSpec) -> ModuleDelta:
    shape = linear_shape(module, spec, "AdaLoRA")
    missing = _PARTS - set(parts)
    if missing:
        raise AdapterFormatError(f"AdaLoRA module {module!r} has no {', '.join(sorted(missing))}")
    lora_a, lora_b, lora_e = parts["lora_A"], parts["lora_B"], parts["lora_E"]
    for which, tensor in parts.items():
        check_finite(f"{module}.{which}", tensor)
    rank = lora_a.shape[0] if lora_a.dim() == 2 else -1
    if (
        tuple(lora_a.shape) != (rank, shape.in_features)
        or tuple(lora_b.shape) != (shape.out_features, rank)
        or lora_e.numel() != rank
    ):
        raise AdapterMismatchError(
            f"{module}: lora_A {tuple(lora_a.shape)}, lora_E {tuple(lora_e.shape)}, lora_B {tuple(lora_b.shape)} do "
            f"not fit the base layer (in={shape.in_features}, out={shape.out_features}) at one rank"
        )
    return ModuleDelta(
        lora_a=(lora_a.float() * lora_e.float().reshape(rank, 1)).contiguous(),
        lora_b_scaled=(lora_b.float() * factor).contiguous(),
    )


def parse_adalora(files: PeftFiles, spec: BaseModelSpec) -> ParsedAdapter:
    config = files.config
    refuse_unsupported_features(config)  # the LoRA options it shares are refused the same way
    try:
        init_r = int(config.get("init_r", 12))
        alpha = float(config.get("lora_alpha", 8))
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"adapter_config.json has a malformed AdaLoRA field: {err}") from None
    if init_r <= 0:
        raise AdapterFormatError("adapter_config.json: AdaLoRA init_r must be positive")
    factor = (alpha if alpha > 0 else float(init_r)) / (init_r + 1e-5)
    grouped = group_module_tensors(files.tensors, _PARTS, {}, "AdaLoRA")
    modules = {
        name: _module_delta(name, parts, factor, spec)
        for name, parts in sorted(grouped.items())
        if parts.get("lora_A") is None or parts["lora_A"].shape[0] > 0  # every rank pruned: nothing left
    }
    if not modules:
        raise AdapterFormatError(f"{files.path!r} holds no AdaLoRA weights")
    return ParsedAdapter(path=files.path, kind=AdapterKind.ADALORA, modules=modules)
