"""A generation request as the engine sees it, and what the engine sends back for it."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deltaserve.server.engine.detokenizer import IncrementalDetokenizer
from deltaserve.server.engine.sampling import RowState, SamplingParams, TokenConstraint
from deltaserve.server.residency.registry import AdapterRecord


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    ABORTED = "aborted"


@dataclass(frozen=True)
class TokenLogprob:
    """A prompt token's log-probability (None for the first: nothing predicts it) and the most likely tokens at
    its position, as (token id, log-probability), most likely first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]
    rank: int | None  # 1 for the most likely token at its position


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: the new tokens/text since the previous output."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    generated_tokens: int
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    error: BaseException | None = None  # set when the engine failed this request
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # the scored prompt, on the first output only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


Sink = Callable[[RequestOutput], None]


@dataclass(eq=False)
class Request:
    """One generation request. Created by the API, owned by the engine after `submit`."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRecord | None
    sink: Sink
    constraint: TokenConstraint | None = None  # e.g. a grammar matcher, set by the front door before submit
    arrival: float = field(default_factory=time.monotonic)
    # engine-side state
    order: int = -1  # submit order (the scheduler's arrival order)
    blocks: list[int] = field(default_factory=list)  # KV-cache block table
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache names of its full blocks, in order
    merged_generation: int = 0  # the adapter merged into the base when it was admitted (0: none)
    soft_length: int = 0  # prefix entries + virtual tokens of its adapter, before the prompt
    cache_len: int = 0  # positions whose K/V are in its blocks
    target_len: int = 0  # positions its prefill must reach (soft prompt, prompt and tokens generated so far)
    preempted: bool = False  # lost its blocks in this decode step; waits to be recomputed
    finished: bool = False
    last_token: int = -1
    generated: list[int] = field(default_factory=list)
    sampler: RowState | None = None
    detokenizer: IncrementalDetokenizer | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # scored so far (prompt_logprobs)
    prompt_scored: bool = False  # the scored prompt was handed over (a preempted request does not score again)
    prefilled_at: float | None = None
    first_token_at: float | None = None
    _cancelled: bool = False
    # multi-tenant scheduling (engine/scheduler.py): tenant and priority set by the front door
    tenant: str = ""  # whose share and limits it counts against (the door's default: its adapter's id)
    priority: int = 0  # higher goes first under --scheduling priority; ignored by fair and fifo
    preemptions: int = 0  # times it lost its blocks and was queued again (raises its precedence)

    @property
    def adapter_id(self) -> str:
        return self.adapter.adapter_id if self.adapter is not None else ""

    @property
    def sequence_len(self) -> int:
        """Positions the prefill computes: the adapter's prefix entries and virtual tokens plus the prompt."""
        return len(self.prompt_ids) + (self.adapter.extra_positions if self.adapter is not None else 0)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_scored

    @property
    def slot(self) -> int:
        return self.adapter.slot if self.adapter is not None else -1

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (thread-safe; idempotent)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled
