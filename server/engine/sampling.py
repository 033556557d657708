"""Sampling parameters and the batched sampler: one pass over a step's logits [B, V] for every row.

Processing order per row (transformers' and vLLM's): penalties (repetition over prompt and output,
presence and frequency over the output), logit bias, allowed tokens and the row's constraint (a grammar's
bitmask), the min-new-tokens mask on end-of-sequence and stop tokens; then greedy rows take the argmax, and
sampled rows divide by their temperature, cut to top-k, then top-p within it, then min-p, and draw.

Rows that share nothing share no loop: every stage is one tensor operation over the rows that need it. The
only per-row host work is a constraint's bitmask (a grammar matcher lives on the host). Randomness is counter
based: a row's draw at step t is the inverse CDF of its kept distribution at a uniform number hashed from
(its seed, t), so a seeded request's tokens never depend on the rest of its batch, its place in it or the
batch size. Penalty counts live on the device in per-sampler buffers (one row per request that uses them) and
are updated by one scatter a step. The chosen tokens, their log-probabilities, the requested top
log-probabilities and the per-row failures come back to the host in one transfer.

Log-probabilities are those of the raw model logits (log-softmax before any processing), like
`output_logits` in transformers and vLLM's default.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Protocol

import torch

MAX_TOP_LOGPROBS = 20
# Top-p rows are cut among this many most likely tokens (top-k first, then top-p within it) instead of a sort
# of the whole vocabulary; a row whose nucleus is wider falls back to a full sort (exact either way).
TOP_P_CANDIDATES = 256
_MASK32 = 0xFFFFFFFF


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
    max_new_tokens: int  # 0: score the prompt only (prompt_logprobs), generate nothing
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # end the request like end-of-sequence tokens do
    ignore_eos: bool = False  # end-of-sequence tokens do not end the request
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    allowed_token_ids: tuple[int, ...] = ()  # non-empty: only these tokens may be chosen
    logprobs: bool = False
    top_logprobs: int = 0  # also the this many most likely tokens at each step (needs logprobs)
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's log-probability and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class RowState:
    """What the sampler keeps for one running request."""

    params: SamplingParams
    serial: int  # unique per sampler: what a cached batch plan is keyed on
    seed: int  # the counter-based generator's key (drawn when the request gave none)
    generated: int = 0  # tokens chosen so far: the generator's counter
    constraint: TokenConstraint | None = None
    penalty_row: int = -1  # its row in the sampler's penalty buffers (-1: it has no penalties)
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # tokens that end it (eos unless ignored, stops)


@dataclass(frozen=True)
class Sampled:
    """One step's choice for every row of a batch (host values)."""

    tokens: list[int]
    logprobs: list[float] | None  # raw log-probability of each chosen token, when any row asked for them
    top_logprobs: list[list[tuple[int, float]]] | None  # per row, its top_logprobs most likely (id, logprob)
    failed: frozenset[int]  # rows whose logits or processed distribution were not finite: no token for them


def token_bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_from_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [B, V] from an int32 bitmask [B, ceil(V / 32)] (bit set = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 values in [0, 2^32), elementwise; products stay below
    2^63, so int64 arithmetic is exact on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) for each (64-bit seed, counter) pair [R]: float64, 53 random bits."""
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    word = _hash32(_hash32(low ^ _hash32(counters & _MASK32)) ^ high)
    word2 = _hash32(word ^ 0x9E3779B9)
    bits53 = (word << 21) | (word2 >> 11)
    return bits53.double() / float(1 << 53)


def _int64(seed: int) -> int:
    """A 64-bit seed (the API's uint64, or any int) as the int64 a device tensor holds, bit for bit."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def draw_seed() -> int:
    return secrets.randbits(63)


def sequence_seed(seed: int, index: int) -> int:
    """The seed of the index-th of n sequences of one request (index 0 keeps the request's own)."""
    if index == 0:
        return seed
    mixed = _hash32(torch.tensor([(seed ^ index * 0x9E3779B9) & _MASK32, ((seed >> 32) ^ index) & _MASK32]))
    return (int(mixed[0]) | int(mixed[1]) << 32) & ((1 << 63) - 1)


class _PenaltyBuffers:
    """Per-request penalty state on the device, one buffer row per request that has a penalty, kept in the form
    a step applies directly: the repetition penalty as the factor for a positive and for a negative logit of
    each token (1/p and p where the token was seen in the prompt or output, 1 elsewhere), and the presence
    and frequency penalties as the amount to subtract (from the output counts)."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.positive = torch.zeros(0, vocab_size, device=device)
        self.negative = torch.zeros(0, vocab_size, device=device)
        self.counts = torch.zeros(0, vocab_size, device=device)
        self.offset = torch.zeros(0, vocab_size, device=device)
        self._free: list[int] = []

    def take(self, params: SamplingParams, prompt_ids: list[int]) -> int:
        if not self._free:
            self._grow()
        row = self._free.pop()
        for buffer, value in ((self.positive, 1.0), (self.negative, 1.0), (self.counts, 0.0), (self.offset, 0.0)):
            buffer[row] = value
        if prompt_ids and params.repetition_penalty != 1.0:
            ids = torch.tensor(prompt_ids, device=self.device).clamp_(0, self.vocab_size - 1)
            self.positive[row, ids] = 1.0 / params.repetition_penalty
            self.negative[row, ids] = params.repetition_penalty
        return row

    def give_back(self, row: int) -> None:
        self._free.append(row)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor, plan: _BatchPlan) -> None:
        """The chosen tokens [P] of buffer rows [P] were generated: they are now seen, and counted."""
        self.positive[rows, tokens] = plan.inverse_repetition[:, 0]
        self.negative[rows, tokens] = plan.repetition[:, 0]
        self.counts[rows, tokens] += 1
        count = self.counts[rows, tokens]
        self.offset[rows, tokens] = plan.frequency[:, 0] * count + plan.presence[:, 0]

    def _grow(self) -> None:
        old = self.positive.shape[0]
        new = max(8, old * 2)
        for name in ("positive", "negative", "counts", "offset"):
            grown = torch.zeros(new, self.vocab_size, device=self.device)
            grown[:old] = getattr(self, name)
            setattr(self, name, grown)
        self._free.extend(range(new - 1, old - 1, -1))


@dataclass(frozen=True)
class _BatchPlan:
    """The step's rows grouped by what they need, as index tensors (built on the host from the rows' params)."""

    penalized: torch.Tensor | None  # [P] batch rows with penalties
    penalty_rows: torch.Tensor | None  # [P] their penalty buffer rows
    repetition: torch.Tensor | None  # [P, 1] each one's repetition penalty
    inverse_repetition: torch.Tensor | None  # [P, 1] 1 / repetition penalty
    additive: bool  # some row has a presence or frequency penalty
    presence: torch.Tensor | None  # [P, 1]
    frequency: torch.Tensor | None  # [P, 1]
    bias_rows: torch.Tensor | None  # [N] (batch row, token, bias) of every logit_bias entry
    bias_tokens: torch.Tensor | None
    bias_values: torch.Tensor | None
    allowed_rows: list[int]  # batch rows with allowed_token_ids (masks built per step: rare)
    greedy: torch.Tensor | None  # [G] rows that take the argmax
    all_greedy: bool
    sampled: torch.Tensor | None  # [S] rows that draw
    sampled_rows: list[int]  # the same on the host
    all_sampled: bool
    untruncated: torch.Tensor | None  # positions (in `sampled`) of rows without top-k or top-p
    all_truncated: bool
    nucleus_only: torch.Tensor | None  # positions (in `truncated`) of rows with top-p but no top-k
    temperature: torch.Tensor | None  # [S, 1]
    truncated: torch.Tensor | None  # [T] positions (in `sampled`) of rows with top-k or top-p
    top_k: torch.Tensor | None  # [T, 1] (0: none)
    top_p: torch.Tensor | None  # [T, 1]
    min_p: torch.Tensor | None  # [S, 1]
    seeds: torch.Tensor | None  # [S] int64
    any_min_p: bool
    max_top_k: int
    top_logprobs: int  # the most any row asked for
    wants_logprobs: bool


class Sampler:
    """The engine's sampler. `new_row` when a request starts, `sample` every step, `release` when it ends."""

    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: tuple[int, ...]) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.eos_token_ids = frozenset(eos_token_ids)
        self._penalties = _PenaltyBuffers(vocab_size, device)
        self._plan_key: tuple | None = None
        self._serials = itertools.count()
        self._plan: _BatchPlan | None = None

    # ---- per-request state ---------------------------------------------------------------------------
    def new_row(
        self, params: SamplingParams, prompt_ids: list[int], constraint: TokenConstraint | None = None
    ) -> RowState:
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        row = RowState(
            params,
            serial=next(self._serials),
            seed=_int64(params.seed) if params.seed is not None else draw_seed(),
            constraint=constraint,
            stop_ids=frozenset(stop_ids),
        )
        if params.penalized:
            row.penalty_row = self._penalties.take(params, prompt_ids)
        return row

    def release(self, row: RowState) -> None:
        if row.penalty_row >= 0:
            self._penalties.give_back(row.penalty_row)
            row.penalty_row = -1

    # ---- one step --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[RowState]) -> Sampled:
        """Choose one token per row from logits [B, V] (fp32). A row whose logits hold nan or inf (an overflowing
        adapter), or whose processed distribution keeps no token, fails alone; the other rows are sampled."""
        plan = self._plan_for(rows)
        # nan propagates through max and min, and an inf is the max or the min: two cheap reductions.
        row_max = logits.amax(dim=-1)
        failed = ~(torch.isfinite(row_max) & torch.isfinite(logits.amin(dim=-1)))  # [B]
        raw_logprobs = logits.log_softmax(-1) if plan.wants_logprobs else None
        processed = self._process(logits, rows, plan)
        private = processed is not logits  # a copy of its own: later stages may work in place
        if private:
            row_max = processed.amax(dim=-1)
        failed |= row_max == float("-inf")  # the processing left no token
        chosen = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
        if plan.greedy is not None:
            chosen[plan.greedy] = _rows(processed, plan.greedy, plan.all_greedy).argmax(dim=-1)
        if plan.sampled is not None:
            x = _rows(processed, plan.sampled, plan.all_sampled)
            tokens, ok = self._draw(x, rows, plan, private or not plan.all_sampled)
            chosen[plan.sampled] = tokens
            failed[plan.sampled] |= ~ok
        return self._finish_step(chosen, failed, raw_logprobs, rows, plan)

    def _plan_for(self, rows: list[RowState]) -> _BatchPlan:
        """The step's plan; a decode batch keeps its rows for many steps, so it is reused while they stay."""
        key = tuple(row.serial for row in rows) + tuple(row.penalty_row for row in rows)
        if key != self._plan_key:
            self._plan_key, self._plan = key, self._build_plan(rows)
        return self._plan

    def _build_plan(self, rows: list[RowState]) -> _BatchPlan:
        device = self.device

        def index(items: list[int]) -> torch.Tensor | None:
            return torch.tensor(items, device=device, dtype=torch.long) if items else None

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, device=device, dtype=torch.float32)[:, None]

        penalized = [i for i, row in enumerate(rows) if row.penalty_row >= 0]
        pen_params = [rows[i].params for i in penalized]
        bias = [(i, token, value) for i, row in enumerate(rows) for token, value in row.params.logit_bias]
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        s_params = [rows[i].params for i in sampled]
        truncated = [j for j, p in enumerate(s_params) if p.top_k > 0 or p.top_p < 1.0]
        t_params = [s_params[j] for j in truncated]
        return _BatchPlan(
            penalized=index(penalized),
            penalty_rows=index([rows[i].penalty_row for i in penalized]),
            repetition=column([p.repetition_penalty for p in pen_params]) if penalized else None,
            inverse_repetition=column([1.0 / p.repetition_penalty for p in pen_params]) if penalized else None,
            additive=any(p.presence_penalty or p.frequency_penalty for p in pen_params),
            presence=column([p.presence_penalty for p in pen_params]) if penalized else None,
            frequency=column([p.frequency_penalty for p in pen_params]) if penalized else None,
            bias_rows=index([i for i, _, _ in bias]),
            bias_tokens=index([t for _, t, _ in bias]),
            bias_values=torch.tensor([v for _, _, v in bias], device=device) if bias else None,
            allowed_rows=[i for i, row in enumerate(rows) if row.params.allowed_token_ids],
            greedy=index([i for i, row in enumerate(rows) if row.params.greedy]),
            all_greedy=not sampled,
            sampled=index(sampled),
            sampled_rows=sampled,
            all_sampled=len(sampled) == len(rows),
            untruncated=index([j for j, p in enumerate(s_params) if not (p.top_k > 0 or p.top_p < 1.0)]),
            all_truncated=len(truncated) == len(sampled),
            nucleus_only=index([j for j, p in enumerate(t_params) if p.top_k == 0]),
            temperature=column([p.temperature for p in s_params]) if sampled else None,
            truncated=index(truncated),
            top_k=index([p.top_k for p in t_params])[:, None] if truncated else None,
            top_p=column([p.top_p for p in t_params]) if truncated else None,
            min_p=column([p.min_p for p in s_params]) if sampled else None,
            seeds=index([rows[i].seed for i in sampled]),
            any_min_p=any(p.min_p > 0 for p in s_params),
            max_top_k=max((p.top_k for p in t_params), default=0),
            top_logprobs=max((row.params.top_logprobs for row in rows), default=0),
            wants_logprobs=any(row.params.logprobs for row in rows),
        )

    def _process(self, logits: torch.Tensor, rows: list[RowState], plan: _BatchPlan) -> torch.Tensor:
        """The logits after penalties, bias and masks (a copy, or `logits` itself when no row changes them)."""
        constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
        # A constrained row's grammar decides when it may end: masking its end there would leave it no token.
        too_early = [
            i
            for i, row in enumerate(rows)
            if row.generated < row.params.min_new_tokens and row.stop_ids and row.constraint is None
        ]
        if plan.penalized is None and plan.bias_rows is None and not (plan.allowed_rows or constrained or too_early):
            return logits
        x = logits.clone()
        if plan.penalized is not None:
            self._apply_penalties(x, plan)
        if plan.bias_rows is not None:
            x.index_put_((plan.bias_rows, plan.bias_tokens), plan.bias_values, accumulate=True)
        if plan.allowed_rows:
            self._apply_allowed(x, rows, plan.allowed_rows)
        if constrained:
            _apply_constraints(x, rows, constrained)
        if too_early:
            pairs = [(i, t) for i in too_early for t in rows[i].stop_ids if t < x.shape[-1]]
            if pairs:
                where = torch.tensor(pairs, device=x.device)
                x[where[:, 0], where[:, 1]] = float("-inf")
        return x

    def _apply_penalties(self, x: torch.Tensor, plan: _BatchPlan) -> None:
        """Repetition (a factor by the logit's sign), then presence and frequency (subtracted), in place."""
        buffers, rows = self._penalties, plan.penalty_rows
        every_row = plan.penalized.shape[0] == x.shape[0]  # penalized rows are in batch order
        scores = x if every_row else x[plan.penalized]  # [P, V]
        scores.mul_(torch.where(scores > 0, buffers.positive[rows], buffers.negative[rows]))
        if plan.additive:
            scores.sub_(buffers.offset[rows])
        if not every_row:
            x[plan.penalized] = scores

    @staticmethod
    def _apply_allowed(x: torch.Tensor, rows: list[RowState], allowed_rows: list[int]) -> None:
        keep = torch.zeros(len(allowed_rows), x.shape[-1], dtype=torch.bool, device=x.device)
        for position, i in enumerate(allowed_rows):
            keep[position, torch.tensor(rows[i].params.allowed_token_ids, device=x.device)] = True
        index = torch.tensor(allowed_rows, device=x.device)
        x[index] = x[index].masked_fill(~keep, float("-inf"))

    def _draw(
        self, x: torch.Tensor, rows: list[RowState], plan: _BatchPlan, private: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one token for each sampled row from x [S, V] (processed logits; `private`: a copy that may be
        changed in place): its tokens [S] and whether its kept distribution was proper [S]."""
        x = x.div_(plan.temperature) if private else x / plan.temperature
        counters = torch.tensor([rows[i].generated for i in plan.sampled_rows], device=x.device)
        u = uniforms(plan.seeds, counters)  # [S]
        tokens = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        ok = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if plan.truncated is not None:
            xt = _rows(x, plan.truncated, plan.all_truncated)
            tokens[plan.truncated], ok[plan.truncated] = self._draw_truncated(xt, u[plan.truncated], plan)
        if plan.untruncated is not None:
            probs = _rows(x, plan.untruncated, plan.truncated is None).softmax(-1)  # [F, V]
            if plan.any_min_p:
                min_p = plan.min_p[plan.untruncated]
                probs = torch.where(probs >= min_p * probs.amax(dim=-1, keepdim=True), probs, 0.0)
            tokens[plan.untruncated], ok[plan.untruncated] = _inverse_cdf(probs, u[plan.untruncated])
        return tokens, ok

    def _draw_truncated(self, x: torch.Tensor, u: torch.Tensor, plan: _BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k, then top-p within it, then min-p, among each row's most likely tokens; x [T, V]."""
        top_k, top_p, min_p = plan.top_k, plan.top_p, plan.min_p[plan.truncated]
        # Weights relative to what top-p measures against: the whole vocabulary's mass for a top-p-only row (its
        # log-normaliser, one pass over those rows), the top-k's own mass for a row with top-k.
        reference = x.amax(dim=-1, keepdim=True)
        if plan.nucleus_only is not None:
            reference[plan.nucleus_only] = torch.logsumexp(x[plan.nucleus_only], dim=-1, keepdim=True)
        tokens = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        ok = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        pending = None  # rows still to draw (None: all)
        for width in _candidate_widths(x.shape[-1], plan.max_top_k, plan.nucleus_only is not None, x.device):
            rows = x if pending is None else x[pending]
            values, ids = torch.topk(rows, width, dim=-1)  # sorted, most likely first
            at = slice(None) if pending is None else pending
            weights = (values - reference[at]).exp()  # [R, W]
            position, drawn_ok = _inverse_cdf(_truncate(weights, top_k[at], top_p[at], min_p[at]), u[at])
            tokens[at], ok[at] = ids.gather(1, position[:, None])[:, 0], drawn_ok
            if width == x.shape[-1]:
                break
            # A top-p-only row whose nucleus is wider than its candidates is drawn again from more of them.
            short = (top_k[at][:, 0] == 0) & (weights.sum(-1) < top_p[at][:, 0])
            if not bool(short.any()):
                break
            pending = short.nonzero()[:, 0] if pending is None else pending[short]
        return tokens, ok

    def _finish_step(
        self,
        chosen: torch.Tensor,
        failed: torch.Tensor,
        raw_logprobs: torch.Tensor | None,
        rows: list[RowState],
        plan: _BatchPlan,
    ) -> Sampled:
        """Update the device penalty counts with the chosen tokens; bring everything the host needs over at once."""
        if plan.penalized is not None:
            self._penalties.record(plan.penalty_rows, chosen[plan.penalized], plan)
        parts = [chosen.double()[:, None], failed.double()[:, None]]
        if raw_logprobs is not None:
            parts.append(raw_logprobs.gather(1, chosen[:, None]).double())
            if plan.top_logprobs:
                values, ids = raw_logprobs.topk(plan.top_logprobs, dim=-1)
                parts += [ids.double(), values.double()]
        host = torch.cat(parts, dim=1).cpu().tolist()  # the step's one device-to-host transfer
        tokens = [int(line[0]) for line in host]
        failures = frozenset(i for i, line in enumerate(host) if line[1])
        logprobs = [line[2] for line in host] if raw_logprobs is not None else None
        top = None
        if raw_logprobs is not None and plan.top_logprobs:
            n = plan.top_logprobs
            top = [
                list(zip(map(int, line[3 : 3 + n][:k]), line[3 + n : 3 + 2 * n][:k], strict=True))
                for line, k in ((line, row.params.top_logprobs) for line, row in zip(host, rows, strict=True))
            ]
        for row in rows:
            row.generated += 1
        return Sampled(tokens, logprobs, top, failures)


def _truncate(weights: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero what top-k [T, 1] (0: none), then top-p [T, 1] over the top-k renormalised distribution, then min-p
    [T, 1] drop from sorted weights [T, W] (most likely first): probabilities over the whole vocabulary for a
    row without top-k, any positive multiple of them for a row with top-k. The most likely token stays."""
    ranks = torch.arange(weights.shape[-1], device=weights.device)[None]
    weights = torch.where((top_k == 0) | (ranks < top_k), weights, 0.0)
    total = torch.where(top_k > 0, weights.sum(-1, keepdim=True), 1.0)
    mass_before = (weights.cumsum(-1) - weights) / total
    weights = torch.where((mass_before < top_p) | (ranks == 0), weights, 0.0)
    return torch.where(weights >= min_p * weights[:, :1], weights, 0.0)


def _candidate_widths(vocab: int, max_top_k: int, nucleus_only: bool, device: torch.device) -> list[int]:
    """How many of its most likely tokens a truncated row is cut among, tried in turn: on the CPU a partial top-k
    is far cheaper than a sort (most nuclei are a few tokens wide), a device sorts the vocabulary fast. When
    every row has a top-k, its largest is enough."""
    if not nucleus_only:
        return [min(vocab, max_top_k)]
    if device.type != "cpu":
        return [vocab]
    first = min(vocab, max(TOP_P_CANDIDATES, max_top_k))
    return [first] + [w for w in (min(vocab, first * 16), vocab) if w > first]


def _rows(x: torch.Tensor, index: torch.Tensor, every: bool) -> torch.Tensor:
    """x's rows at `index`: x itself (no copy) when they are all of them, in order."""
    return x if every else x[index]


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of non-negative weights [R, W], the index drawn with probability weight / row sum, at the
    uniform u [R]; and whether the row had positive, finite mass."""
    cumulative = weights.cumsum(-1)
    total = cumulative[:, -1]
    target = (u * total.double()).to(cumulative.dtype)[:, None]
    index = torch.searchsorted(cumulative, target, right=True)[:, 0].clamp_(max=weights.shape[-1] - 1)
    return index, torch.isfinite(total) & (total > 0)


def _apply_constraints(logits: torch.Tensor, rows: list[RowState], constrained: list[int]) -> None:
    """Set the logits of tokens that a row's constraint forbids to -inf (in place)."""
    bitmask = torch.zeros(len(constrained), token_bitmask_words(logits.shape[-1]), dtype=torch.int32)
    for position, i in enumerate(constrained):
        rows[i].constraint.fill_next_token_bitmask(bitmask, position)
    allowed = allowed_from_bitmask(bitmask.to(logits.device), logits.shape[-1])
    index = torch.tensor(constrained, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
