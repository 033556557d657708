"""The engine: one thread owns the model and runs the continuous-batching step loop.

Each step
1. admits the waiting requests the scheduler (engine/scheduler.py: fair shares between tenants, limits,
   priorities) picks for the free batch places, in its order, while KV-cache blocks are free: a request takes
   the longest run of its prompt's blocks that the prefix cache holds and fresh blocks for the rest; the
   scheduler may preempt a running request to give its place to a tenant that has none;
2. prefills up to `max_prefill_tokens` prompt tokens, taken from the admitted requests in the scheduler's order,
   so a long prompt is prefilled in chunks over several steps; a request whose prompt is complete samples its
   first token;
3. decodes one token for every request past its prefill, in one batched forward. A row that needs a new block
   when none is left (or whose tenant is at its block cap) preempts the request the scheduler names: its blocks
   are released (its full ones stay cached) and it waits, ahead of its level's fresh requests, to be
   recomputed from prompt plus generated tokens.
Finished or cancelled requests leave between steps and release their blocks at once. The tokens each step
computes are charged to the requests' tenants (the fair policy's counters, the per-tenant metrics).
Other threads talk to the engine only through `submit`, `Request.cancel` and each request's sink.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from deltaserve.server.engine.detokenizer import IncrementalDetokenizer
from deltaserve.server.engine.kv_blocks import BlockManager, chain_hash, root_hash
from deltaserve.server.engine.request import FinishReason, Request, RequestOutput, TokenLogprob
from deltaserve.server.engine.sampling import Sampled, Sampler
from deltaserve.server.engine.scheduler import Plan, Scheduler, SchedulerConfig
from deltaserve.server.errors import (
    CapacityError,
    EngineFailedError,
    EngineStepError,
    EngineStoppedError,
    InvalidRequestError,
    NonFiniteOutputError,
)
from deltaserve.server.kernels.threads import compute_here
from deltaserve.server.metrics import Metrics
from deltaserve.server.model.kv_cache import blocks_for
from deltaserve.server.model.layers import PAD_SLOT, LoraBatch, SlotBatch, build_lora_batch, build_slot_batch
from deltaserve.server.model.runner import (
    NO_ADAPTERS,
    NO_SOFT_PROMPT,
    AdapterBatch,
    ModelRunner,
    PrefillChunk,
    SoftPrompt,
)
from deltaserve.server.residency.registry import AdapterRecord, AdapterRegistry
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int
    max_seq_len: int
    eos_token_ids: tuple[int, ...]
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step (bounds a step's time and activations)
    max_waiting: int = 1024  # requests queued beyond the running batch; more are refused (RESOURCE_EXHAUSTED)
    block_size: int = 16  # tokens per KV-cache block
    num_blocks: int = 1024  # blocks in the pool, the null block included
    prefix_caching: bool = True
    # The engine thread's torch threads: the server's only thread that computes with several (kernels/threads.py).
    torch_threads: int | None = None  # None: whatever the thread starts with
    scheduling: SchedulerConfig = field(default_factory=SchedulerConfig)  # policy and per-tenant limits


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: PreTrainedTokenizerBase,
        registry: AdapterRegistry,
        config: EngineConfig,
        metrics: Metrics,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.sampler = Sampler(runner.vocab_size, runner.device, config.eos_token_ids)
        self._cv = threading.Condition()
        self.scheduler = Scheduler(config.scheduling)  # owns the waiting requests
        self._prefilling: list[Request] = []  # admitted, prompt not yet complete (FIFO: chunks go in order)
        self._running: list[Request] = []  # decoding
        self.blocks = BlockManager(config.num_blocks, config.block_size, prefix_caching=config.prefix_caching)
        self._block_reserve = max(1, self.blocks.usable // 100)
        self._arrivals = itertools.count()  # submit order: the scheduler's arrival order
        self._accepting = True
        self._abort_at: float | None = None  # monotonic time after which unfinished work is aborted
        self._commands: list[tuple[Callable[[], object], concurrent.futures.Future]] = []
        self.merged: AdapterRecord | None = None  # the adapter folded into the base weights, if any
        self.admission_observer: Callable[[str], None] | None = None  # sees each admitted request's adapter
        self._decode_key: tuple | None = None  # what the cached decode-step adapter batch was built for
        self._decode_adapters = NO_ADAPTERS
        self.failure: BaseException | None = None  # why the engine thread died, if it did
        self.on_death: Callable[[BaseException], None] = lambda err: None  # the server's health and exit hook
        self._thread = threading.Thread(target=self._loop, name="deltaserve-engine", daemon=True)

    # ---- control (any thread) ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        positions = request.sequence_len + request.params.max_new_tokens
        if blocks_for(positions, self.config.block_size) > self.blocks.usable:
            raise InvalidRequestError(
                f"the request needs {positions} KV-cache positions, more than the whole cache holds "
                f"({self.blocks.usable * self.config.block_size}); shorten the prompt or max_new_tokens"
            )
        self.scheduler.check_fits(request, blocks_for(positions, self.config.block_size))
        request.order = next(self._arrivals)
        with self._cv:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down and accepts no new requests")
            try:
                if self.scheduler.num_waiting >= self.config.max_waiting:
                    raise CapacityError(
                        f"the request queue is full ({self.config.max_waiting} waiting); retry later", retry_after=1.0
                    )
                self.scheduler.enqueue(request)
            except CapacityError:
                self.metrics.observe_rejection(request.tenant)
                raise
            self.metrics.requests_waiting.set(self.scheduler.num_waiting)
            self._cv.notify()

    def call(self, command: Callable[[], object], timeout: float | None = None) -> object:
        """Run `command` on the engine thread between two steps (e.g. changing the base weights); returns
        its result or raises its exception. Blocking: call it off the event loop."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            self._commands.append((command, future))
            self._cv.notify()
        return future.result(timeout)

    @property
    def alive(self) -> bool:
        """The engine thread runs (it ends on stop, or if a step raised outside any request)."""
        return self._thread.is_alive()

    @property
    def merged_slot(self) -> int:
        return self.merged.slot if self.merged is not None else -1

    def wake(self) -> None:
        """Make the loop look at its requests now (after a cancel), instead of at its next step."""
        with self._cv:
            self._cv.notify()

    def stop(self, grace_seconds: float) -> None:
        """Stop admitting; let in-flight work finish for up to `grace_seconds`, abort the rest; join."""
        with self._cv:
            self._accepting = False
            self._abort_at = time.monotonic() + grace_seconds
            self._cv.notify()
        self._thread.join()

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    def kv_blocks(self, state: str) -> int:
        """Blocks that are free, used or cached (read at scrape time, without locking)."""
        counts = {"free": self.blocks.free_count, "used": self.blocks.used_count, "cached": self.blocks.cached_count}
        return counts[state]

    def kv_cache_usage(self) -> float:
        """Blocks held by requests over the usable blocks (read at scrape time, without locking)."""
        return self.blocks.used_count / self.blocks.usable

    # ---- the loop (engine thread) ------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            if self.config.torch_threads is not None:
                compute_here(self.config.torch_threads)
            self._serve()
        except BaseException as err:  # the loop itself broke (its own error handling raised): nothing runs now
            self._die(err)

    def _die(self, err: BaseException) -> None:
        """Fail everything queued, running or commanded with UNAVAILABLE and tell `on_death`, so that health
        turns NOT_SERVING and the process exits for its supervisor to restart it."""
        log.critical("the engine thread died", exc_info=err)
        self.failure = err
        with self._cv:
            self._accepting = False
            commands, self._commands = self._commands, []
            waiting = self.scheduler.take_all()
        self._cancel_commands(commands)
        dead = EngineFailedError("the engine failed and is restarting; retry the request")
        for request in [*waiting, *self._prefilling, *self._running]:
            if not request.finished:
                with contextlib.suppress(Exception):  # the state that broke the loop may break this too
                    request.blocks = []  # the cache is not touched again
                    self._finish(request, None, error=dead)
        self._prefilling, self._running = [], []
        self.on_death(err)

    def _serve(self) -> None:
        while True:
            with self._cv:
                waiting = self.scheduler.num_waiting
                while not (waiting or self._running or self._prefilling or self._commands) and self._accepting:
                    self._cv.wait()
                    waiting = self.scheduler.num_waiting
                commands, self._commands = self._commands, []
                if self._abort_at is not None and (
                    time.monotonic() >= self._abort_at or not (waiting or self._running or self._prefilling)
                ):
                    self._cancel_commands(commands)
                    break
                admitted, victims = self._take_admissible()
            self._run_commands(commands)
            if not admitted and not self._running and not self._prefilling:
                with self._cv:
                    if not self._commands:
                        # Everything queued waits for its adapter to reach the device: sleep until the
                        # residency thread (or a submit, cancel or command) wakes the loop.
                        self._cv.wait(timeout=0.5)
                continue
            try:
                self._step(admitted, victims)
            except Exception:  # a bug or device failure: fail what was in flight, keep serving
                # An admitted request is also in _prefilling or _running by now: list each once.
                in_flight = list({id(r): r for r in [*admitted, *self._prefilling, *self._running]}.values())
                log.exception("engine step failed for requests %s", [r.request_id for r in in_flight])
                for request in in_flight:
                    if not request.finished:
                        # The detail stays in the log: a client sees no library text or server path.
                        failure = EngineStepError(f"internal error in the engine step (request {request.request_id})")
                        self._finish(request, None, error=failure)
                self._prefilling.clear()
                self._running.clear()
        self._abort_all()

    @staticmethod
    def _run_commands(commands: list[tuple[Callable[[], object], concurrent.futures.Future]]) -> None:
        for command, future in commands:
            try:
                future.set_result(command())
            except Exception as err:
                future.set_exception(err)

    @staticmethod
    def _cancel_commands(commands: list[tuple[Callable[[], object], concurrent.futures.Future]]) -> None:
        for _, future in commands:
            future.set_exception(EngineStoppedError("the server is shutting down"))

    def _take_admissible(self) -> tuple[list[Request], list[Request]]:
        """The queued requests that may run now, in the scheduler's order, and the running ones it preempts for
        them. Only requests whose adapter holds a device slot are eligible (others keep waiting while the
        residency thread brings theirs in), up to the free batch places and their tenants' caps. Cancelled or
        failed ones are taken too (to be finished) but take no place. Whether blocks fit is `_admit`'s call."""
        done = self.scheduler.remove_waiting(
            lambda r: r.cancelled or (r.adapter is not None and r.adapter.load_error is not None)
        )
        plan: Plan = self.scheduler.plan(
            self.config.max_batch_size - self.num_running,
            ready=lambda r: r.adapter is None or r.adapter.slot >= 0,
            blocks_needed=self._blocks_needed,
            tenant_blocks=self._tenant_blocks() if self.scheduler.config.caps_blocks else None,
        )
        self.metrics.requests_waiting.set(self.scheduler.num_waiting)
        return [*done, *plan.admit], plan.preempt

    def _blocks_needed(self, request: Request) -> int:
        """Blocks a request holds once admitted (about: before its adapter's soft prompt is known)."""
        return blocks_for(request.sequence_len + len(request.generated), self.config.block_size)

    def _tenant_blocks(self) -> Counter[str]:
        held: Counter[str] = Counter()
        for request in [*self._running, *self._prefilling]:
            held[request.tenant] += len(request.blocks)
        return held

    def _step(self, admitted: list[Request], victims: Sequence[Request] = ()) -> None:
        self._drop_cancelled()
        for victim in victims:  # the scheduler gives their places to the admitted requests of placeless tenants
            if not victim.finished:
                self._preempt(victim)
        self._drop_preempted()
        runnable = []
        for request in admitted:
            if request.cancelled:
                self._finish(request, FinishReason.CANCELLED)
            elif request.adapter is not None and request.adapter.load_error is not None:
                self._finish(request, None, error=request.adapter.load_error)
            else:
                runnable.append(request)
        for index, request in enumerate(runnable):
            if not self._admit(request):  # out of blocks: it and those after it wait, in order
                with self._cv:
                    self.scheduler.unplace(runnable[index:])
                break
            if self.admission_observer is not None:  # between forwards: it may merge or unmerge
                self.admission_observer(request.adapter_id)
        self._prefill_step()
        if self._running:
            self._decode()
        self.metrics.requests_running.set(self.num_running)
        self.metrics.set_tenant_load(self.scheduler.running_by_tenant(), self.scheduler.waiting_by_tenant())

    # ---- admission: blocks and the prefix cache ----------------------------------------------------
    def _soft_prompt(self, request: Request) -> SoftPrompt:
        return self.registry.slots.prompts[request.slot] if request.slot >= 0 else NO_SOFT_PROMPT

    def _cache_root(self, request: Request) -> bytes:
        """What besides the tokens shaped this request's K/V: its adapter (its content hash, so names and loads
        of the same weights share blocks; a mix or stack: this build of it) and the merged one."""
        adapter = request.adapter.cache_identity if request.adapter is not None else 0
        return root_hash(f"adapter={adapter};merged={request.merged_generation}")

    @property
    def _merged_generation(self) -> int:
        return self.merged.generation if self.merged is not None else 0

    def _hashes(self, request: Request, count: int) -> list[bytes]:
        """The hash chain of the request's first `count` full blocks (extending the ones already known). A block
        hashes its tokens, with -1 for prefix-entry and virtual-token positions (the adapter, part of the root,
        decides those)."""
        chain = request.block_hashes
        if len(chain) < count:
            size, soft = self.config.block_size, request.soft_length
            items = request.prompt_ids + request.generated
            while len(chain) < count:
                start = len(chain) * size
                tokens = [items[p - soft] if p >= soft else -1 for p in range(start, start + size)]
                chain.append(chain_hash(chain[-1] if chain else self._cache_root(request), tokens))
        return chain[:count]

    def _admit(self, request: Request) -> bool:
        """Give a request its blocks (cached ones for the prefix the cache holds, fresh ones for the rest of its
        prompt) and write its prefix-tuning entries; False, with nothing taken, when the blocks are not free."""
        size = self.config.block_size
        soft = self._soft_prompt(request)
        request.soft_length = soft.prefix_length + soft.virtual_length
        request.block_hashes, request.merged_generation = [], self._merged_generation
        target = request.soft_length + len(request.prompt_ids) + len(request.generated)
        # At least the last position is computed: its logits give the next token.
        # A request that scores its prompt computes every position: it takes no cached blocks.
        use_cache = self.config.prefix_caching and not request.wants_prompt_logprobs
        cached = self.blocks.take_cached(self._hashes(request, (target - 1) // size)) if use_cache else []
        needed = blocks_for(target, size) - len(cached)
        # While others run, keep a few blocks back for their next decode steps, so that a new admission does
        # not force a preemption at once (vLLM's watermark); an idle engine admits anything that fits.
        reserve = self._block_reserve if self._running or self._prefilling else 0
        fresh = self.blocks.allocate(needed) if needed <= self.blocks.available - reserve else None
        if fresh is None:
            self.blocks.release(cached)
            return False
        request.blocks = cached + fresh
        request.cache_len, request.target_len = len(cached) * size, target
        if self.config.prefix_caching:
            self.metrics.prefix_cache_queries.inc(target)
            self.metrics.prefix_cache_hits.inc(len(cached) * size)
        if request.cache_len < soft.prefix_length:
            self.runner.write_prefix(request.blocks, soft, request.cache_len)
            request.cache_len = soft.prefix_length
            self._register_full_blocks(request)
        self._prefilling.append(request)
        return True

    def _register_full_blocks(self, request: Request) -> None:
        """Index the request's newly completed blocks in the prefix cache (not after a merge or unmerge since its
        admission: its later blocks were computed with other weights than its name says)."""
        if not self.config.prefix_caching or request.merged_generation != self._merged_generation:
            return
        full = request.cache_len // self.config.block_size
        for index, digest in enumerate(self._hashes(request, full)):
            self.blocks.register(request.blocks[index], digest)

    # ---- prefill: up to max_prefill_tokens prompt tokens per step ------------------------------------
    def _prefill_step(self) -> None:
        budget, work = self.config.max_prefill_tokens, []
        for request in self.scheduler.prefill_order(self._prefilling):
            if budget <= 0:
                break
            take = min(request.target_len - request.cache_len, budget)
            work.append((request, take))
            budget -= take
        before = [len(request.generated) for request, _ in work]
        scoring = [item for item in work if item[0].wants_prompt_logprobs]
        plain = [item for item in work if not item[0].wants_prompt_logprobs]
        for group in self._prefill_groups(plain):
            self._prefill(group)
        for group in self._prefill_groups(scoring):  # the LM head runs at every position of these
            self._prefill(group, every_position=True)
        for (request, _), count in zip(work, before, strict=True):
            if len(request.generated) > count:  # its prefill completed and sampled a token
                self._served_prefill(request, first=count == 0)

    # ---- accounting: tokens computed, charged to tenants ---------------------------------------------
    def _served_prefill(self, request: Request, first: bool) -> None:
        """A request's prefill completed and sampled a token. Its prompt was charged when it was admitted;
        the token is charged as generated. A recomputation after a preemption charges no prompt again."""
        self.scheduler.charge_generated(request, 1)
        self.metrics.observe_tenant_tokens(request.tenant, prompt=len(request.prompt_ids) if first else 0, generated=1)
        if first and request.prefilled_at is not None:
            self.metrics.observe_tenant_queue(request.tenant, request.prefilled_at - request.arrival)

    def _served_decode(self, rows: list[Request]) -> None:
        """One decode step computed a token for each row: charge each row's tenant."""
        per_tenant = Counter(request.tenant for request in rows)
        self.scheduler.charge_tenants(per_tenant)
        for tenant, count in per_tenant.items():
            self.metrics.observe_tenant_tokens(tenant, prompt=0, generated=count)

    def _prefill_groups(self, work: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
        """Split a step's chunks into forwards of at most `max_prefill_tokens` padded tokens, grouping similar
        chunk lengths so that little is spent on padding."""
        groups: list[list[tuple[Request, int]]] = []
        for request, take in sorted(work, key=lambda item: item[1]):
            group = groups[-1] if groups else None
            # Sorted by length, so this chunk is the longest of the group: it sets the padded size.
            if group and (len(group) + 1) * take <= self.config.max_prefill_tokens:
                group.append((request, take))
            else:
                groups.append([(request, take)])
        return groups

    def _chunk(self, request: Request, take: int) -> PrefillChunk:
        """The request's next `take` prompt items: virtual token embeddings first, then its tokens (prompt, and
        after a preemption the tokens it had generated)."""
        soft = self._soft_prompt(request)
        item = request.cache_len - soft.prefix_length  # index into virtual tokens + tokens
        virtual_count = max(0, min(soft.virtual_length - item, take))
        virtual = soft.virtual_tokens[item : item + virtual_count] if virtual_count else None
        tokens = request.prompt_ids + request.generated
        first = max(item - soft.virtual_length, 0)
        ids = [0] * virtual_count + tokens[first : item + take - soft.virtual_length]
        return PrefillChunk(request.blocks, request.cache_len, ids, virtual)

    def _prefill(self, group: list[tuple[Request, int]], every_position: bool = False) -> None:
        """One prefill forward over a group of chunks; requests whose prompt is complete sample their next token
        and join the decode batch. `every_position`: the LM head runs at every position, and each request's
        prompt tokens are scored (prompt log-probabilities)."""
        span = max(take for _, take in group)
        token_slots = [slot for r, take in group for slot in [r.slot] * take + [PAD_SLOT] * (span - take)]
        batch = self._adapter_batch(token_slots, None if every_position else [r.slot for r, _ in group])
        chunks = [self._chunk(r, take) for r, take in group]
        logits = (
            self.runner.prefill(chunks, batch, every_position=True)
            if every_position
            else self.runner.prefill(chunks, batch)
        )
        if every_position:  # logits [n, T, V]: score the prompt, keep each chunk's last position for sampling
            for index, (request, take) in enumerate(group):
                self._score_prompt(request, logits[index, :take])
            logits = logits[torch.arange(len(group)), torch.tensor([take - 1 for _, take in group])]
        complete = []
        for index, (request, take) in enumerate(group):
            request.cache_len += take
            self._register_full_blocks(request)
            if request.cache_len == request.target_len:
                complete.append(index)
        if not complete:
            return
        done = [group[i][0] for i in complete]
        now = time.monotonic()
        for request in done:
            self._prefilling.remove(request)
            self._running.append(request)
            if request.sampler is None:  # first admission (a preempted request keeps its sampler state)
                request.sampler = self.sampler.new_row(request.params, request.prompt_ids, request.constraint)
                request.detokenizer = IncrementalDetokenizer(self.tokenizer, request.params.stop)
                request.prefilled_at = now
                self.metrics.observe_queue(request.adapter_id, now - request.arrival)
        # Decode rows stay ordered by slot (a stable sort): a balanced mix then needs no gather or scatter in the
        # LoRA path (kernels/lora_ops.py), and the row order means nothing else.
        self._running.sort(key=lambda r: r.slot)
        rows = logits if len(complete) == len(group) else logits[torch.tensor(complete, device=logits.device)]
        scoring_only = [i for i, r in enumerate(done) if r.params.max_new_tokens == 0]
        for i in scoring_only:  # max_new_tokens 0: the prompt was scored, nothing is generated
            self._finish(done[i], FinishReason.LENGTH, last_output=self._prompt_only_output(done[i]))
        if scoring_only:
            keep = [i for i in range(len(done)) if i not in scoring_only]
            done, rows = [done[i] for i in keep], rows[torch.tensor(keep, dtype=torch.long, device=rows.device)]
        if done:
            self._take(done, self.sampler.sample(rows, [r.sampler for r in done]))
        self._compact()

    def _score_prompt(self, request: Request, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens that a chunk's logits [take, V] predict (each position predicts
        the item after it); the first prompt token has none. Added to `request.prompt_logprobs`."""
        if request.prompt_scored:
            return
        start = request.cache_len  # the chunk's first position
        # Prompt token i sits at position soft_length + i. The first has no score, and a chunk recomputed after
        # a preemption scores nothing twice: the tokens to score are those after the ones already scored.
        first, end = (
            request.soft_length + len(request.prompt_logprobs) + 1,
            request.soft_length + len(request.prompt_ids),
        )
        predicted = range(start + 1, start + 1 + logits.shape[0])  # the positions the chunk's logits predict
        pairs = [
            (row, position - request.soft_length) for row, position in enumerate(predicted) if first <= position < end
        ]
        if not pairs:
            return
        rows = torch.tensor([row for row, _ in pairs], device=logits.device)
        tokens = torch.tensor([request.prompt_ids[i] for _, i in pairs], device=logits.device)
        logprobs = logits[rows].log_softmax(-1)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        ranks = (logprobs > chosen[:, None]).sum(-1) + 1  # vLLM's rank: 1 for the most likely token
        top = request.params.prompt_logprobs or 0
        parts = [chosen.double()[:, None], ranks.double()[:, None]]
        if top:
            values, ids = logprobs.topk(top, dim=-1)
            parts += [ids.double(), values.double()]
        for (_, index), line in zip(pairs, torch.cat(parts, dim=1).cpu().tolist(), strict=True):
            entry = list(zip(map(int, line[2 : 2 + top]), line[2 + top :], strict=True))
            request.prompt_logprobs.append(TokenLogprob(request.prompt_ids[index], line[0], entry, int(line[1])))

    def _prompt_only_output(self, request: Request) -> RequestOutput:
        return RequestOutput(
            [], "", [], 0, finish_reason=FinishReason.LENGTH, prompt_logprobs=self._take_prompt_logprobs(request)
        )

    @staticmethod
    def _take_prompt_logprobs(request: Request) -> list[TokenLogprob] | None:
        """The scored prompt, handed over once (with the first output)."""
        if not request.wants_prompt_logprobs or request.prompt_scored:
            return None
        request.prompt_scored = True
        first = TokenLogprob(request.prompt_ids[0], None, [], None)
        return [first, *request.prompt_logprobs]

    # ---- decode: one token for every request past its prefill ----------------------------------------
    def _decode(self) -> None:
        self._reserve_decode_blocks()
        running = self._running
        if not running:
            return
        device = self.runner.device
        input_ids = torch.tensor([r.last_token for r in running], device=device)
        positions = torch.tensor([r.cache_len for r in running], device=device)
        tables = self.runner.decode_tables([r.blocks for r in running], max(r.cache_len for r in running))
        batch = self._decode_batch([r.slot for r in running])
        logits = self.runner.decode(input_ids, positions, tables, batch)
        self.metrics.batch_size.observe(len(running))
        self._served_decode(running)
        for request in running:
            request.cache_len += 1
            if request.cache_len % self.config.block_size == 0:
                self._register_full_blocks(request)
        self._take(running, self.sampler.sample(logits, [r.sampler for r in running]))
        self._compact()

    def _reserve_decode_blocks(self) -> None:
        """A block for every row whose next token starts one, the scheduler's most important rows first; when
        none is left, or the row's tenant holds its block cap, preempt the request the scheduler names until
        there is one (a row may preempt itself)."""
        size = self.config.block_size
        held = self._tenant_blocks() if self.scheduler.config.caps_blocks else None
        for request in self.scheduler.decode_order(self._running):
            while request.cache_len == len(request.blocks) * size and not request.preempted:
                capped = held is not None and self.scheduler.tenant_capped(request.tenant, held[request.tenant])
                block = None if capped else self.blocks.allocate(1)
                if block is not None:
                    request.blocks.extend(block)
                    if held is not None:
                        held[request.tenant] += 1
                    break
                candidates = [r for r in [*self._running, *self._prefilling] if not r.preempted]
                victim = self.scheduler.victim(candidates, request, tenant_capped=capped)
                if held is not None:
                    held[victim.tenant] -= len(victim.blocks)
                self._preempt(victim)
        self._drop_preempted()

    def _drop_preempted(self) -> None:
        """Take the requests preempted out of the decode batch."""
        for request in [r for r in self._running if r.preempted]:
            self._running.remove(request)
            request.preempted = False

    def _preempt(self, request: Request) -> None:
        """Release a request's blocks (full ones stay in the prefix cache) and queue it again, ahead of its
        level's fresh requests, to be recomputed from its prompt and generated tokens."""
        self.blocks.release(request.blocks)
        request.blocks, request.cache_len, request.block_hashes = [], 0, []
        if request in self._prefilling:
            self._prefilling.remove(request)
        else:
            request.preempted = True  # _drop_preempted takes it out of the decode batch
        self.metrics.preemptions.inc()
        self.metrics.observe_tenant_preemption(request.tenant)
        with self._cv:
            self.scheduler.requeue(request)
            self.metrics.requests_waiting.set(self.scheduler.num_waiting)

    def _adapter_batch(self, token_slots: list[int], head_slots: list[int] | None, keep: bool = False) -> AdapterBatch:
        """Describe a forward's adapters: token_slots for every token, head_slots for the positions the LM
        head sees (None: the same tokens, as in a decode step). `keep`: it serves many forwards (decode)."""
        slots = self.registry.slots
        device, merged = self.runner.device, self.merged_slot

        def describe(token_slots: list[int]) -> tuple[LoraBatch | None, SlotBatch | None]:
            lora = build_lora_batch(token_slots, slots.ranks, device, slots.num_slots, merged, keep=keep)
            slot_batch = build_slot_batch(
                token_slots, slots.num_slots, slots.vector_slots, slots.bottleneck_slots, device
            )
            return lora, slot_batch

        lora, slot_batch = describe(token_slots)
        if head_slots is None:
            return AdapterBatch(lora, slot_batch, lora, slot_batch)
        return AdapterBatch(lora, slot_batch, *describe(head_slots))

    def _decode_batch(self, row_slots: list[int]) -> AdapterBatch:
        """The decode step's adapter description, rebuilt only when the rows' slots or the slots' contents
        changed since the previous step (most steps reuse it: no host work, no host-to-device copies)."""
        slots = self.registry.slots
        key = (
            tuple(row_slots),
            self.merged_slot,
            tuple(slots.ranks),
            frozenset(slots.vector_slots),
            frozenset(slots.bottleneck_slots),
        )
        if key != self._decode_key:
            self._decode_key, self._decode_adapters = key, self._adapter_batch(row_slots, None, keep=True)
        return self._decode_adapters

    # ---- per-token bookkeeping ---------------------------------------------------------------------
    def _take(self, rows: list[Request], sampled: Sampled) -> None:
        """Hand each row its sampled token; a row whose output was not finite fails alone."""
        for i, request in enumerate(rows):
            if i in sampled.failed:
                self._finish(request, None, error=NonFiniteOutputError(_non_finite_message(request)))
            else:
                logprob = sampled.logprobs[i] if sampled.logprobs else None
                top = sampled.top_logprobs[i] if sampled.top_logprobs else []
                self._accept(request, sampled.tokens[i], logprob, top)

    def _accept(self, request: Request, token: int, logprob: float | None, top: list[tuple[int, float]]) -> None:
        """Record a sampled token, emit its output, and finish the request if it is done."""
        now = time.monotonic()
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.observe_first_token(request.adapter_id, now - request.arrival)
        request.generated.append(token)
        request.last_token = token
        if request.constraint is not None and not request.constraint.accept_token(token):
            self._finish(request, None, error=EngineStepError(f"the constraint refused token {token}"))
            return
        request.detokenizer.add(token)
        reason = self._finish_reason(request, token)
        if reason is not None:
            request.detokenizer.flush()
        output = RequestOutput(
            token_ids=[token],
            text=request.detokenizer.take_pending(final=reason is not None),
            logprobs=[logprob] if logprob is not None and request.params.logprobs else [],
            top_logprobs=[top] if request.params.top_logprobs else [],
            prompt_logprobs=self._take_prompt_logprobs(request),
            generated_tokens=len(request.generated),
            finish_reason=reason,
            stop_sequence=request.detokenizer.stop_sequence if reason is FinishReason.STOP_SEQUENCE else None,
        )
        if reason is None:
            request.sink(output)
        else:
            self._finish(request, reason, last_output=output)

    def _finish_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token in request.sampler.stop_ids and len(request.generated) >= params.min_new_tokens:
            return FinishReason.EOS
        if request.constraint is not None and request.constraint.is_terminated():
            return FinishReason.EOS  # the grammar is complete (also under ignore_eos or min_new_tokens)
        if request.detokenizer.stop_sequence is not None:
            return FinishReason.STOP_SEQUENCE
        if len(request.generated) >= params.max_new_tokens or request.cache_len + 1 > self.config.max_seq_len:
            return FinishReason.LENGTH
        return None

    def _finish(
        self,
        request: Request,
        reason: FinishReason | None,
        *,
        last_output: RequestOutput | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Emit the request's final output, release its adapter and mark its row for reuse."""
        if last_output is None:
            last_output = RequestOutput([], "", [], len(request.generated), finish_reason=reason, error=error)
        if request.blocks:
            # A failed request's K/V may hold NaN or inf: forget it and zero the blocks it alone held.
            self.runner.zero_blocks(self.blocks.release(request.blocks, keep_cached=error is None))
            request.blocks = []
        request.finished = True  # _compact drops it from the running lists
        if request.sampler is not None:
            self.sampler.release(request.sampler)
        self.scheduler.finished(request)
        if request.adapter is not None:
            self.registry.release(request.adapter, served=error is None)
        self.metrics.observe_finished(request, "error" if error is not None else reason.value, time.monotonic())
        request.sink(last_output)

    def _drop_cancelled(self) -> None:
        for request in [*self._prefilling, *self._running]:
            if request.cancelled:
                self._finish(request, FinishReason.CANCELLED)
        self._compact()

    def _compact(self) -> None:
        """Remove finished requests from the running lists."""
        self._prefilling = [r for r in self._prefilling if not r.finished]
        self._running = [r for r in self._running if not r.finished]

    def _abort_all(self) -> None:
        with self._cv:
            leftovers = [*self.scheduler.take_all(), *self._prefilling, *self._running]
        for request in leftovers:
            if not request.finished:
                self._finish(request, FinishReason.ABORTED)
        self._prefilling, self._running = [], []


def _non_finite_message(request: Request) -> str:
    source = f"adapter {request.adapter_id!r}" if request.adapter_id else "the base model with these parameters"
    return f"the output is not finite (nan or inf): {source} overflows for this request"
