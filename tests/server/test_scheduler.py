"""The scheduler's policies on their own, without a model: a small step simulator stands in for the engine loop
(batch places, a KV-block pool, one token per running request per step) and drives the real Scheduler through
the same calls the engine makes (plan, preempt/requeue, unplace, victim, charge_generated, finished)."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from deltaserve.server.engine.scheduler import (
    Policy,
    Scheduler,
    SchedulerConfig,
    TenantLimits,
    tenant_overrides,
)
from deltaserve.server.errors import InvalidRequestError, TenantLimitError

BLOCK = 16


@dataclass(eq=False)
class Job:
    """A request as the scheduler sees it, plus what the simulator tracks."""

    tenant: str
    prompt_ids: list[int]
    output: int  # tokens to generate
    order: int
    priority: int = 0
    preemptions: int = 0
    generated: int = 0
    blocks: int = 0
    arrived: int = 0
    admitted: int | None = None  # step of the first admission
    done: int | None = None


@dataclass
class Sim:
    """The engine's loop in miniature: each step plans, preempts, admits while blocks are free, prefills the
    admitted (their first token), decodes one token for the others, and finishes what is done."""

    scheduler: Scheduler
    rows: int
    blocks: int = 10**9  # free blocks in the pool
    step_no: int = 0
    running: list[Job] = field(default_factory=list)
    served: Counter = field(default_factory=Counter)  # tenant -> generated tokens
    charged: Counter = field(default_factory=Counter)  # tenant -> VTC service (w_p prompt + w_d generated)
    finished: list[Job] = field(default_factory=list)
    orders: int = 0

    def submit(self, tenant: str, prompt: int, output: int, priority: int = 0) -> Job:
        job = Job(tenant, [1] * prompt, output, self.orders, priority, arrived=self.step_no)
        self.orders += 1
        self.scheduler.enqueue(job)
        return job

    def need(self, job: Job) -> int:
        return math.ceil((len(job.prompt_ids) + job.generated + 1) / BLOCK)

    def preempt(self, job: Job) -> None:
        self.running.remove(job)
        self.blocks += job.blocks
        job.blocks = 0
        self.scheduler.requeue(job)

    def held(self) -> Counter:
        held: Counter = Counter()
        for job in self.running:
            held[job.tenant] += job.blocks
        return held

    def step(self) -> None:
        scheduler = self.scheduler
        plan = scheduler.plan(self.rows - len(self.running), blocks_needed=self.need, tenant_blocks=self.held())
        assert len(self.running) - len(plan.preempt) + len(plan.admit) <= self.rows
        for victim in plan.preempt:
            self.preempt(victim)
        fresh = []
        for index, job in enumerate(plan.admit):
            if self.need(job) > self.blocks:
                scheduler.unplace(plan.admit[index:])
                break
            job.blocks = self.need(job)
            self.blocks -= job.blocks
            if job.admitted is None:
                job.admitted = self.step_no
                self.charged[job.tenant] += scheduler.config.prefill_weight * len(job.prompt_ids)
            self.running.append(job)
            fresh.append(job)
        for job in scheduler.decode_order([j for j in self.running if j not in fresh]):
            if job not in self.running:
                continue  # preempted for a block earlier in this step
            while math.ceil((len(job.prompt_ids) + job.generated + 1) / BLOCK) > job.blocks:
                if self.blocks > 0:
                    self.blocks -= 1
                    job.blocks += 1
                    continue
                victim = scheduler.victim(list(self.running), job)
                self.preempt(victim)
                if victim is job:
                    break
        for job in list(self.running):  # prefilled ones sample their first token, the others decode one
            job.generated += 1
            scheduler.charge_generated(job, 1)
            self.served[job.tenant] += 1
            self.charged[job.tenant] += scheduler.config.decode_weight
            if job.generated >= job.output:
                job.done = self.step_no
                self.running.remove(job)
                self.blocks += job.blocks
                scheduler.finished(job)
                self.finished.append(job)
        self.step_no += 1

    def waiting(self, tenant: str) -> int:
        return self.scheduler.waiting_by_tenant().get(tenant, 0)


def keep_backlogged(sim: Sim, tenant: str, prompt: int, output: int, depth: int = 8) -> None:
    while sim.waiting(tenant) < depth:
        sim.submit(tenant, prompt, output)


# ---- fair: shares between backlogged tenants -----------------------------------------------------------
def run_two_backlogged(policy: Policy, steps: int = 600) -> tuple[Sim, float, float]:
    """A's requests are 4x longer than B's; A's backlog is queued first. Returns the sim, B's share of the
    service (VTC's weighted tokens: prompt + 2 x generated) and the largest service gap seen while both were
    backlogged."""
    sim = Sim(Scheduler(SchedulerConfig(policy)), rows=8)
    for _ in range(24):
        sim.submit("A", 20, 64)
    for _ in range(24):
        sim.submit("B", 20, 16)
    gap = 0.0
    for _ in range(steps):
        keep_backlogged(sim, "A", 20, 64)
        keep_backlogged(sim, "B", 20, 16)
        sim.step()
        gap = max(gap, abs(sim.charged["A"] - sim.charged["B"]))
    share = sim.charged["B"] / (sim.charged["A"] + sim.charged["B"])
    return sim, share, gap


def test_backlogged_tenants_get_token_shares_within_the_vtc_bound():
    """VTC's bound on the service gap between backlogged clients: 2 * max(w_p * L_input, w_d * M), M the tokens a
    batch can hold. Here M = 8 rows * (20 + 64) positions; the gap is charged service (prompt + 2 x output)."""
    _, share, gap = run_two_backlogged(Policy.FAIR)
    config = SchedulerConfig()
    bound = 2 * max(config.prefill_weight * 20, config.decode_weight * 8 * (20 + 64))
    assert gap <= bound, (gap, bound)
    assert 0.45 <= share <= 0.55, share


def test_fifo_gives_the_tenant_queued_second_almost_nothing():
    """The same trace under fifo: the issue's measurement (B's share 0), which the fair test must not pass."""
    _, share, _ = run_two_backlogged(Policy.FIFO, steps=150)
    assert share < 0.1, share


def test_ten_tenants_share_evenly():
    sim = Sim(Scheduler(), rows=8)
    tenants = [f"t{i}" for i in range(10)]
    for _ in range(400):
        for i, tenant in enumerate(tenants):
            keep_backlogged(sim, tenant, 10 + 5 * i, 8 + 6 * i, depth=3)
        sim.step()
    charged = [sim.charged[t] for t in tenants]
    assert max(charged) - min(charged) <= 2 * 2 * 8 * (55 + 62), charged
    assert max(charged) / min(charged) < 1.25, charged


# ---- fair: a newcomer ------------------------------------------------------------------------------------
def test_a_newcomer_gets_a_place_at_the_next_step_and_no_credit_for_its_idle_time():
    sim = Sim(Scheduler(), rows=8)
    for _ in range(300):
        keep_backlogged(sim, "A", 20, 32)
        sim.step()
    counter_a = sim.scheduler.counter("A")
    assert counter_a > 1000
    served_a = sim.served["A"]
    b = sim.submit("B", 20, 16)
    # Lifted to the least counter of the active tenants (A's): no credit for the 300 steps it sent nothing.
    assert sim.scheduler.counter("B") == counter_a
    keep_backlogged(sim, "A", 20, 32)
    sim.step()
    assert b.admitted == sim.step_no - 1  # the very next step, by taking one of A's eight places
    assert sim.served["A"] - served_a <= 8  # A was served at most one step's tokens meanwhile
    assert sum(job.preemptions for job in sim.scheduler.take_all()) == 1
    # ...and B, backlogged from now on, gets about half, not everything while it "catches up".


def test_a_returning_tenant_gets_no_credit_and_then_shares_evenly():
    sim = Sim(Scheduler(), rows=8)
    for _ in range(300):
        keep_backlogged(sim, "A", 20, 32)
        sim.step()
    before = Counter(sim.served)
    for _ in range(300):
        keep_backlogged(sim, "A", 20, 32)
        keep_backlogged(sim, "B", 20, 32)
        sim.step()
    a, b = sim.served["A"] - before["A"], sim.served["B"] - before["B"]
    assert 0.4 <= b / (a + b) <= 0.6, (a, b)


def test_idle_engine_forgets_the_counters():
    scheduler = Scheduler()
    sim = Sim(scheduler, rows=2)
    sim.submit("A", 10, 4)
    while sim.running or scheduler.num_waiting:
        sim.step()
    assert scheduler.counter("A") > 0
    sim.submit("B", 10, 4)  # the engine is idle: nobody is owed anything
    assert scheduler.counter("A") == 0 and scheduler.counter("B") == 0


def test_fifo_within_a_tenant():
    sim = Sim(Scheduler(), rows=1)
    jobs = [sim.submit("A", 10, 2) for _ in range(5)]
    while len(sim.finished) < 5:
        sim.step()
    assert sim.finished == jobs


def test_prefill_goes_to_the_least_served_tenant_first():
    scheduler = Scheduler()
    sim = Sim(scheduler, rows=8)
    big = sim.submit("A", 400, 4)
    small = sim.submit("B", 10, 4)
    scheduler.plan(8)  # A's 400-token prompt is charged at admission: B is the less served now
    assert scheduler.prefill_order([big, small]) == [small, big]
    assert Scheduler(SchedulerConfig(Policy.FIFO)).prefill_order([big, small]) == [big, small]


def test_an_unplaced_request_is_refunded_and_keeps_its_turn():
    scheduler = Scheduler()
    first, second = Job("A", [1] * 50, 4, 0), Job("A", [1] * 50, 4, 1)
    scheduler.enqueue(first)
    scheduler.enqueue(second)
    plan = scheduler.plan(2)
    assert plan.admit == [first, second] and scheduler.counter("A") == 100
    scheduler.unplace(plan.admit[1:])  # no blocks for the second
    assert scheduler.counter("A") == 50 and scheduler.num_waiting == 1
    assert scheduler.plan(1).admit == [second] and scheduler.counter("A") == 100


# ---- fifo and priority -----------------------------------------------------------------------------------
def test_fifo_is_arrival_order_across_tenants_and_never_preempts_to_admit():
    sim = Sim(Scheduler(SchedulerConfig(Policy.FIFO)), rows=2)
    jobs = [sim.submit(tenant, 10, 3) for tenant in "AABBAB"]
    admitted = []
    for _ in range(20):
        plan_before = [j for j in jobs if j.admitted is None]
        sim.step()
        admitted += [j for j in plan_before if j.admitted is not None]
    assert admitted == jobs
    assert all(job.preemptions == 0 for job in jobs)


def test_priority_goes_first_and_preempts_lower():
    scheduler = Scheduler(SchedulerConfig(Policy.PRIORITY))
    sim = Sim(scheduler, rows=2)
    low = [sim.submit("A", 10, 50, priority=0) for _ in range(2)]
    sim.step()
    assert all(job.admitted == 0 for job in low)
    high = sim.submit("B", 10, 5, priority=5)
    mid = sim.submit("C", 10, 5, priority=1)
    sim.step()
    assert high.admitted == 1 and mid.admitted == 1  # both preempted a priority-0 request
    assert sum(job.preemptions for job in low) == 2
    sim.submit("D", 10, 5, priority=1)
    plan = scheduler.plan(0)
    assert plan.preempt == [] and plan.admit == []  # an equal level does not preempt across a level it shares


def test_priority_levels_are_fair_within_a_level():
    sim = Sim(Scheduler(SchedulerConfig(Policy.PRIORITY)), rows=4)
    for _ in range(300):
        keep_backlogged(sim, "A", 20, 64)
        keep_backlogged(sim, "B", 20, 16)
        sim.step()
    share = sim.served["B"] / (sim.served["A"] + sim.served["B"])
    assert 0.4 <= share <= 0.6, share


def test_fair_and_fifo_ignore_priority():
    for policy in (Policy.FAIR, Policy.FIFO):
        scheduler = Scheduler(SchedulerConfig(policy))
        low, high = Job("A", [1], 1, 0, priority=0), Job("A", [1], 1, 1, priority=9)
        scheduler.enqueue(low)
        scheduler.enqueue(high)
        assert scheduler.plan(1).admit == [low]


# ---- preemption and starvation -----------------------------------------------------------------------------
def test_victims_are_the_least_preempted_then_the_most_served_then_the_newest():
    scheduler = Scheduler()
    jobs = [Job("A", [1] * 10, 10, i) for i in range(3)] + [Job("B", [1] * 10, 10, 3)]
    for job in jobs:
        scheduler.enqueue(job)
    scheduler.plan(4)
    scheduler.charge_generated(jobs[0], 100)  # A is the more served
    assert scheduler.victim(jobs, jobs[0]) is jobs[2]
    jobs[2].preemptions = 1
    jobs[1].preemptions = 1
    assert scheduler.victim(jobs, jobs[0]) is jobs[0]
    jobs[0].preemptions = 2
    assert scheduler.victim(jobs, jobs[0]) is jobs[3]


@pytest.mark.parametrize("policy", list(Policy))
def test_no_starvation_over_a_long_randomized_run(policy):
    """Ten tenants with zipf-distributed traffic near the batch's capacity, random lengths and priorities, and a
    KV pool small enough to force preemptions: every request finishes, none is preempted without bound, and none
    waits for its first admission without bound (a few hundred steps in a 6000-step run)."""
    rng = random.Random(7)
    scheduler = Scheduler(SchedulerConfig(policy))
    sim = Sim(scheduler, rows=8, blocks=40)
    weights = [1 / (rank + 1) for rank in range(10)]
    jobs = []
    for _ in range(6000):
        if rng.random() < 0.17:  # about 85% of what 8 rows serve at these lengths
            tenant = f"t{rng.choices(range(10), weights)[0]}"
            jobs.append(sim.submit(tenant, rng.randint(4, 60), rng.randint(1, 80), priority=rng.randint(0, 2)))
        sim.step()
    for _ in range(5000):
        if len(sim.finished) == len(jobs):
            break
        sim.step()
    assert len(sim.finished) == len(jobs), f"{len(jobs) - len(sim.finished)} requests never finished"
    assert sum(job.preemptions for job in jobs) > 20  # the pool really was contended
    assert max(job.preemptions for job in jobs) <= 12, Counter(job.preemptions for job in jobs)
    assert max(job.admitted - job.arrived for job in jobs) <= 600


# ---- limits ----------------------------------------------------------------------------------------------
def test_a_tenant_over_its_queue_cap_is_refused_at_once_with_a_hint_and_others_are_not():
    scheduler = Scheduler(SchedulerConfig(limits=TenantLimits(max_queued=3)))
    for i in range(3):
        scheduler.enqueue(Job("A", [1], 1, i))
    with pytest.raises(TenantLimitError) as info:
        scheduler.enqueue(Job("A", [1], 1, 3))
    assert 1 <= info.value.retry_after <= 60 and "'A'" in str(info.value) and "retry" in str(info.value)
    scheduler.enqueue(Job("B", [1], 1, 4))
    assert scheduler.waiting_by_tenant() == {"A": 3, "B": 1}


def test_running_cap_holds_and_leaves_places_to_others():
    sim = Sim(Scheduler(SchedulerConfig(limits=TenantLimits(max_running=2))), rows=8)
    for _ in range(6):
        sim.submit("A", 10, 20)
    for _ in range(70):
        assert sum(job.tenant == "A" for job in sim.running) <= 2
        sim.step()
    assert len(sim.finished) == 6


def test_override_and_block_cap():
    overrides = tenant_overrides({"big": {"max_kv_blocks": 8}, "small": {"max_running": 1, "max_queued": None}})
    config = SchedulerConfig(limits=TenantLimits(max_kv_blocks=3), overrides=overrides)
    assert config.caps_blocks and config.limits_of("big").max_kv_blocks == 8
    scheduler = Scheduler(config)
    sim = Sim(scheduler, rows=8)
    for _ in range(4):
        sim.submit("big", 30, 4)  # 2 blocks each: 4 fit under 8
        sim.submit("other", 30, 4)  # 2 blocks each: 1 fits under 3
    sim.step()
    held = sim.held()
    assert held["big"] <= 8 and held["other"] <= 3
    assert Counter(job.tenant for job in sim.running) == {"big": 4, "other": 1}
    with pytest.raises(InvalidRequestError, match="more than its tenant may hold"):
        scheduler.check_fits(Job("other", [1], 1, 99), 4)


@pytest.mark.parametrize(
    "data",
    [[], {"a": 3}, {"a": {"max_running": 0}}, {"a": {"max_runing": 2}}, {"a": {"max_queued": True}}, {"x" * 200: {}}],
)
def test_bad_override_files_are_refused(data):
    with pytest.raises(ValueError):
        tenant_overrides(data)
