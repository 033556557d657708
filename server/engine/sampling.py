"""Sampling parameters and the per-step sampler.

Processing order follows transformers' `generate`: repetition penalty, the min-new-tokens EOS mask, then
temperature, top-k and top-p, then argmax (greedy) or a draw from the request's own seeded generator, so
a request's tokens never depend on the other rows of its batch. Log-probabilities are those of the raw
model logits (log-softmax before any processing), like `output_logits` in transformers.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

import torch


class TokenConstraint(Protocol):
    """A request's constraint on its next tokens, such as a grammar matcher (xgrammar's `GrammarMatcher` has
    exactly this shape). The sampler asks it for the allowed tokens before choosing; the engine tells it the
    chosen token after. It lives with the request (a preempted request keeps it), so its state is always that
    of the tokens generated so far."""

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> object:
        """Write row `index` of an int32 bitmask [B, ceil(V / 32)]: bit j of word w set = token 32w + j allowed."""

    def accept_token(self, token_id: int) -> bool:
        """Advance past the chosen token; False if the constraint does not allow it."""

    def is_terminated(self) -> bool:
        """The constraint is complete (it accepted an end-of-sequence token)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RowState:
    """What the sampler needs to know about one running request."""

    params: SamplingParams
    generator: torch.Generator | None
    seen_tokens: list[int]  # prompt + generated so far, for the repetition penalty
    generated: int
    constraint: TokenConstraint | None = None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def _process_row(logits: torch.Tensor, row: RowState) -> torch.Tensor:
    """Apply one request's repetition penalty and sampling warpers to its [V] logits (in place when greedy)."""
    params = row.params
    if params.repetition_penalty != 1.0 and row.seen_tokens:
        seen = torch.tensor(row.seen_tokens, device=logits.device).unique()
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def token_bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_from_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [B, V] from an int32 bitmask [B, ceil(V / 32)] (bit set = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _apply_constraints(logits: torch.Tensor, rows: list[RowState], constrained: list[int]) -> None:
    """Set the logits of tokens that a row's constraint forbids to -inf (in place)."""
    bitmask = torch.zeros(len(constrained), token_bitmask_words(logits.shape[-1]), dtype=torch.int32)
    for position, i in enumerate(constrained):
        rows[i].constraint.fill_next_token_bitmask(bitmask, position)
    allowed = allowed_from_bitmask(bitmask.to(logits.device), logits.shape[-1])
    index = torch.tensor(constrained, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


@dataclass(frozen=True)
class Sampled:
    """One step's choice for every row of a batch."""

    tokens: list[int]
    logprobs: list[float] | None  # raw log-probability of each chosen token, when any row asked for them
    failed: frozenset[int]  # rows whose logits (or processed probabilities) were not finite: no token for them


def sample(logits: torch.Tensor, rows: list[RowState], eos_ids: torch.Tensor) -> Sampled:
    """Choose one token per row from logits [B, V] (fp32). A row whose logits hold nan or inf (an overflowing
    adapter) or whose warped distribution is degenerate fails alone; the other rows are sampled as usual."""
    failed = set((~torch.isfinite(logits).all(dim=-1)).nonzero()[:, 0].tolist())
    too_early = [i for i, row in enumerate(rows) if row.generated < row.params.min_new_tokens]
    warped = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0 or not row.params.greedy]
    constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
    processed = logits
    if (too_early and eos_ids.numel()) or warped or constrained:
        processed = logits.clone()
        if constrained:
            _apply_constraints(processed, rows, constrained)
        if too_early and eos_ids.numel():  # every such row at once: no per-row work for min_new_tokens
            processed[torch.tensor(too_early, device=logits.device)[:, None], eos_ids[None, :]] = float("-inf")
        for i in warped:  # EOS already masked: the penalty keeps -inf at -inf, so the order does not matter
            if i not in failed:
                processed[i] = _process_row(processed[i], rows[i])
    chosen = processed.argmax(dim=-1)
    for i, row in enumerate(rows):
        if not row.params.greedy and i not in failed:
            probs = processed[i].softmax(-1)
            if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
                failed.add(i)
                continue
            chosen[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
    logprobs = None
    if any(row.params.logprobs for row in rows):
        logprobs = logits.log_softmax(-1).gather(1, chosen[:, None])[:, 0].tolist()
    return Sampled(chosen.tolist(), logprobs, frozenset(failed))
