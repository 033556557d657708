"""The scheduler: who waits, who runs next, whose prefill goes first and whom to preempt. It holds no tensors.

The engine loop owns the model and the KV pool and executes; the scheduler decides. It sees requests only
through `Schedulable` (tenant, priority, arrival order, prompt length, preemption count) and the engine's
state only through numbers and small callables (free batch places, whether an adapter is on the device, the
blocks a request needs and each tenant holds), so every policy is testable without a model
(tests/server/test_scheduler.py).

Policies (`Policy`)
- `fair` (the default): virtual token counters per tenant, after VTC (Sheng et al., "Fairness in Serving
  Large Language Models", OSDI 2024). A tenant is charged `prefill_weight` (1) per prompt token when its
  request is admitted and `decode_weight` (2) per token it generates. Waiting requests are admitted from the
  tenant with the smallest counter; FIFO holds within a tenant. A tenant that becomes active (its first
  waiting or running request after idling) is lifted to the smallest counter of the active tenants, so it
  gets no credit for the time it sent nothing. When no batch place is free, a waiting tenant below its share of
  the places (the places over the tenants with requests) that was served no more than a tenant above its
  share takes one of that tenant's places, preempting a request preempted no more often than the newcomer:
  a newcomer waits about one step, not for long requests of others to finish.
- `fifo`: arrival order across all tenants (the engine's behaviour before schedulers); no preemption on
  admission.
- `priority`: a higher `priority` goes first and, when no batch place is free, preempts the lowest-priority
  running request below it; within one priority level the fair policy applies. Under the other policies the
  priority is ignored.

Preemption is starvation-free: a preempted request goes back ahead of its tenant's requests of its level that
were preempted fewer times (fifo: ahead of every request preempted fewer times), and victims are chosen among
the requests of the lowest level preempted the fewest times first (then the most served tenant, then the newest
request), so a request preempted k times is chosen again only when every other candidate of its level was
preempted k times or more; a preemption for fair sharing takes only a request preempted no more often than
the one it makes room for.

Limits: per tenant, requests running (`max_running`), requests waiting (`max_queued`: over it `enqueue`
raises TenantLimitError, RESOURCE_EXHAUSTED, at once with a retry hint) and KV-cache blocks held
(`max_kv_blocks`); `overrides` sets them for named tenants.

Thread-safety: every public method takes the scheduler's own lock (submissions come from other threads);
it never calls back into the engine, so the engine may call it while holding its own lock.
"""

from __future__ import annotations

import enum
import heapq
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from deltaserve.server.errors import InvalidRequestError, TenantLimitError

# Inactive tenants whose counters are remembered (so that one cannot shed its debt by pausing); beyond this
# the smallest are forgotten. Active tenants are never forgotten.
MAX_REMEMBERED_TENANTS = 4096
RETRY_AFTER_RANGE = (1.0, 60.0)  # seconds: the retry hint of a refusal stays within this


class Policy(enum.StrEnum):
    FAIR = "fair"
    FIFO = "fifo"
    PRIORITY = "priority"


class Schedulable(Protocol):
    """What the scheduler reads of a request (the engine's Request has these)."""

    tenant: str
    priority: int  # higher goes first (under the priority policy)
    order: int  # arrival order, unique and increasing
    preemptions: int  # times it lost its blocks and was queued again
    prompt_ids: list[int]


@dataclass(frozen=True)
class TenantLimits:
    """Caps for one tenant; None: unlimited."""

    max_running: int | None = None
    max_queued: int | None = None
    max_kv_blocks: int | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    policy: Policy = Policy.FAIR
    limits: TenantLimits = TenantLimits()  # every tenant's, unless overridden
    overrides: Mapping[str, TenantLimits] = field(default_factory=dict)  # tenant -> its own limits
    prefill_weight: float = 1.0  # counter charge per prompt token (VTC's w_p)
    decode_weight: float = 2.0  # counter charge per generated token (VTC's w_q)

    def limits_of(self, tenant: str) -> TenantLimits:
        return self.overrides.get(tenant, self.limits)

    @property
    def caps_blocks(self) -> bool:
        """Whether any tenant has a KV-block cap (the engine then counts the blocks each tenant holds)."""
        limits = [self.limits, *self.overrides.values()]
        return any(limit.max_kv_blocks is not None for limit in limits)


@dataclass(frozen=True)
class Plan:
    """One step's admission: the requests to place, in order, and the running requests to preempt first."""

    admit: list[Schedulable]
    preempt: list[Schedulable]


@dataclass
class _Tenant:
    waiting: list[Schedulable] = field(default_factory=list)  # in precedence order (see `_within`)
    running: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or SchedulerConfig()
        self._clock = clock
        self._lock = threading.RLock()
        self._tenants: dict[str, _Tenant] = {}  # tenants with waiting or running requests
        self._counters: dict[str, float] = {}  # virtual token counters (fair, priority)
        self._running: dict[Schedulable, float] = {}  # running request -> when it was admitted
        self._waiting_count = 0
        self._charged: set[Schedulable] = set()  # requests whose prompt was charged (not charged again)
        self._charged_now: set[Schedulable] = set()  # charged by the latest plan (refunded if not placed)
        self._service_time = 0.0  # moving average of admission-to-finish seconds (the retry hint)
        self._rows = 0  # batch places, as the latest plan saw them
        self._richest: int | None = None  # the most places a tenant holds, within a plan (None: to compute)
        self.on_preempt_choice: Callable[[Schedulable], None] | None = None  # tests: sees each victim

    # ---- the queue (any thread) ----------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._waiting_count

    def enqueue(self, request: Schedulable) -> None:
        """Queue a new request; TenantLimitError when its tenant has `max_queued` waiting already."""
        with self._lock:
            tenant = self._tenants.get(request.tenant)
            limit = self.config.limits_of(request.tenant).max_queued
            if limit is not None and tenant is not None and len(tenant.waiting) >= limit:
                retry = self._retry_after(len(tenant.waiting), tenant.running)
                raise TenantLimitError(
                    f"tenant {request.tenant or '(base)'!r} has {len(tenant.waiting)} requests queued, its limit; "
                    f"retry in about {retry:.0f} s",
                    retry_after=retry,
                )
            self._insert(self._activate(request.tenant), request)

    def check_fits(self, request: Schedulable, blocks: int) -> None:
        """InvalidRequestError when `blocks` exceed the tenant's block cap: it could never run."""
        cap = self.config.limits_of(request.tenant).max_kv_blocks
        if cap is not None and blocks > cap:
            raise InvalidRequestError(
                f"the request needs {blocks} KV-cache blocks, more than its tenant may hold ({cap}); shorten the "
                "prompt or max_new_tokens"
            )

    def requeue(self, request: Schedulable) -> None:
        """A running request that was preempted goes back to waiting (no limit applies)."""
        with self._lock:
            self._leave_running(request)
            request.preemptions += 1
            self._insert(self._activate(request.tenant), request)

    def remove_waiting(self, predicate: Callable[[Schedulable], bool]) -> list[Schedulable]:
        """Take the waiting requests for which `predicate` holds (e.g. cancelled ones) out of the queue."""
        with self._lock:
            taken = []
            for name, tenant in list(self._tenants.items()):
                kept = [r for r in tenant.waiting if not predicate(r)]
                taken += [r for r in tenant.waiting if predicate(r)]
                tenant.waiting = kept
                self._forget_if_idle(name)
            self._waiting_count -= len(taken)
            for request in taken:
                self._charged.discard(request)
            return taken

    def take_all(self) -> list[Schedulable]:
        """Empty the scheduler (shutdown, a dead engine): the waiting requests, in precedence order."""
        with self._lock:
            waiting = [r for tenant in self._tenants.values() for r in tenant.waiting]
            self._tenants.clear()
            self._running.clear()
            self._charged.clear()
            self._charged_now.clear()
            self._waiting_count = 0
            return sorted(waiting, key=self._precedence)

    def waiting_by_tenant(self) -> dict[str, int]:
        with self._lock:
            return {name: len(t.waiting) for name, t in self._tenants.items() if t.waiting}

    def running_by_tenant(self) -> dict[str, int]:
        with self._lock:
            return {name: t.running for name, t in self._tenants.items() if t.running}

    def counter(self, tenant: str) -> float:
        """The tenant's virtual token counter (0 for one never seen since the engine was last idle)."""
        return self._counters.get(tenant, 0.0)

    # ---- planning (engine thread) --------------------------------------------------------------------
    def plan(
        self,
        free_rows: int,
        ready: Callable[[Schedulable], bool] = lambda request: True,
        blocks_needed: Callable[[Schedulable], int] = lambda request: 0,
        tenant_blocks: Mapping[str, int] | None = None,
    ) -> Plan:
        """Choose the waiting requests to admit into `free_rows` batch places, in order, and the running ones to
        preempt for them. A request is eligible when `ready` (its adapter is on the device) and its tenant is
        under its running and block caps. Admitted requests count as running and their prompts are charged;
        the engine gives back the ones it cannot place (`unplace`)."""
        with self._lock:
            self._charged_now.clear()
            self._rows = free_rows + len(self._running)
            self._richest = None
            if not self._waiting_count or not self._may_preempt_any(free_rows):
                return Plan([], [])  # nothing waits, or a full batch no one may enter: nothing to scan
            held = dict(tenant_blocks or {})
            heads: list[tuple[tuple, int, str, Schedulable]] = []
            tick = 0  # unique heap tiebreak: requests do not compare

            def push(name: str) -> None:
                nonlocal tick
                head = self._eligible_head(name, ready, blocks_needed, held)
                if head is not None:
                    heapq.heappush(heads, (self._precedence(head), tick, name, head))
                    tick += 1

            for name in self._tenants:
                push(name)
            admitted: list[Schedulable] = []
            victims: list[Schedulable] = []
            while heads:
                _, _, name, head = heapq.heappop(heads)
                if free_rows <= 0 and not self._may_preempt_for(head):
                    continue  # no place for this tenant; another one might take one
                if free_rows <= 0:
                    victim = self._admission_victim(head, {*victims, *admitted})
                    if victim is None:
                        continue  # this tenant cannot take a place; another one might
                    victims.append(victim)
                    self._leave_running(victim)  # its place is this request's
                    self._richest = None
                    free_rows += 1
                self._admit(head)
                self._richest = None
                held[name] = held.get(name, 0) + blocks_needed(head)
                admitted.append(head)
                free_rows -= 1
                push(name)
            for victim in victims:  # requeue() counts them as running until the engine preempts them
                self._running[victim] = self._clock()
                self._tenants[victim.tenant].running += 1
            return Plan(admitted, victims)

    def unplace(self, requests: Iterable[Schedulable]) -> None:
        """Admitted requests the engine could not place (no free blocks): back to waiting, prompt charge refunded."""
        with self._lock:
            for request in requests:
                self._leave_running(request)
                if request in self._charged_now:
                    self._charged_now.discard(request)
                    self._charged.discard(request)
                    self._charge(request.tenant, -self.config.prefill_weight * len(request.prompt_ids))
                self._insert(self._activate(request.tenant), request)

    def prefill_order(self, prefilling: list[Schedulable]) -> list[Schedulable]:
        """The order in which requests in prefill take the step's prompt-token budget."""
        with self._lock:
            if self.config.policy is Policy.FIFO:
                return list(prefilling)
            return sorted(prefilling, key=self._precedence)

    def decode_order(self, running: list[Schedulable]) -> list[Schedulable]:
        """Most important first: the order in which rows get a fresh KV block before anyone is preempted."""
        with self._lock:
            return sorted(running, key=self._precedence)

    def victim(self, candidates: list[Schedulable], needy: Schedulable, tenant_capped: bool = False) -> Schedulable:
        """Whom to preempt so that `needy` gets a block: the least important candidate, among `needy`'s own
        tenant's requests when the tenant is at its block cap (`needy` itself may be the one)."""
        with self._lock:
            if tenant_capped:
                candidates = [r for r in candidates if r.tenant == needy.tenant] or [needy]
            chosen = max(candidates, key=self._victim_rank)
            if self.on_preempt_choice is not None:
                self.on_preempt_choice(chosen)
            return chosen

    def tenant_capped(self, tenant: str, held: int) -> bool:
        cap = self.config.limits_of(tenant).max_kv_blocks
        return cap is not None and held >= cap

    # ---- accounting (engine thread) ------------------------------------------------------------------
    def charge_generated(self, request: Schedulable, tokens: int = 1) -> None:
        """Charge `tokens` generated tokens to the request's tenant."""
        if tokens:
            with self._lock:
                self._charge(request.tenant, self.config.decode_weight * tokens)

    def charge_tenants(self, tokens: Mapping[str, int]) -> None:
        """Charge generated tokens to tenants at once (a decode step: tenant -> its rows)."""
        with self._lock:
            for tenant, count in tokens.items():
                self._charge(tenant, self.config.decode_weight * count)

    def finished(self, request: Schedulable) -> None:
        """The request left the engine (done, cancelled, failed): it holds no place any more."""
        with self._lock:
            admitted_at = self._running.get(request)
            if admitted_at is not None:
                spent = self._clock() - admitted_at
                self._service_time = spent if not self._service_time else 0.9 * self._service_time + 0.1 * spent
            self._leave_running(request)
            self._charged.discard(request)
            self._charged_now.discard(request)
            tenant = self._tenants.get(request.tenant)
            if tenant is not None and request in tenant.waiting:
                tenant.waiting.remove(request)
                self._waiting_count -= 1
            self._forget_if_idle(request.tenant)

    # ---- internals (under the lock) ------------------------------------------------------------------
    def _activate(self, name: str) -> _Tenant:
        """The tenant's state; one becoming active is lifted to the smallest counter of the active tenants."""
        tenant = self._tenants.get(name)
        if tenant is not None:
            return tenant
        if self._tenants:
            floor = min(self._counters.get(other, 0.0) for other in self._tenants)
            self._counters[name] = max(self._counters.get(name, 0.0), floor)
        else:  # the engine was idle: nobody is owed anything
            self._counters.clear()
            self._counters[name] = 0.0
        self._tenants[name] = tenant = _Tenant()
        self._bound_memory()
        return tenant

    def _bound_memory(self) -> None:
        inactive = [name for name in self._counters if name not in self._tenants]
        if len(inactive) > MAX_REMEMBERED_TENANTS:
            inactive.sort(key=lambda name: self._counters[name])
            for name in inactive[: len(inactive) - MAX_REMEMBERED_TENANTS]:
                del self._counters[name]

    def _forget_if_idle(self, name: str) -> None:
        tenant = self._tenants.get(name)
        if tenant is not None and not tenant.waiting and not tenant.running:
            del self._tenants[name]

    def _within(self, request: Schedulable) -> tuple:
        """Order inside one tenant's queue: higher level, then the most preempted, then arrival (FIFO)."""
        return (-self._level(request), -request.preemptions, request.order)

    def _level(self, request: Schedulable) -> int:
        return request.priority if self.config.policy is Policy.PRIORITY else 0

    def _precedence(self, request: Schedulable) -> tuple:
        """Order across tenants, smallest first. fifo: the preempted first, then arrival. fair and priority: the
        level, then the least served tenant (fewer places on a tie), then arrival. A preempted request goes first
        within its tenant (`_within`), not across tenants: there its tenant's share decides."""
        if self.config.policy is Policy.FIFO:
            return (-request.preemptions, request.order)
        tenant = self._tenants.get(request.tenant)
        running = tenant.running if tenant is not None else 0
        counter = self._counters.get(request.tenant, 0.0)
        return (-self._level(request), counter, running, request.order)

    def _victim_rank(self, request: Schedulable) -> tuple:
        """Largest is preempted first: lowest level, fewest preemptions, most served tenant, newest."""
        counter = 0.0 if self.config.policy is Policy.FIFO else self._counters.get(request.tenant, 0.0)
        return (-self._level(request), -request.preemptions, counter, request.order)

    def _insert(self, tenant: _Tenant, request: Schedulable) -> None:
        key = self._within(request)
        index = len(tenant.waiting)
        while index > 0 and self._within(tenant.waiting[index - 1]) > key:  # new arrivals go last: O(1)
            index -= 1
        tenant.waiting.insert(index, request)
        self._waiting_count += 1

    def _eligible_head(
        self,
        name: str,
        ready: Callable[[Schedulable], bool],
        blocks_needed: Callable[[Schedulable], int],
        held: Mapping[str, int],
    ) -> Schedulable | None:
        """The tenant's first waiting request that may run now, or None (its caps are reached, or no adapter
        of its requests is on the device yet)."""
        tenant = self._tenants[name]
        limits = self.config.limits_of(name)
        if limits.max_running is not None and tenant.running >= limits.max_running:
            return None
        for request in tenant.waiting:
            if not ready(request):
                continue
            if limits.max_kv_blocks is not None and held.get(name, 0) + blocks_needed(request) > limits.max_kv_blocks:
                return None  # FIFO within the tenant: a later, smaller request does not overtake
            return request
        return None

    def _may_preempt_any(self, free_rows: int) -> bool:
        """Whether a plan with `free_rows` places can admit anyone (places are free, or a preemption may be)."""
        if free_rows > 0:
            return True
        if self.config.policy is Policy.FIFO:
            return False
        if self.config.policy is Policy.PRIORITY and self._running:
            return True
        return self._richest_running() > self._row_share()

    def _may_preempt_for(self, head: Schedulable) -> bool:
        """A cheap test before `_admission_victim`'s scan: whether any preemption could be for `head`."""
        if self.config.policy is Policy.FIFO:
            return False
        if self.config.policy is Policy.PRIORITY and self._running:
            return True
        share = self._row_share()
        return self._tenants[head.tenant].running < share and self._richest_running() > share

    def _richest_running(self) -> int:
        """The most places one tenant holds (cached for a plan until an admission or a preemption)."""
        if self._richest is None:
            self._richest = max((t.running for t in self._tenants.values()), default=0)
        return self._richest

    def _row_share(self) -> int:
        """A tenant's fair share of the batch places: the places over the tenants with requests, at least 1."""
        return max(1, self._rows // max(1, len(self._tenants)))

    def _admission_victim(self, head: Schedulable, chosen: set[Schedulable]) -> Schedulable | None:
        """A running request whose place `head` may take now that no place is free, or None (`chosen`: the
        plan's victims and admitted requests, which are not candidates)."""
        if self.config.policy is Policy.FIFO:
            return None
        candidates = [r for r in self._running if r not in chosen]
        if self.config.policy is Policy.PRIORITY:
            lower = [r for r in candidates if r.priority < head.priority]
            if lower:
                return max(lower, key=self._victim_rank)
        share = self._row_share()
        if self._tenants[head.tenant].running >= share:
            return None
        # A tenant below its share of the places takes one from a tenant above its share that it has not
        # out-consumed, and only a request preempted no more often than its own (so a request loses its place
        # at most once more than the newcomers it makes room for: none loses it to them forever).
        level = self._level(head)
        counter = self._counters.get(head.tenant, 0.0)
        richer = [
            r
            for r in candidates
            if r.tenant != head.tenant
            and r.preemptions <= head.preemptions
            and self._level(r) == level
            and self._tenants[r.tenant].running > share
            and self._counters.get(r.tenant, 0.0) >= counter
        ]
        if not richer:
            return None
        most = max(self._tenants[r.tenant].running for r in richer)
        return max((r for r in richer if self._tenants[r.tenant].running == most), key=self._victim_rank)

    def _admit(self, request: Schedulable) -> None:
        tenant = self._tenants[request.tenant]
        tenant.waiting.remove(request)
        self._waiting_count -= 1
        tenant.running += 1
        self._running[request] = self._clock()
        if request.preemptions == 0 and request not in self._charged:
            self._charged.add(request)
            self._charged_now.add(request)
            self._charge(request.tenant, self.config.prefill_weight * len(request.prompt_ids))

    def _leave_running(self, request: Schedulable) -> None:
        if self._running.pop(request, None) is not None:
            self._tenants[request.tenant].running -= 1

    def _charge(self, tenant: str, amount: float) -> None:
        self._counters[tenant] = self._counters.get(tenant, 0.0) + amount

    def _retry_after(self, queued: int, running: int) -> float:
        """Seconds until the tenant's queue likely has room: its queue over the places it runs in, times the
        typical request's time in the engine (a moving average), within RETRY_AFTER_RANGE."""
        low, high = RETRY_AFTER_RANGE
        per = self._service_time or low
        return float(min(high, max(low, math.ceil(per * queued / max(1, running)))))


LIMIT_KEYS = ("max_running", "max_queued", "max_kv_blocks")
MAX_OVERRIDES = 100_000  # tenants one limits file may name
TENANT_NAME_CHARS = 128


def tenant_overrides(data: object) -> dict[str, TenantLimits]:
    """Per-tenant limits from a parsed JSON object `{tenant: {"max_running": n, "max_queued": n,
    "max_kv_blocks": n}}` (each key optional, null: unlimited); ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("the tenant limits must be a JSON object: {tenant: {limit: value}}")
    if len(data) > MAX_OVERRIDES:
        raise ValueError(f"at most {MAX_OVERRIDES} tenants, got {len(data)}")
    overrides = {}
    for tenant, limits in data.items():
        if len(tenant) > TENANT_NAME_CHARS:
            raise ValueError(f"tenant name {tenant[:32]!r}... is longer than {TENANT_NAME_CHARS} characters")
        if not isinstance(limits, dict) or not set(limits) <= set(LIMIT_KEYS):
            raise ValueError(f"tenant {tenant!r}: give an object with some of {', '.join(LIMIT_KEYS)}")
        for key, value in limits.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"tenant {tenant!r}: {key} must be a positive integer or null, got {value!r}")
        overrides[tenant] = TenantLimits(**limits)
    return overrides
