"""Where bottleneck adapters hook into a decoder layer: a small table per model family, as AdapterHub's model
mixins have one, and the forward hooks that add each token's adapter output there.

AdapterHub defines a bottleneck adapter on a pre-norm layer whose block maps the residual stream r to h and adds
h to r: the layer adds A(x) to h before the residual add (see deltaserve.adapters.bottleneck). A family's entry
names, per site, the module that first reads r (the block's norm: its input is r) and the block (its output is
h). Families whose layers do something else around their blocks (post-norms in Gemma 2/3 and OLMo 2, Granite's
residual multiplier) have no entry, and bottleneck adapters are refused on them by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deltaserve.adapters import ATTENTION_SITE, OUTPUT_SITE
from deltaserve.server.model.layers import BottleneckBank, ForwardContext
from torch import nn


@dataclass(frozen=True)
class HookSite:
    """One site of a layer: `reads_residual` is the module whose input is r, `block` the one whose output is h."""

    reads_residual: str
    block: str


_PRE_NORM = {
    ATTENTION_SITE: HookSite("input_layernorm", "self_attn"),
    OUTPUT_SITE: HookSite("post_attention_layernorm", "mlp"),
}
# model_type -> site -> HookSite. Each entry was read against the family's decoder layer in transformers:
# r -> norm -> block -> r + h, for attention and then for the feed-forward block (Phi-3's dropouts are identities
# in inference; Mixtral's block is its sparse mixture of experts).
BOTTLENECK_HOOK_SITES: dict[str, dict[str, HookSite]] = {
    family: _PRE_NORM for family in ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral")
}


def bottleneck_refusal(model_type: str, architecture: str) -> str | None:
    """Why bottleneck adapters cannot be served on this family (None: they can)."""
    if model_type in BOTTLENECK_HOOK_SITES:
        return None
    return (
        f"bottleneck adapters are not served on {architecture} (model type {model_type!r}): deltaserve knows where "
        f"they hook in only for {', '.join(sorted(BOTTLENECK_HOOK_SITES))}"
    )


class BottleneckHooks:
    """Forward hooks that add each token's bottleneck delta at every site of every layer.

    They are installed by the first forward that has bottleneck slots (on the engine thread, between forwards),
    so a server that never serves one runs the model's modules without hooks; after that, a forward without
    bottleneck slots costs each hook one check."""

    def __init__(
        self,
        layers: nn.ModuleList,
        sites: dict[str, HookSite],
        banks: dict[tuple[int, str], BottleneckBank],
        context: ForwardContext,
    ) -> None:
        self.layers, self.sites, self.banks, self.context = layers, sites, banks, context
        self.installed = False

    def install(self) -> None:
        if self.installed:
            return
        for index, layer in enumerate(self.layers):
            for site, names in self.sites.items():
                self._hook(layer.get_submodule(names.reads_residual), layer.get_submodule(names.block), index, site)
        self.installed = True

    def _hook(self, reads_residual: nn.Module, block: nn.Module, index: int, site: str) -> None:
        bank, context = self.banks[(index, site)], self.context
        residual: list[torch.Tensor] = []  # the block's input r of the current forward

        def keep_residual(module, args):
            residual[:] = [args[0]] if context.slots is not None else []

        def add_adapter(module, args, output):
            slots = context.slots
            if slots is None or not residual:
                return None
            h = output[0] if isinstance(output, tuple) else output
            delta = bank.delta(h, residual.pop(), slots)
            if delta is None:
                return None
            return (h + delta, *output[1:]) if isinstance(output, tuple) else h + delta

        reads_residual.register_forward_pre_hook(keep_residual)
        block.register_forward_hook(add_adapter)
