"""The engine: one thread owns the model and runs the continuous-batching step loop.

Each step admits waiting requests (prefill, first token) while cache rows are free, then decodes one
token for every running request in a single batched forward. Finished or cancelled requests leave between
steps and free their row at once; rows stay compact (0..B-1) by moving the last row into a hole.
Other threads talk to the engine only through `submit`, `Request.cancel` and each request's sink.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from deltaserve.server.engine.detokenizer import IncrementalDetokenizer
from deltaserve.server.engine.request import FINISHED_ROW, NO_ROW, FinishReason, Request, RequestOutput
from deltaserve.server.engine.sampling import RowState, Sampled, make_generator, sample
from deltaserve.server.errors import (
    CapacityError,
    EngineFailedError,
    EngineStepError,
    EngineStoppedError,
    NonFiniteOutputError,
)
from deltaserve.server.metrics import Metrics
from deltaserve.server.model.layers import PAD_SLOT, LoraBatch, SlotBatch, build_lora_batch, build_slot_batch
from deltaserve.server.model.runner import NO_ADAPTERS, NO_SOFT_PROMPT, AdapterBatch, ModelRunner
from deltaserve.server.residency.registry import AdapterRecord, AdapterRegistry
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int
    max_seq_len: int
    eos_token_ids: tuple[int, ...]
    max_prefill_tokens: int = 4096  # padded prompt tokens per prefill forward (bounds its activation memory)
    max_waiting: int = 1024  # requests queued beyond the running batch; more are refused (RESOURCE_EXHAUSTED)


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
        self._eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=runner.device)
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
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
        with self._cv:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down and accepts no new requests")
            if len(self._waiting) >= self.config.max_waiting:
                raise CapacityError(f"the request queue is full ({self.config.max_waiting} waiting); retry later")
            self._waiting.append(request)
            self.metrics.requests_waiting.set(len(self._waiting))
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
        return len(self._running)

    def kv_cache_usage(self) -> float:
        """Occupied cache positions over capacity (a scrape-time estimate, read without locking)."""
        used = sum(request.cache_len for request in list(self._running))
        return used / (self.config.max_batch_size * self.config.max_seq_len)

    # ---- the loop (engine thread) ------------------------------------------------------------------
    def _loop(self) -> None:
        try:
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
            waiting = list(self._waiting)
            self._waiting.clear()
        self._cancel_commands(commands)
        dead = EngineFailedError("the engine failed and is restarting; retry the request")
        for request in [*waiting, *self._running]:
            if request.row != FINISHED_ROW:
                with contextlib.suppress(Exception):  # the state that broke the loop may break this too
                    request.row = NO_ROW  # its cache row is not touched again
                    self._finish(request, None, error=dead)
        self._running = []
        self.on_death(err)

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._running and not self._commands and self._accepting:
                    self._cv.wait()
                commands, self._commands = self._commands, []
                if self._abort_at is not None and (
                    time.monotonic() >= self._abort_at or not (self._waiting or self._running)
                ):
                    self._cancel_commands(commands)
                    break
                admitted = self._take_admissible()
            self._run_commands(commands)
            if not admitted and not self._running:
                with self._cv:
                    if not self._commands:
                        # Everything queued waits for its adapter to reach the device: sleep until the
                        # residency thread (or a submit, cancel or command) wakes the loop.
                        self._cv.wait(timeout=0.5)
                continue
            try:
                self._step(admitted)
            except Exception:  # a bug or device failure: fail what was in flight, keep serving
                log.exception("engine step failed for requests %s", [r.request_id for r in [*admitted, *self._running]])
                for request in [*admitted, *self._running]:
                    if request.row != FINISHED_ROW:
                        # The detail stays in the log: a client sees no library text or server path.
                        failure = EngineStepError(f"internal error in the engine step (request {request.request_id})")
                        self._finish(request, None, error=failure)
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

    def _take_admissible(self) -> list[Request]:
        """Queued requests that can run now, in arrival order: their adapter holds a device slot (others keep
        waiting while the residency thread brings theirs in). Cancelled or failed ones are taken too (to be
        finished) but do not use up a free row."""
        free = self.config.max_batch_size - len(self._running)
        admitted, kept, rows = [], deque(), 0
        while self._waiting:
            request = self._waiting.popleft()
            done = request.cancelled or (request.adapter is not None and request.adapter.load_error is not None)
            if done or (rows < free and (request.adapter is None or request.adapter.slot >= 0)):
                admitted.append(request)
                rows += not done
            else:
                kept.append(request)
        self._waiting = kept
        self.metrics.requests_waiting.set(len(self._waiting))
        return admitted

    def _step(self, admitted: list[Request]) -> None:
        self._drop_cancelled()
        runnable = []
        for request in admitted:
            if request.cancelled:
                self._finish(request, FinishReason.CANCELLED)
            elif request.adapter is not None and request.adapter.load_error is not None:
                self._finish(request, None, error=request.adapter.load_error)
            else:
                runnable.append(request)
        for group in self._prefill_groups(runnable):
            self._prefill(group)
            if self.admission_observer is not None:  # between forwards: it may merge or unmerge
                for request in group:
                    self.admission_observer(request.adapter_id)
        if self._running:
            self._decode()
        self.metrics.requests_running.set(len(self._running))

    def _prefill_groups(self, requests: list[Request]) -> list[list[Request]]:
        """Split admitted requests into prefill forwards of at most `max_prefill_tokens` padded tokens,
        grouping similar prompt lengths so that little is spent on padding."""
        groups: list[list[Request]] = []
        for request in sorted(requests, key=lambda r: r.sequence_len):
            group = groups[-1] if groups else None
            # Sorted by length, so this request is the longest of the group: it sets the padded size.
            if group and (len(group) + 1) * request.sequence_len <= self.config.max_prefill_tokens:
                group.append(request)
            else:
                groups.append([request])
        return groups

    def _prefill(self, group: list[Request]) -> None:
        """Prefill a group of new requests in one forward, give each its own cache row and first token."""
        slots = self.registry.slots
        soft = [slots.prompts[r.slot] if r.slot >= 0 else NO_SOFT_PROMPT for r in group]
        lengths = [s.virtual_length + len(r.prompt_ids) for s, r in zip(soft, group, strict=True)]
        span = max(lengths)
        token_slots = [
            slot for r, n in zip(group, lengths, strict=True) for slot in [r.slot] * n + [PAD_SLOT] * (span - n)
        ]
        batch = self._adapter_batch(token_slots, [r.slot for r in group])
        rows = list(range(len(self._running), len(self._running) + len(group)))
        logits = self.runner.prefill(rows, [r.prompt_ids for r in group], batch, soft)
        now = time.monotonic()
        device = self.runner.device
        for request, row, prompt, length in zip(group, rows, soft, lengths, strict=True):
            request.row = row
            request.cache_len = prompt.prefix_length + length
            request.sampler = RowState(
                request.params, make_generator(request.params, device), list(request.prompt_ids), 0
            )
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, request.params.stop)
            request.prefilled_at = now
            self.metrics.observe_queue(request.adapter_id, now - request.arrival)
            self._running.append(request)
        self._take(group, sample(logits, [r.sampler for r in group], self._eos))
        self._compact()

    def _decode(self) -> None:
        running = self._running
        device = self.runner.device
        input_ids = torch.tensor([r.last_token for r in running], device=device)
        positions = torch.tensor([r.cache_len for r in running], device=device)
        batch = self._decode_batch([r.slot for r in running])
        logits = self.runner.decode(input_ids, positions, max(r.cache_len for r in running), batch)
        self.metrics.batch_size.observe(len(running))
        for request in running:
            request.cache_len += 1
        self._take(running, sample(logits, [r.sampler for r in running], self._eos))
        self._compact()

    def _adapter_batch(self, token_slots: list[int], head_slots: list[int] | None) -> AdapterBatch:
        """Describe a forward's adapters: token_slots for every token, head_slots for the positions the LM
        head sees (None: the same tokens, as in a decode step)."""
        slots = self.registry.slots
        device, merged = self.runner.device, self.merged_slot

        def describe(token_slots: list[int]) -> tuple[LoraBatch | None, SlotBatch | None]:
            lora = build_lora_batch(token_slots, slots.ranks, device, slots.num_slots, merged)
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
            self._decode_key, self._decode_adapters = key, self._adapter_batch(row_slots, None)
        return self._decode_adapters

    # ---- per-token bookkeeping ---------------------------------------------------------------------
    def _take(self, rows: list[Request], sampled: Sampled) -> None:
        """Hand each row its sampled token; a row whose output was not finite fails alone."""
        for i, request in enumerate(rows):
            if i in sampled.failed:
                self._finish(request, None, error=NonFiniteOutputError(_non_finite_message(request)))
            else:
                self._accept(request, sampled.tokens[i], sampled.logprobs[i] if sampled.logprobs else None)

    def _accept(self, request: Request, token: int, logprob: float | None) -> None:
        """Record a sampled token, emit its output, and finish the request if it is done."""
        now = time.monotonic()
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.observe_first_token(request.adapter_id, now - request.arrival)
        request.generated.append(token)
        request.last_token = token
        request.sampler.generated += 1
        request.sampler.seen_tokens.append(token)
        request.detokenizer.add(token)
        reason = self._finish_reason(request, token)
        if reason is not None:
            request.detokenizer.flush()
        output = RequestOutput(
            token_ids=[token],
            text=request.detokenizer.take_pending(final=reason is not None),
            logprobs=[logprob] if logprob is not None and request.params.logprobs else [],
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
        if token in self.config.eos_token_ids and len(request.generated) >= params.min_new_tokens:
            return FinishReason.EOS
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
        if request.row >= 0:
            self.runner.clear_row(request.row, request.cache_len)
        request.row = FINISHED_ROW  # _compact drops it from the running list
        if request.adapter is not None:
            self.registry.release(request.adapter, served=error is None)
        self.metrics.observe_finished(request, "error" if error is not None else reason.value, time.monotonic())
        request.sink(last_output)

    def _drop_cancelled(self) -> None:
        for request in self._running:
            if request.cancelled:
                self._finish(request, FinishReason.CANCELLED)
        self._compact()

    def _compact(self) -> None:
        """Remove finished requests and fill the holes they leave with the highest rows."""
        survivors = [r for r in self._running if r.row != FINISHED_ROW]
        if len(survivors) == len(self._running):
            return
        count = len(survivors)
        occupied = {r.row for r in survivors}
        holes = [row for row in range(count) if row not in occupied]
        movers = sorted((r for r in survivors if r.row >= count), key=lambda r: r.row)
        for hole, request in zip(holes, movers, strict=True):
            self.runner.move_row(request.row, hole, request.cache_len)
            self.runner.clear_row(request.row, request.cache_len)
            request.row = hole
        self._running = sorted(survivors, key=lambda r: r.row)

    def _abort_all(self) -> None:
        with self._cv:
            leftovers = [*self._waiting, *self._running]
            self._waiting.clear()
        for request in leftovers:
            if request.row != FINISHED_ROW:
                self._finish(request, FinishReason.ABORTED)
        self._running = []


def _non_finite_message(request: Request) -> str:
    source = f"adapter {request.adapter_id!r}" if request.adapter_id else "the base model with these parameters"
    return f"the output is not finite (nan or inf): {source} overflows for this request"
