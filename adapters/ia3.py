"""IA3 read from PEFT's format: learned scaling vectors on target layers.

PEFT saves one vector `ia3_l` per target layer: ``[1, in]`` on feed-forward layers, which scale the layer's
input (``y = base(x * l)``), and ``[out, 1]`` elsewhere, which scale its output (``y = base(x) * l``, bias
included). The saved shape says which; it must agree with `feedforward_modules`.
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
from deltaserve.adapters.patterns import PatternBudget, compile_patterns, matches
from deltaserve.adapters.peft_files import PeftFiles, check_vector, group_module_tensors, linear_shape
from deltaserve.adapters.weights import ModuleDelta, ParsedAdapter

_PARTS = frozenset({"ia3_l"})


class _Feedforward:
    """PEFT's rule for feedforward_modules: a regex string must match the whole name; a list entry matches a
    name ending in it. The regex is matched with a time bound (deltaserve.adapters.patterns)."""

    def __init__(self, feedforward: object) -> None:
        self.budget = PatternBudget()
        if isinstance(feedforward, str):
            self.regex, self.names = compile_patterns("feedforward_modules", [feedforward])[0], ()
        elif isinstance(feedforward, list) and all(isinstance(name, str) for name in feedforward):
            self.regex, self.names = None, tuple(feedforward)
        else:
            raise AdapterFormatError("adapter_config.json: feedforward_modules must be a string or a list of names")

    def __call__(self, module: str) -> bool:
        if self.regex is not None:
            return matches(self.regex, module, "feedforward_modules", self.budget, whole=True)
        return any(module.endswith(name) for name in self.names)


def _module_delta(module: str, vector: torch.Tensor, feedforward: _Feedforward, spec: BaseModelSpec) -> ModuleDelta:
    shape = linear_shape(module, spec, "IA3")
    if vector.dim() != 2 or min(vector.shape) != 1:
        raise AdapterFormatError(f"tensor '{module}.ia3_l' has shape {tuple(vector.shape)}; expected a vector")
    expected_ff = feedforward(module)
    if tuple(vector.shape) == (1, shape.in_features) and expected_ff:
        return ModuleDelta(input_scale=check_vector(f"{module}.ia3_l", vector, shape.in_features))
    if tuple(vector.shape) == (shape.out_features, 1) and not expected_ff:
        return ModuleDelta(output_scale=check_vector(f"{module}.ia3_l", vector, shape.out_features))
    expected = (1, shape.in_features) if expected_ff else (shape.out_features, 1)
    raise AdapterMismatchError(
        f"{module}.ia3_l has shape {tuple(vector.shape)}; expected {expected} for a "
        f"{'feed-forward' if expected_ff else 'non-feed-forward'} layer (in={shape.in_features}, "
        f"out={shape.out_features})"
    )


def parse_ia3(files: PeftFiles, spec: BaseModelSpec) -> ParsedAdapter:
    if files.config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"IA3 adapters with fully trained modules (modules_to_save={files.config['modules_to_save']!r}) are not "
            "served: they would replace base weights for every request"
        )
    feedforward = _Feedforward(files.config.get("feedforward_modules") or [])
    grouped = group_module_tensors(files.tensors, _PARTS, {}, "IA3")
    if not grouped:
        raise AdapterFormatError(f"{files.path!r} holds no IA3 vectors")
    modules = {name: _module_delta(name, parts["ia3_l"], feedforward, spec) for name, parts in sorted(grouped.items())}
    return ParsedAdapter(path=files.path, kind=AdapterKind.IA3, modules=modules)
