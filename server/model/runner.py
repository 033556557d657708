"""The model runner: the base model's own forward over deltaserve's paged KV cache, for prefill and batched decode.

The runner calls the transformers model itself (its embeddings, decoder layers, norms, rotary embedding with
whatever scaling the config asks for, multipliers and logit softcapping), with per-token `position_ids`, so that
every row has its own cache length and position while rows run together. Only attention is deltaserve's: the
model's attention implementation is switched to deltaserve's function (model/attention.py), which writes each
token's K/V into the paged cache and attends over the row's own entries; the runner builds each forward's
attention context (slots, block tables, masks) once and passes it down as `deltaserve=`. Which models can be
driven this way is decided at start-up by model/support.py.

KV cache: paged (model/kv_cache.py). Each request owns a block table; a forward writes each token's K/V into
its request's blocks and attends over the entries its table reaches. Which blocks a request owns, and which it
shares through the prefix cache, is the engine's business (engine/kv_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deltaserve.adapters import BOTTLENECK_SITES, BaseModelSpec, LinearShape, ModelGeometry
from deltaserve.server.errors import MergeError, ModelLoadError
from deltaserve.server.kernels.paged_attention import (
    DecodeAttention,
    select_decode_attention,
    torch_decode_attention,
    torch_paged_attention,
)
from deltaserve.server.model.attention import (
    ChunkAttention,
    ForwardAttention,
    NewEntries,
    PagedAttention,
    register_attention,
)
from deltaserve.server.model.bottlenecks import BOTTLENECK_HOOK_SITES, BottleneckHooks, bottleneck_refusal
from deltaserve.server.model.kv_cache import NULL_BLOCK, PagedKVCache, blocks_for, bytes_per_block
from deltaserve.server.model.layers import (
    AdapterLinear,
    BottleneckBank,
    ForwardContext,
    LoraBatch,
    SlotBatch,
    wrap_linear_layers,
)
from deltaserve.server.model.support import AttentionLayout, config_refusal, probe_attention
from torch import nn


@dataclass(frozen=True)
class AdapterBatch:
    """The adapter descriptions of one forward: `lora`/`slots` for every token of the body, `head_lora`/
    `head_slots` for the positions the LM head sees (the same in a decode step)."""

    lora: LoraBatch | None = None
    slots: SlotBatch | None = None
    head_lora: LoraBatch | None = None
    head_slots: SlotBatch | None = None


NO_ADAPTERS = AdapterBatch()


@dataclass(frozen=True)
class SoftPrompt:
    """What an adapter puts in front of a row's prompt, on the device: prefix entries written into the KV
    cache before the prompt ([layers, kv_heads, P, head_dim], not rotated) and virtual token embeddings
    ([V, hidden]) prepended to the prompt's embeddings."""

    prefix_keys: torch.Tensor | None = None
    prefix_values: torch.Tensor | None = None
    virtual_tokens: torch.Tensor | None = None

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_keys is None else self.prefix_keys.shape[2]

    @property
    def virtual_length(self) -> int:
        return 0 if self.virtual_tokens is None else self.virtual_tokens.shape[0]


NO_SOFT_PROMPT = SoftPrompt()


@dataclass(frozen=True)
class PrefillChunk:
    """Part (or all) of one request's prompt items for a prefill forward: `token_ids` go to cache positions
    start.. through the block `table`; the first `len(virtual)` items are virtual token embeddings instead
    (their ids are placeholders)."""

    table: list[int]
    start: int
    token_ids: list[int]
    virtual: torch.Tensor | None = None


def _take_over_attention(model: nn.Module, device: torch.device) -> AttentionLayout:
    """Switch the model's attention to deltaserve's function and return the layout its layers showed, or refuse
    the model (ModelLoadError) with the reason it cannot be served (see model/support.py)."""
    architecture = type(model).__name__
    refusal = config_refusal(model.config)
    if refusal is not None:
        raise ModelLoadError(f"{architecture} is not served: {refusal}")
    try:
        model.set_attn_implementation(register_attention())
    except (ValueError, ImportError) as err:
        raise ModelLoadError(
            f"{architecture} is not served: its attention does not go through transformers' AttentionInterface ({err})"
        ) from err
    try:
        return probe_attention(model, device)
    except ModelLoadError as err:
        raise ModelLoadError(f"{architecture} is not served: {err}") from err


def _lm_head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    name = next((name for name, module in model.named_modules() if module is head), None)
    if head is None or name is None:
        raise ModelLoadError(f"{type(model).__name__} is not served: it has no LM head")
    return name


class ModelRunner:
    """Owns the base model (wrapped for adapters, its attention switched to deltaserve's) and the KV cache.
    Used by the engine thread only."""

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        config = model.config
        architecture = type(model).__name__
        layout = _take_over_attention(model, device)
        self.model = model
        self.device = device
        self.dtype = dtype
        head = model.get_output_embeddings()
        self.vocab_size: int = getattr(head, "out_features", None) or config.vocab_size  # the logits' width
        self.context = ForwardContext()  # every token of a forward's body
        self.head_context = ForwardContext()  # the positions the LM head sees
        self.adapter_layers: dict[str, AdapterLinear] = wrap_linear_layers(
            model, self.context, {_lm_head_name(model): self.head_context}
        )
        self.embed_tokens = model.get_input_embeddings()
        self.hidden_size: int = config.hidden_size
        self.num_layers: int = layout.num_layers
        self.num_heads: int = layout.num_heads
        self.num_kv_heads: int = layout.num_kv_heads
        self.head_dim: int = layout.head_dim
        self.cache: PagedKVCache | None = None  # allocate_cache(), once the weights and adapter slots are placed
        self.decode_attention: DecodeAttention = torch_decode_attention
        self._saved_weights: dict[str, torch.Tensor] = {}  # original weights of merged modules
        self.bottleneck_banks = {
            (index, site): BottleneckBank(self.hidden_size)
            for index in range(self.num_layers)
            for site in BOTTLENECK_SITES
        }
        sites = BOTTLENECK_HOOK_SITES.get(config.model_type)
        self._bottleneck_refusal = bottleneck_refusal(config.model_type, architecture)
        self.bottleneck_hooks = (
            None
            if sites is None
            else BottleneckHooks(model.get_decoder().layers, sites, self.bottleneck_banks, self.context)
        )

    # ---- description -----------------------------------------------------------------------------
    def base_spec(self) -> BaseModelSpec:
        """Module names and shapes that adapters are validated against."""
        linear = {
            name: LinearShape(layer.in_features, layer.out_features) for name, layer in self.adapter_layers.items()
        }
        other = frozenset(
            name for name, _ in self.model.named_modules() if name and name not in linear and not name.endswith(".base")
        )
        geometry = ModelGeometry(self.num_layers, self.hidden_size, self.num_kv_heads, self.head_dim)
        return BaseModelSpec(
            linear_layers=linear,
            other_modules=other,
            base_weight=self._base_weight,
            dense_weight=self._dense_weight,
            base_bias=self._base_bias,
            geometry=geometry,
            bottleneck_refusal=self._bottleneck_refusal,
        )

    def _base_weight(self, name: str) -> torch.Tensor | None:
        """The base's own weight (the saved original while an adapter is merged into it)."""
        base = self.adapter_layers[name].base
        quantized = type(base) is not nn.Linear  # bitsandbytes layers hold packed weights
        return None if quantized else self._saved_weights.get(name, base.weight).detach()

    def _dense_weight(self, name: str) -> torch.Tensor:
        """The base weight a layer computes with: dequantized for bitsandbytes 4-bit / 8-bit layers."""
        base = self.adapter_layers[name].base
        if type(base) is nn.Linear:
            return self._saved_weights.get(name, base.weight).detach().float()
        import bitsandbytes.functional as bnbf

        weight = base.weight
        if getattr(weight, "quant_state", None) is not None:  # 4-bit
            return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
        if getattr(weight, "SCB", None) is not None:  # LLM.int8: per-row int8 with absmax scales
            return bnbf.int8_vectorwise_dequant(weight.data, weight.SCB).float()
        raise MergeError(f"cannot read the dense weight of {name} ({type(base).__name__})")

    def _base_bias(self, name: str) -> torch.Tensor | None:
        bias = self.adapter_layers[name].base.bias
        return None if bias is None else bias.detach().float()

    # ---- merging one adapter into the base ---------------------------------------------------------
    def merge_weights(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """W += B_scaled @ A for each module (computed in fp32), keeping the original weights so that
        `restore_weights` puts them back bit for bit. Refuses what cannot be merged exactly."""
        for name in deltas:
            base = self.adapter_layers[name].base
            if type(base) is not nn.Linear:
                raise MergeError(
                    f"{name} is a quantized layer ({type(base).__name__}); merging into it would be lossy, so "
                    "deltaserve refuses it (serve the adapter unmerged)"
                )
            if base.weight.data_ptr() == self.embed_tokens.weight.data_ptr():
                raise MergeError(f"{name} shares its weight with the input embeddings; merging would change both")
        try:
            for name, (lora_a, lora_b_scaled) in deltas.items():
                weight = self.adapter_layers[name].base.weight
                self._saved_weights[name] = weight.detach().clone()
                delta = lora_b_scaled.to(self.device, torch.float32) @ lora_a.to(self.device, torch.float32)
                weight.data.copy_((weight.float() + delta).to(weight.dtype))
        except BaseException:  # e.g. out of memory halfway: never leave a partly merged base behind
            self.restore_weights()
            raise

    def restore_weights(self) -> None:
        """Put back the weights saved by `merge_weights` (an exact copy, not a subtraction)."""
        for name, original in self._saved_weights.items():
            self.adapter_layers[name].base.weight.data.copy_(original)
        self._saved_weights.clear()

    # ---- the KV cache ------------------------------------------------------------------------------
    def allocate_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """Allocate the paged KV cache (after the weights and adapter slots, so its size can be what is left)."""
        self.cache = PagedKVCache(
            self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )
        self.decode_attention = select_decode_attention(self.device, block_size, self.dtype)
        return self.cache

    def block_bytes(self, block_size: int) -> int:
        return bytes_per_block(self.num_layers, block_size, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.bytes

    def zero_blocks(self, blocks: list[int]) -> None:
        self.cache.zero(blocks)

    @torch.inference_mode()
    def write_prefix(self, table: list[int], prompt: SoftPrompt, start: int) -> None:
        """Write a soft prompt's prefix entries from position `start` on (earlier ones came from the prefix
        cache) into the blocks of `table`."""
        count = prompt.prefix_length - start
        if count <= 0:
            return
        slots = torch.tensor(self.cache.slots(table, start, count), device=self.device)
        for layer_idx in range(self.num_layers):
            keys = prompt.prefix_keys[layer_idx, :, start:].transpose(0, 1)  # [count, kv_heads, D]
            values = prompt.prefix_values[layer_idx, :, start:].transpose(0, 1)
            self.cache.write(layer_idx, slots, keys, values)

    # ---- forward passes --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk], batch: AdapterBatch, every_position: bool = False) -> torch.Tensor:
        """Run prompt chunks into their requests' blocks in one forward; return each one's last logits [n, V], or
        with `every_position` the logits of every item [n, T, V] (`batch.head_*` then describe all n*T items).

        A chunk's items go to cache positions start.. (rotary positions equal cache positions); it attends over
        its request's earlier entries (prefix-tuning entries, cached or earlier chunks) and causally over
        itself. Chunks are right-padded to the longest: causal attention never lets a real item see the padding
        after it, and padding is never written to the cache. `batch.lora`/`batch.slots` describe the n*T padded
        items, `batch.head_*` the n last ones.
        """
        device, cache = self.device, self.cache
        lengths = [len(c.token_ids) for c in chunks]
        span = max(lengths)
        ids = torch.tensor(
            [c.token_ids + [0] * (span - n) for c, n in zip(chunks, lengths, strict=True)], device=device
        )
        last = torch.tensor(lengths, device=device)[:, None] - 1  # [n, 1]
        starts = torch.tensor([c.start for c in chunks], device=device)[:, None]
        # Padding items take their row's last position, so that every query has entries it may see (a sliding
        # window past a row's end would leave a padding query with none, and its softmax with NaN).
        positions = starts + torch.minimum(torch.arange(span, device=device)[None], last)  # [n, T]
        entries = NewEntries(
            slots=torch.tensor(
                [s for c, n in zip(chunks, lengths, strict=True) for s in cache.slots(c.table, c.start, n)],
                device=device,
            ),
            rows=torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)], device=device),
            columns=torch.tensor([t for n in lengths for t in range(n)], device=device),
        )
        attention: ForwardAttention
        if not any(c.start for c in chunks):  # nothing before the chunks: attend within them
            attention = ChunkAttention(cache, entries, positions)
        else:
            ends = [c.start + n for c, n in zip(chunks, lengths, strict=True)]  # host ints: no device sync
            tables = self._table_tensor([c.table for c in chunks], blocks_for(max(ends), cache.block_size))
            layer_attention = torch_paged_attention(tables, positions, cache.block_size, cache.gather_buffers)
            attention = PagedAttention(cache, entries, layer_attention)
        keep = 0 if every_position else last  # 0: transformers' "every position"
        if any(c.virtual is not None for c in chunks):
            return self._forward(None, self._embeddings(ids, chunks), positions, attention, batch, keep)
        return self._forward(ids, None, positions, attention, batch, keep)

    def _embeddings(self, ids: torch.Tensor, chunks: list[PrefillChunk]) -> torch.Tensor:
        """The chunks' input embeddings [n, T, H] with virtual tokens in place of their placeholder ids, as PEFT
        builds them: the embedding module's output (Gemma's scaling lives inside it) for the real tokens, the
        saved virtual embeddings as they are; what the model does to `inputs_embeds` (Granite's multiplier)
        then applies to both."""
        embeds = self.embed_tokens(ids)
        for i, chunk in enumerate(chunks):
            if chunk.virtual is not None:
                embeds[i, : chunk.virtual.shape[0]] = chunk.virtual.to(embeds.dtype)
        return embeds

    def _table_tensor(self, tables: list[list[int]], width: int) -> torch.Tensor:
        """Block tables cut or padded (with the null block) to `width` blocks, as one [n, width] tensor."""
        rows = [table[:width] + [NULL_BLOCK] * (width - len(table)) for table in tables]
        return torch.tensor(rows, device=self.device)

    def decode_tables(self, tables: list[list[int]], max_position: int) -> torch.Tensor:
        """The decode step's block tables: enough blocks for every row's next position."""
        return self._table_tensor(tables, blocks_for(max_position + 1, self.cache.block_size))

    @torch.inference_mode()
    def decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, batch: AdapterBatch
    ) -> torch.Tensor:
        """One token for each of B rows; return logits [B, V].

        input_ids [B]; positions [B] (where each row's new token goes = its current cache length); tables
        [B, nb] (`decode_tables`), covering every row's new position.
        """
        block_size = self.cache.block_size
        rows = torch.arange(input_ids.shape[0], device=self.device)
        slots = tables[rows, positions // block_size] * block_size + positions % block_size
        layer_attention = self.decode_attention(tables, positions, block_size, self.cache.gather_buffers)
        attention = PagedAttention(self.cache, NewEntries(slots), layer_attention)
        return self._forward(input_ids[:, None], None, positions[:, None], attention, batch, 1)

    # ---- the model's forward -----------------------------------------------------------------------
    def _forward(
        self,
        ids: torch.Tensor | None,
        embeds: torch.Tensor | None,
        positions: torch.Tensor,
        attention: ForwardAttention,
        batch: AdapterBatch,
        keep: torch.Tensor | int,
    ) -> torch.Tensor:
        """The model's own forward over ids [B, T] (or input embeddings [B, T, H]) at positions [B, T], its LM
        head only at `keep` (each row's position [B, 1], or 1: the final one) -> logits [B, V].

        `batch.lora`/`batch.slots` cover every token, `batch.head_*` the B positions the head sees (the head's
        wrapper reads its own context). The mask and cache are the attention context's business, so the model
        is told to keep no cache of its own."""
        body, head = self.context, self.head_context
        body.lora, body.slots = batch.lora, batch.slots
        head.lora, head.slots = batch.head_lora, batch.head_slots
        if batch.slots is not None and batch.slots.columns is not None and self.bottleneck_hooks is not None:
            self.bottleneck_hooks.install()
        try:
            out = self.model(
                input_ids=ids,
                inputs_embeds=embeds,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=keep,
                deltaserve=attention,
            )
            # Logits in fp32 so that sampling and log-probabilities do not depend on the model dtype.
            return out.logits.float() if isinstance(keep, int) and keep == 0 else out.logits[:, -1].float()
        finally:
            body.lora = body.slots = head.lora = head.slots = None
