"""Whether deltaserve can serve a model, decided by what its code does rather than by a list of names.

deltaserve drives the model's own modules and owns only attention (server/model/attention.py), so a decoder is
served when every layer attends causally through transformers' `AttentionInterface`, with nothing the
attention function ignores, and when a row's computation does not depend on the other rows of its batch. The
checks, each refusing with the reason:
- from the config, before any weight is read (`config_refusal`): encoder-decoder and multimodal models, layer
  types other than full or sliding-window attention (recurrent, state-space, chunked attention), and rotary
  scalings that depend on the longest sequence of the forward;
- from the model (`probe_attention`): one tiny forward through deltaserve's attention function in a recording
  mode, which must see every layer call it once, causally, without a mask of the model's own and without
  keyword arguments it does not implement (attention sinks, say), and with one K/V shape for all layers (the
  paged cache's pools are uniform).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from deltaserve.server.errors import ModelLoadError
from deltaserve.server.kernels.paged_attention import masked_attention
from deltaserve.server.model.attention import ForwardAttention
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import TransformersKwargs

SERVED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
# Rotary scalings whose frequencies depend on the longest position in the forward: a row's result would depend
# on the other rows of its batch.
BATCH_DEPENDENT_ROPE = {
    "dynamic": "rescales its rotary frequencies by the longest sequence in the forward",
    "longrope": "switches between short and long rotary factors by the longest sequence in the forward",
}
# Keywords an attention call may carry that change nothing in what it computes (transformers' pass-through
# kwargs and the cache bookkeeping deltaserve does not use; is_causal is checked on its own).
_NEUTRAL_KEYWORDS = frozenset(TransformersKwargs.__annotations__) | {"use_cache", "cache_position", "is_causal"}
_PROBE_TOKENS = 4


def _rope_settings(config: PretrainedConfig) -> list[dict]:
    """The config's rotary settings: one dict, or one per layer type (Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    nested = [value for value in params.values() if isinstance(value, dict)]
    return nested if nested else [params]


def config_refusal(config: PretrainedConfig) -> str | None:
    """Why a model with this config cannot be served, or None when nothing in the config stands against it."""
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; deltaserve serves decoder-only causal language models"
    text = config.get_text_config(decoder=True)
    if text is not config:
        return (
            f"it is a multimodal model ({type(config).__name__}); deltaserve serves text decoders, so load a "
            "text-only checkpoint of it"
        )
    other_layers = sorted(set(getattr(config, "layer_types", None) or ()) - SERVED_LAYER_TYPES)
    if other_layers:
        return (
            f"it has layers of type {', '.join(other_layers)}; deltaserve serves full and sliding-window attention "
            "layers only (not recurrent, state-space or chunked attention layers)"
        )
    for settings in _rope_settings(config):
        rope_type = settings.get("rope_type", settings.get("type"))
        if rope_type in BATCH_DEPENDENT_ROPE:
            return (
                f"its rope_type {rope_type!r} {BATCH_DEPENDENT_ROPE[rope_type]}, so a row's positions would depend "
                "on the other rows of its batch"
            )
    return None


@dataclass(frozen=True)
class AttentionLayout:
    """The shape every layer's attention has, as the probe saw it (the paged cache is built from it)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class _Call:
    layer: int | None
    causal: bool
    own_mask: bool
    extra: frozenset[str]
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int


class AttentionProbe(ForwardAttention):
    """Records each attention call of one forward and computes plain causal attention, so the forward completes."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []

    def attend(self, module, query, key, value, mask, scaling, window, softcap, extra):
        self.calls.append(
            _Call(
                layer=getattr(module, "layer_idx", None),
                causal=getattr(module, "is_causal", True) is not False and extra.get("is_causal", True) is not False,
                own_mask=mask is not None,
                extra=frozenset(extra) - _NEUTRAL_KEYWORDS,
                heads=query.shape[1],
                kv_heads=key.shape[1],
                head_dim=key.shape[3],
                value_dim=value.shape[3],
            )
        )
        return masked_attention(query, key, value, None, scaling, softcap)


def probe_attention(model: nn.Module, device: torch.device) -> AttentionLayout:
    """Run one tiny forward the way the runner does (the model's attention implementation already set to
    deltaserve's) and return the layout its attention showed; ModelLoadError with the reason when it cannot be
    served."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise ModelLoadError("its forward cannot compute logits at chosen positions only (no logits_to_keep)")
    config = model.config.get_text_config(decoder=True)
    probe = AttentionProbe()
    positions = torch.arange(_PROBE_TOKENS, device=device)[None]
    try:
        with torch.inference_mode():
            model(
                input_ids=positions % config.vocab_size,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
                deltaserve=probe,
            )
    except Exception as err:  # any failure of a foreign forward means the same: it cannot be driven this way
        raise ModelLoadError(f"its forward fails when driven by deltaserve ({type(err).__name__}: {err})") from err
    return _layout(probe.calls, config.num_hidden_layers)


def _layout(calls: list[_Call], num_layers: int) -> AttentionLayout:
    """The checks on the probe's record, in the order a reader would ask them."""
    interface = "transformers' AttentionInterface"
    if not calls:
        raise ModelLoadError(
            f"none of its layers attends through {interface} (recurrent or state-space layers, or attention "
            "computed outside the interface)"
        )
    if any(call.layer is None for call in calls):
        raise ModelLoadError("its attention modules do not say which layer they are (no layer_idx)")
    seen = [call.layer for call in calls]
    missing = sorted(set(range(num_layers)) - set(seen))
    if missing:
        raise ModelLoadError(
            f"its layers {missing} do not attend through {interface} (recurrent or state-space layers, or "
            "attention computed outside the interface)"
        )
    if len(seen) != len(set(seen)) or set(seen) != set(range(num_layers)):
        raise ModelLoadError(f"its layers call attention {len(seen)} times for {num_layers} layers")
    for call in calls:
        if not call.causal:
            raise ModelLoadError(f"layer {call.layer} attends non-causally; deltaserve serves causal decoders")
        if call.own_mask:
            raise ModelLoadError(f"layer {call.layer} attends with a mask the model builds itself")
        if call.extra:
            raise ModelLoadError(
                f"layer {call.layer}'s attention passes {', '.join(sorted(call.extra))}, which deltaserve's "
                "attention function does not implement"
            )
        if call.value_dim != call.head_dim:
            raise ModelLoadError(
                f"layer {call.layer} has {call.head_dim}-wide keys and {call.value_dim}-wide values; the paged "
                "cache holds one head size"
            )
    shapes = {(call.heads, call.kv_heads, call.head_dim) for call in calls}
    if len(shapes) > 1:
        raise ModelLoadError(
            f"its layers differ in attention shape (heads, kv heads, head size: {sorted(shapes)}); the paged "
            "cache's pools are uniform"
        )
    heads, kv_heads, head_dim = shapes.pop()
    return AttentionLayout(num_layers, heads, kv_heads, head_dim)
