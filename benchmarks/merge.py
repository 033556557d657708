"""Merging a LoRA adapter into the base: decode speed merged vs unmerged vs the base, the cost of a merge, and
the automatic merge policy on a traffic trace.

On the embedded SmolLM2-135M-Instruct in fp32 on the CPU, with the real deltaserve gRPC server in-process on
127.0.0.1 and one real PEFT LoRA adapter "a" (rank `--rank`, target_modules="all-linear", random non-zero
weights):

  1. decode speed  greedy streams with min_new_tokens = max_new_tokens, so every run generates the same
                   count: single stream (1 request, `--stream-tokens` tokens) and batched (`--batch` concurrent
                   requests of the same target, `--batch-tokens` tokens each), for three conditions:
                     base       no adapter, nothing merged
                     unmerged   adapter "a", served as a LoRA delta on every layer
                     merged     adapter "a" after MergeAdapter (its delta folded into the base weights);
                                UnmergeAdapter again right after the condition
                   The conditions take turns for `--rounds` rounds (the order rotates every round), after one
                   untimed warm-up of each, so machine noise hits all of them alike. Decode tokens/s is
                   counted from the client-side arrival time of every streamed chunk: the tokens after each
                   stream's first one, over the time from the first stream's first token to the last
                   stream's last (the prefill and time to first token are left out; end-to-end tokens/s is
                   kept in the JSON too). Reported: best and median over the rounds, their ratios to the base,
                   and the median of the per-round ratios (each round's pair measured seconds apart). The
                   merged and unmerged greedy outputs are compared token for token, every row of every round.
  2. merge cost    MergeAdapter and UnmergeAdapter latency as the client sees it, on the idle server,
                   `--merge-repeats` times each (p50/p95).
  3. auto policy   a server with merge_policy="auto" and 4 adapters (a, b, c, d): phase A, `--phase-a`
                   seconds of `--clients` concurrent clients looping over short greedy requests
                   (`--auto-tokens` tokens) all on "a"; then phase B, `--phase-b` seconds of the same clients
                   spread over a, b, c, d and the base (each client cycles through the five, offset by its
                   index). Every `--sample-every` seconds: ModelInfo's merged_adapter_id and the
                   deltaserve_merge_switches_total counter. Reported: time from each phase's start until the
                   adapter is merged (A) / unmerged (B), the number of switches (a merge and an unmerge is 2;
                   more means flapping), and tokens/s per phase (phase A also split into before and after
                   the merge). The policy reacts after a number of admitted requests (its window), so in
                   seconds its reaction time scales with the request rate: the trace runs once per window in
                   `--merge-windows` (ServerConfig's merge_window_* field; default: the server's own default
                   and 16), each on a fresh server with no warm-up requests, so the policy's window holds only
                   the trace. Skipped with a note when this server's ServerConfig has no merge_policy.

Run:  python benchmarks/merge.py          (64-token streams, batch 8, 6 rounds, 10 merges, two 30 s + 30 s
                                         traces; about 12 minutes on 2 cores)
      python benchmarks/merge.py --quick  (16-token streams, batch 4, 1 round, 3 merges, 10 s + 10 s trace
                                         with an 8-request policy window; a smoke run)
Writes benchmarks/results/merge-cpu.json (…-quick.json for --quick) and a PNG next to it
(skipped with a warning when matplotlib is missing: pip install matplotlib).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deltaserve.client import AsyncClient, Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import ServerThread
from harness import (
    CALL_TIMEOUT_S,
    Measurement,
    Settings,
    cpu_config,
    description,
    embedded_model,
    format_table,
    log,
    make_adapter,
    max_seq_len_for,
    ms_summary,
    on_loop,
    option,
    parse_settings,
    quiet,
    report,
    served,
    settings_dict,
    timed_rounds,
)
from harness import CHAT_PROMPTS as PROMPTS
from transformers import AutoTokenizer

ADAPTER = "a"
CONDITIONS = ("base", "unmerged", "merged")
SHAPES = ("single", "batched")
AUTO_ADAPTERS = ("a", "b", "c", "d")
PHASE_B_TARGETS = ("a", "b", "c", "d", "")  # "" is the base
SWITCH_METRIC = "deltaserve_merge_switches_total"
DECODE = "decode_rate"  # the metric parts 1 compares
TARGET_RATIO = 0.95  # the target: merged >= 0.95x base, single stream


@dataclass(frozen=True)
class MergeSettings(Settings):
    STEM = "merge-cpu"

    rank: int = option(16, "LoRA rank", minimum=1)
    stream_tokens: int = option(64, "tokens of the single stream", quick=16, minimum=2)
    batch: int = option(8, "concurrent requests when batched", quick=4, minimum=1)
    batch_tokens: int = option(64, "tokens per batched request", quick=16, minimum=2)
    rounds: int = option(6, "rounds of the three conditions", quick=1, minimum=1)
    merge_repeats: int = option(10, "timed merges/unmerges", quick=3, minimum=1)
    clients: int = option(4, "concurrent clients in the trace", minimum=1)
    auto_tokens: int = option(16, "tokens per trace request", minimum=1)
    phase_a: float = option(30.0, "seconds of single-adapter traffic", quick=10.0, minimum=0.001)
    phase_b: float = option(30.0, "seconds of mixed traffic", quick=10.0, minimum=0.001)
    sample_every: float = option(0.5, "trace sampling period, s", minimum=0.001)
    # None: the server's default window.
    merge_windows: tuple[int | None, ...] = option(
        (None, 16), "auto-policy windows to trace, one run each (None = the server's default)", quick=(8,), minimum=1
    )


def has_merge_policy() -> bool:
    return "merge_policy" in ServerConfig.GROUP_OF


def policy_window_field() -> str | None:
    """The ServerConfig setting of the auto policy's look-back window (merge_window_*), if there is one."""
    return next((name for name in ServerConfig.GROUP_OF if name.startswith("merge_window")), None)


# ---- statistics -----------------------------------------------------------------------------------
# ---- streams --------------------------------------------------------------------------------------
@dataclass
class StreamBatch:
    """Concurrent greedy streams started together: per stream, (arrival time, tokens) of every chunk."""

    start: float
    chunks: list[list[tuple[float, int]]]
    token_ids: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def end(self) -> float:
        return max(chunks[-1][0] for chunks in self.chunks)

    def first_token_times(self) -> list[float]:
        return [next(t for t, n in chunks if n > 0) for chunks in self.chunks]

    @property
    def decode_rate(self) -> float:
        """Tokens after each stream's first, over the first stream's first token to the last stream's last."""
        firsts = self.first_token_times()
        after_first = sum(
            sum(n for t, n in chunks if t > first) for chunks, first in zip(self.chunks, firsts, strict=True)
        )
        return after_first / (self.end - min(firsts))

    @property
    def e2e_rate(self) -> float:
        return self.tokens / (self.end - self.start)


async def _streams(client: AsyncClient, jobs: list[tuple[str, str]], tokens: int) -> StreamBatch:
    """Run one greedy stream per (adapter id, user message) concurrently."""

    async def one(adapter_id: str, message: str) -> tuple[list[tuple[float, int]], list[int]]:
        chunks, ids = [], []
        async for chunk in client.generate_stream(
            messages=[{"role": "user", "content": message}],
            adapter_id=adapter_id,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            temperature=0.0,
        ):
            chunks.append((time.perf_counter(), len(chunk.token_ids)))
            ids.extend(chunk.token_ids)
        return chunks, ids

    start = time.perf_counter()
    results = await asyncio.gather(*(one(adapter_id, message) for adapter_id, message in jobs))
    batch = StreamBatch(start, [c for c, _ in results], [ids for _, ids in results])
    for i, ids in enumerate(batch.token_ids):
        if len(ids) != tokens:
            raise RuntimeError(f"stream {i} ({jobs[i][0] or 'base'}) generated {len(ids)} tokens, expected {tokens}")
    return batch


# ---- part 1: decode speed -------------------------------------------------------------------------
async def _condition(
    client: AsyncClient, condition: str, settings: MergeSettings, merge_times: list[tuple[float, float]]
) -> dict[str, StreamBatch]:
    """Both shapes of one condition; merged runs are bracketed by MergeAdapter / UnmergeAdapter."""
    adapter_id = "" if condition == "base" else ADAPTER
    if condition == "merged":
        start = time.perf_counter()
        await client.merge_adapter(ADAPTER)
        merged_at = time.perf_counter()
    expected = ADAPTER if condition == "merged" else ""
    merged_now = (await client.model_info()).merged_adapter_id
    if merged_now != expected:
        raise RuntimeError(f"{condition}: the server reports merged adapter {merged_now!r}, expected {expected!r}")
    try:
        single = await _streams(client, [(adapter_id, PROMPTS[0])], settings.stream_tokens)
        jobs = [(adapter_id, PROMPTS[i % len(PROMPTS)]) for i in range(settings.batch)]
        batched = await _streams(client, jobs, settings.batch_tokens)
    finally:
        if condition == "merged":
            before_unmerge = time.perf_counter()
            await client.unmerge_adapter()
            merge_times.append((merged_at - start, time.perf_counter() - before_unmerge))
    return {"single": single, "batched": batched}


def measure_speed(target: str, settings: MergeSettings) -> tuple[dict[tuple[str, str], Measurement], list, list]:
    """The conditions take turns over the rounds on one client, each running both shapes; returns every
    condition x shape, each merged condition's (merge, unmerge) seconds and the load average after each round."""
    merge_times: list[tuple[float, float]] = []
    with asyncio.Runner() as runner:
        client = AsyncClient(target, timeout=CALL_TIMEOUT_S)
        runner.run(client.model_info())  # connect before the clock starts

        def system(condition: str, times: list) -> Callable[[], dict[str, StreamBatch]]:
            return on_loop(runner, lambda: _condition(client, condition, settings, times))

        rounds = timed_rounds(
            {c: system(c, merge_times) for c in CONDITIONS},
            settings.rounds,
            warmups={c: system(c, []) for c in CONDITIONS},  # warm-up merges are not timed
            describe=lambda shapes: "; ".join(f"{s} {run.decode_rate:.1f}" for s, run in shapes.items()) + " tok/s",
        )
        runner.run(client.close())
    cells = {
        (c, s): Measurement(f"{c}/{s}", [shapes[s] for shapes in rounds.measurements[c].runs])
        for c in CONDITIONS
        for s in SHAPES
    }
    return cells, merge_times, rounds.loads


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (None if identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_outputs(cells: dict[tuple[str, str], Measurement], shape: str, left: str, right: str) -> dict[str, object]:
    """Rows of `left` and `right` (every round) compared token for token."""
    rows, identical, differences = 0, 0, []
    for round_, (a, b) in enumerate(zip(cells[left, shape].runs, cells[right, shape].runs, strict=True)):
        for row, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            rows += 1
            at = first_difference(x, y)
            if at is None:
                identical += 1
            else:
                differences.append({"round": round_, "row": row, "first_differing_token": at})
    return {"rows": rows, "identical": identical, "differences": differences}


def speed_summary(cells: dict[tuple[str, str], Measurement], merge_times: list) -> dict[str, object]:
    out: dict[str, object] = {}
    for shape in SHAPES:
        base = cells["base", shape]
        entry: dict[str, object] = {}
        for condition in CONDITIONS:
            cell = cells[condition, shape]
            per_round = [r / b for r, b in zip(cell.values(DECODE), base.values(DECODE), strict=True)]
            entry[condition] = {
                "best_decode_tokens_per_s": cell.best(DECODE),
                "median_decode_tokens_per_s": cell.median(DECODE),
                "base_best_decode_tokens_per_s": base.best(DECODE),
                "base_median_decode_tokens_per_s": base.median(DECODE),
                "decode_tokens_per_s": cell.values(DECODE),
                "e2e_tokens_per_s": cell.values("e2e_rate"),
                "median_e2e_tokens_per_s": cell.median("e2e_rate"),
                "best_over_base": cell.best(DECODE) / base.best(DECODE),
                "median_over_base": cell.median(DECODE) / base.median(DECODE),
                "per_round_over_base": per_round,
                "median_of_per_round_over_base": statistics.median(per_round),
            }
        entry["merged_vs_unmerged_tokens"] = compare_outputs(cells, shape, "merged", "unmerged")
        entry["unmerged_vs_base_tokens"] = compare_outputs(cells, shape, "unmerged", "base")
        out[shape] = entry
    out["merge_unmerge_between_conditions_ms"] = {
        "merge": ms_summary([m for m, _ in merge_times]),
        "unmerge": ms_summary([u for _, u in merge_times]),
    }
    single = out["single"]["merged"]
    out["target"] = {
        "statement": f"merged >= {TARGET_RATIO}x base decode tokens/s, single stream",
        "best_over_base": single["best_over_base"],
        "median_over_base": single["median_over_base"],
        "median_of_per_round_over_base": single["median_of_per_round_over_base"],
        "met_on_best": single["best_over_base"] >= TARGET_RATIO,
        "met_on_median": single["median_over_base"] >= TARGET_RATIO,
    }
    return out


# ---- part 2: the cost of a merge ------------------------------------------------------------------
def measure_merge_cost(target: str, settings: MergeSettings) -> dict[str, object]:
    merges, unmerges = [], []
    with Client(target, timeout=CALL_TIMEOUT_S) as client:
        if client.model_info().merged_adapter_id:
            raise RuntimeError("an adapter is still merged before the merge-cost measurement")
        for rep in range(settings.merge_repeats):
            start = time.perf_counter()
            info = client.merge_adapter(ADAPTER)
            merged = time.perf_counter()
            if info.state != "merged":
                raise RuntimeError(f"MergeAdapter returned state {info.state!r}")
            unmerged_id = client.unmerge_adapter()
            merges.append(merged - start)
            unmerges.append(time.perf_counter() - merged)
            if unmerged_id != ADAPTER:
                raise RuntimeError(f"UnmergeAdapter returned {unmerged_id!r}, expected {ADAPTER!r}")
            log(
                f"merge cost {rep + 1}/{settings.merge_repeats}: {merges[-1] * 1e3:.0f} ms merge, "
                f"{unmerges[-1] * 1e3:.0f} ms unmerge"
            )
    return {
        "merge_seconds": merges,
        "unmerge_seconds": unmerges,
        "merge_ms": ms_summary(merges),
        "unmerge_ms": ms_summary(unmerges),
    }


# ---- part 3: the auto policy ----------------------------------------------------------------------
@dataclass
class Trace:
    start: float = 0.0
    phase_b_start: float = 0.0
    end: float = 0.0
    samples: list[tuple[float, str, float]] = field(default_factory=list)  # (time, merged id, switches)
    chunks: list[tuple[float, int, str]] = field(default_factory=list)  # (arrival, tokens, target)
    requests: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, target)
    errors: list[str] = field(default_factory=list)


async def _trace(target: str, server: object, settings: MergeSettings) -> Trace:
    trace = Trace()
    registry = server.server.metrics.registry

    def switches() -> float:
        return registry.get_sample_value(SWITCH_METRIC) or 0.0

    async def client_loop(index: int, client: AsyncClient) -> None:
        k = 0
        while True:
            now = time.perf_counter()
            if now >= trace.end:
                return
            in_a = now < trace.phase_b_start
            adapter_id = ADAPTER if in_a else PHASE_B_TARGETS[(index + k) % len(PHASE_B_TARGETS)]
            message = PROMPTS[(index * 7 + k) % len(PROMPTS)]
            k += 1
            got = 0
            async for chunk in client.generate_stream(
                messages=[{"role": "user", "content": message}],
                adapter_id=adapter_id,
                max_new_tokens=settings.auto_tokens,
                min_new_tokens=settings.auto_tokens,
                temperature=0.0,
            ):
                trace.chunks.append((time.perf_counter(), len(chunk.token_ids), adapter_id))
                got += len(chunk.token_ids)
            trace.requests.append((now, time.perf_counter(), adapter_id))
            if got != settings.auto_tokens:
                trace.errors.append(f"client {index}: {adapter_id or 'base'} generated {got} tokens")

    async def sampler(client: AsyncClient) -> None:
        next_at = trace.start
        while True:
            now = time.perf_counter()
            info = await client.model_info()
            trace.samples.append((now, info.merged_adapter_id, switches()))
            if now >= trace.end:
                return
            next_at += settings.sample_every
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async with AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        await client.model_info()
        trace.start = time.perf_counter()
        trace.phase_b_start = trace.start + settings.phase_a
        trace.end = trace.phase_b_start + settings.phase_b
        await asyncio.gather(sampler(client), *(client_loop(i, client) for i in range(settings.clients)))
    return trace


def _rate(chunks: list[tuple[float, int, str]], start: float | None, end: float | None) -> float | None:
    """Tokens/s of the chunks that arrived in [start, end); None for an empty or missing interval (JSON null)."""
    if start is None or end is None or end <= start:
        return None
    return sum(n for t, n, _ in chunks if start <= t < end) / (end - start)


def trace_summary(trace: Trace) -> dict[str, object]:
    t0, tb, te = trace.start, trace.phase_b_start, trace.end
    samples = trace.samples
    # The merge is looked for over the whole trace (a slow policy may merge only after phase A ended), the
    # unmerge after both the merge and the start of phase B.
    merged_a = next((t for t, m, _ in samples if m == ADAPTER), None)
    unmerged_b = (
        next((t for t, m, _ in samples if t >= max(tb, merged_a) and m != ADAPTER), None)
        if merged_a is not None
        else None
    )
    transitions = []
    for (_, m0, _), (t1, m1, _) in itertools.pairwise(samples):
        if m1 != m0:
            transitions.append({"t": t1 - t0, "from": m0, "to": m1})
    start_switches, end_switches = samples[0][2], samples[-1][2]
    phase_a_merged = {
        "tokens_per_s": _rate(trace.chunks, t0, tb),
        "before_merge_tokens_per_s": _rate(trace.chunks, t0, tb if merged_a is None else min(merged_a, tb)),
        "after_merge_tokens_per_s": _rate(trace.chunks, merged_a, tb),
    }
    phase_b = {
        "tokens_per_s": _rate(trace.chunks, tb, te),
        "while_merged_tokens_per_s": (
            None
            if merged_a is None
            else _rate(trace.chunks, max(tb, merged_a), te if unmerged_b is None else unmerged_b)
        ),
        "after_unmerge_tokens_per_s": _rate(trace.chunks, unmerged_b, te),
    }
    merged_samples_b = [m for t, m, _ in samples if t >= tb]
    return {
        "time_to_merge_s": merged_a - t0 if merged_a is not None else None,
        "merged_within_phase_a": merged_a is not None and merged_a < tb,
        "time_to_unmerge_s": unmerged_b - tb if unmerged_b is not None else None,
        "switches": end_switches - start_switches,
        "switches_at_start": start_switches,
        "sampled_transitions": transitions,
        "merged_at_end": samples[-1][1],
        "other_adapters_merged_in_phase_b": sorted({m for m in merged_samples_b if m and m != ADAPTER}),
        "phase_a": phase_a_merged,
        "phase_b": phase_b,
        "requests": {
            "phase_a": sum(1 for s, _, _ in trace.requests if s < tb),
            "started_before_the_merge": (
                sum(1 for s, _, _ in trace.requests if s < merged_a) if merged_a is not None else None
            ),
            "phase_b": sum(1 for s, _, _ in trace.requests if s >= tb),
            "phase_b_by_target": {
                (a or "base"): sum(1 for s, _, x in trace.requests if s >= tb and x == a) for a in PHASE_B_TARGETS
            },
        },
        "errors": trace.errors,
        "samples": [{"t": t - t0, "merged": m, "switches": s} for t, m, s in samples],
        "chunks": [[round(t - t0, 4), n] for t, n, _ in trace.chunks],
        "phase_b_start_s": tb - t0,
        "end_s": te - t0,
    }


def measure_auto(
    paths: dict[str, str], model_dir: str, settings: MergeSettings, max_seq_len: int, window: int | None
) -> dict[str, object]:
    """One trace on a fresh server with merge_policy="auto" and the given window (None: the server's default)."""
    window_field = policy_window_field()
    config = cpu_config(
        model_dir,
        max_batch_size=max(settings.clients, 4),
        max_seq_len=max_seq_len,
        max_adapters=len(AUTO_ADAPTERS) + 1,  # every adapter stays on the device: no load in the trace
        max_lora_rank=settings.rank,
        merge_policy="auto",
        **({window_field: window} if window is not None and window_field is not None else {}),
    )
    effective = config.settings()[window_field] if window_field is not None else None
    log(f"part 3: starting a server with merge_policy='auto', window {effective}")
    with ServerThread(config) as server:
        with Client(server.target, timeout=CALL_TIMEOUT_S) as client:
            for name, path in paths.items():
                client.load_adapter(name, path)
            # No warm-up requests: the policy counts every admitted request, and its window should hold only
            # the trace (the server warms the model up itself before it reports SERVING).
            if client.model_info().merged_adapter_id:
                log("warning: an adapter is merged before the trace starts")
        log(f"auto policy: phase A {settings.phase_a:g} s on {ADAPTER!r}, then phase B {settings.phase_b:g} s mixed")
        trace = asyncio.run(_trace(server.target, server, settings))
    load_after = os.getloadavg()[0]
    summary = trace_summary(trace)
    summary["server"] = {
        "merge_policy": "auto",
        **served(config, "max_adapters", "max_batch_size"),
    }
    summary["load_average_after"] = load_after
    summary["window"] = effective
    summary["window_is_server_default"] = window is None
    summary["policy_fields"] = {name: value for name, value in config.settings().items() if "merge" in name}
    return summary


# ---- reporting ------------------------------------------------------------------------------------
def speed_table(speed: dict[str, object], settings: MergeSettings) -> str:
    shapes = {
        "single": f"single ({settings.stream_tokens} tok)",
        "batched": f"batched ({settings.batch}x{settings.batch_tokens} tok)",
    }
    rows = [
        [
            shapes[shape],
            condition,
            f"{c['best_decode_tokens_per_s']:.1f}",
            f"{c['median_decode_tokens_per_s']:.1f}",
            f"{c['best_over_base']:.2f}x",
            f"{c['median_over_base']:.2f}x",
            f"{c['median_of_per_round_over_base']:.2f}x",
        ]
        for shape in SHAPES
        for condition in CONDITIONS
        for c in [speed[shape][condition]]
    ]
    header = ["shape", "condition", "best tok/s", "median tok/s", "best/base", "median/base", "per-round/base"]
    return format_table(header, rows, left=2)


def merge_table(cost: dict[str, object], speed: dict[str, object]) -> str:
    between = speed["merge_unmerge_between_conditions_ms"]
    calls = [
        ("MergeAdapter (idle server)", cost["merge_ms"]),
        ("UnmergeAdapter (idle server)", cost["unmerge_ms"]),
        ("MergeAdapter (between part-1 runs)", between["merge"]),
        ("UnmergeAdapter (between part-1 runs)", between["unmerge"]),
    ]
    rows = [[name, s["n"], *(f"{s[k]:.1f}" for k in ("p50", "p95", "max"))] for name, s in calls]
    return format_table(["call", "n", "p50 ms", "p95 ms", "max ms"], rows)


def _fmt_s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def auto_table(run: dict[str, object]) -> str:
    header = f"{'phase':<26} {'requests':>8} {'tok/s':>7} {'switch':>8} {'after':>16}"
    lines = [header, "-" * len(header)]
    a, b, req = run["phase_a"], run["phase_b"], run["requests"]
    merge_after = _fmt_s(run["time_to_merge_s"])
    if run["time_to_merge_s"] is not None and not run["merged_within_phase_a"]:
        merge_after += " (in B)"
    lines.append(
        f"{'A: all on a':<26} {req['phase_a']:>8} {_fmt_rate(a['tokens_per_s']):>7} {'merge':>8} {merge_after:>16}"
    )
    lines.append(f"{'  before the merge':<26} {'':>8} {_fmt_rate(a['before_merge_tokens_per_s']):>7}")
    lines.append(f"{'  after the merge':<26} {'':>8} {_fmt_rate(a['after_merge_tokens_per_s']):>7}")
    lines.append(
        f"{'B: a, b, c, d, base':<26} {req['phase_b']:>8} {_fmt_rate(b['tokens_per_s']):>7} {'unmerge':>8} "
        f"{_fmt_s(run['time_to_unmerge_s']):>16}"
    )
    lines.append(f"{'  while merged':<26} {'':>8} {_fmt_rate(b['while_merged_tokens_per_s']):>7}")
    lines.append(f"{'  after the unmerge':<26} {'':>8} {_fmt_rate(b['after_unmerge_tokens_per_s']):>7}")
    return "\n".join(lines)


def _window_label(run: dict[str, object]) -> str:
    return f"window {run['window']}" + (" (server default)" if run["window_is_server_default"] else "")


def result(
    model_name: str,
    settings: MergeSettings,
    speed: dict[str, object],
    cost: dict[str, object],
    auto: dict[str, object],
    max_seq_len: int,
    cells: dict[tuple[str, str], Measurement],
) -> dict[str, object]:
    return {
        "model": model_name,
        "device": "cpu",
        "dtype": "float32",
        "target_modules": "all-linear",
        "server": {
            "max_seq_len": max_seq_len,
            "parts_1_2": {"max_batch_size": settings.batch, "max_adapters": 2, "max_lora_rank": settings.rank},
            "in_process": "the server runs in a thread of the benchmark process (deltaserve.testing ServerThread)",
        },
        "statistic": (
            "decode tokens/s = tokens after each stream's first / (last stream's last chunk - first stream's first "
            "token), client side; best and median over rounds; per-round ratio = condition / base of the same round; "
            "latencies p50/p95 (linear interpolation)"
        ),
        "decode_speed": speed,
        "merge_cost": cost,
        "auto_policy": auto,
        "greedy_token_ids": {
            f"{condition}/{shape}": cells[condition, shape].runs[-1].token_ids
            for condition in CONDITIONS
            for shape in SHAPES
        },
    }


def draw(data: dict[str, object], settings: dict[str, object]) -> object:
    """Decode tokens/s per condition, merge/unmerge latency, and the auto-policy trace."""

    def plot(ax_speed: object, ax_cost: object, ax_auto: object) -> None:
        speed = data["decode_speed"]
        colors = {"base": "#8c8c8c", "unmerged": "#c44e52", "merged": "#55a868"}
        width = 0.26
        for i, condition in enumerate(CONDITIONS):
            xs = [j + (i - 1) * width for j in range(len(SHAPES))]
            best = [speed[s][condition]["best_decode_tokens_per_s"] for s in SHAPES]
            bars = ax_speed.bar(xs, best, width, color=colors[condition], label=condition)
            ax_speed.bar_label(bars, fmt="%.0f", fontsize=8)
            for x, shape in zip(xs, SHAPES, strict=True):
                rates = speed[shape][condition]["decode_tokens_per_s"]
                ax_speed.plot([x] * len(rates), rates, "k.", markersize=3)
        ax_speed.set_xticks(
            range(len(SHAPES)), [f"single stream\n{settings['stream_tokens']} tok", f"batch {settings['batch']}"]
        )
        ax_speed.set_ylabel("decode tokens/s (bars: best; dots: every round)")
        ax_speed.set_title(f"1. decode speed, rank-{settings['rank']} all-linear LoRA", fontsize=10)
        ax_speed.legend(fontsize=8, loc="upper left")

        cost = data["merge_cost"]
        names = ["merge", "unmerge"]
        p50 = [cost[f"{n}_ms"]["p50"] for n in names]
        p95 = [cost[f"{n}_ms"]["p95"] for n in names]
        bars = ax_cost.bar(
            names, p50, color="#4c72b0", yerr=[[0, 0], [b - a for a, b in zip(p50, p95, strict=True)]], capsize=4
        )
        ax_cost.bar_label(bars, fmt="%.0f", label_type="center", color="white")
        ax_cost.set_ylabel("call latency, ms (p50, whisker to p95)")
        ax_cost.set_title(f"2. MergeAdapter / UnmergeAdapter ({cost['merge_ms']['n']}x)", fontsize=10)

        auto = data["auto_policy"]
        if "skipped" in auto:
            ax_auto.text(0.5, 0.5, "3. auto policy skipped:\n" + auto["skipped"], ha="center", va="center", wrap=True)
            ax_auto.set_axis_off()
        else:
            # One band per traced window: merged state (step, left axis) and tokens/s in 2 s bins (right axis).
            runs = auto["runs"]
            ax_rate = ax_auto.twinx()
            palette = ["#55a868", "#dd8452", "#8172b3", "#937860"]
            bin_s = 2.0
            peak = 1.0
            for i, run in enumerate(runs):
                color = palette[i % len(palette)]
                level = 2.0 * (len(runs) - 1 - i)
                times = [x["t"] for x in run["samples"]]
                state = [level + (1 if x["merged"] else 0) for x in run["samples"]]
                ax_auto.step(times, state, where="post", color=color, lw=2, label=f"merged, {_window_label(run)}")
                bins = max(1, math.ceil(run["end_s"] / bin_s))
                counts = [0] * bins
                for t, n in run["chunks"]:
                    if 0 <= t < run["end_s"]:
                        counts[min(int(t / bin_s), bins - 1)] += n
                rates = [c / bin_s for c in counts]
                peak = max(peak, *rates)
                ax_rate.plot([(k + 0.5) * bin_s for k in range(bins)], rates, color=color, lw=0.8, linestyle=":")
            ticks = [2.0 * k + d for k in range(len(runs)) for d in (0, 1)]
            ax_auto.set_yticks(ticks, ["unmerged", "merged"] * len(runs), fontsize=8)
            top = 2.0 * len(runs) - 0.4
            ax_auto.set_ylim(-0.1, top)
            phase_b, end = runs[0]["phase_b_start_s"], runs[0]["end_s"]
            ax_auto.axvline(phase_b, color="k", linestyle="--", linewidth=0.8)
            ax_auto.text(phase_b / 2, top - 0.3, "A: all on a", ha="center", fontsize=8)
            ax_auto.text((phase_b + end) / 2, top - 0.3, "B: a, b, c, d, base", ha="center", fontsize=8)
            ax_auto.legend(loc="center left", fontsize=7)
            ax_rate.set_ylim(0, peak * 1.3)
            ax_rate.set_ylabel(f"tokens/s, dotted ({bin_s:g} s bins)")
            ax_auto.set_xlabel("seconds since the trace started")
            ax_auto.set_title(
                "3. merge_policy=auto: "
                + "; ".join(f"w{run['window']}: {run['switches']:.0f} switches" for run in runs),
                fontsize=10,
            )

    return plot


# ---- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(MergeSettings, argv, description(__doc__))
    quiet()
    model_dir, model_name = embedded_model()
    tokens = max(settings.stream_tokens, settings.batch_tokens, settings.auto_tokens)
    max_seq_len = max_seq_len_for(AutoTokenizer.from_pretrained(model_dir), tokens)
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-") as root:
        log(f"making a rank-{settings.rank} all-linear LoRA adapter")
        path = make_adapter(model_dir, root, ADAPTER, settings.rank, seed=1)
        config = cpu_config(
            model_dir,
            max_batch_size=settings.batch,
            max_seq_len=max_seq_len,
            max_adapters=2,
            max_lora_rank=settings.rank,
        )
        log("parts 1-2: starting the server")
        with ServerThread(config) as server:
            with Client(server.target, timeout=CALL_TIMEOUT_S) as client:
                client.load_adapter(ADAPTER, path)
            cells, merge_times, loads = measure_speed(server.target, settings)
            cost = measure_merge_cost(server.target, settings)
        speed = speed_summary(cells, merge_times)
        speed["load_average_after_each_round"] = loads
        auto = measure_auto_runs(model_dir, root, settings, max_seq_len)
    data = result(model_name, settings, speed, cost, auto, max_seq_len, cells)
    text = summary_text(model_name, settings, speed, cost, auto)
    title = f"{model_name}, fp32 CPU ({os.cpu_count()} cores)"
    plot = {"panels": 3, "size": (16, 4.4), "widths": (1, 0.7, 1.6), "title": title, "dpi": 110}
    report("merge", settings, data, text, draw(data, settings_dict(settings)), **plot)
    return 0


def measure_auto_runs(model_dir: str, root: str, settings: MergeSettings, max_seq_len: int) -> dict[str, object]:
    """Part 3 for each window, or a note when this server has no auto merge policy."""
    if not has_merge_policy():
        return {"skipped": "this server's ServerConfig has no merge_policy field (the auto policy is not there yet)"}
    paths = {
        name: make_adapter(model_dir, root, f"auto-{name}", settings.rank, seed=10 + i)
        for i, name in enumerate(AUTO_ADAPTERS)
    }
    return {"runs": [measure_auto(paths, model_dir, settings, max_seq_len, w) for w in settings.merge_windows]}


def summary_text(model_name: str, settings: MergeSettings, speed: dict, cost: dict, auto: dict) -> list[str]:
    out: list[str] = []
    out.append(f"{model_name} fp32 CPU ({os.cpu_count()} cores), one rank-{settings.rank} all-linear LoRA adapter")
    out.append("")
    out.append(
        f"1. decode tokens/s (greedy, min_new_tokens = max_new_tokens), {settings.rounds} round(s), conditions "
        "alternating; per-round/base = median of each round's ratio"
    )
    out.append(speed_table(speed, settings))
    target = speed["target"]
    verdict = "met" if target["met_on_best"] and target["met_on_median"] else "NOT met"
    out.append(
        f"target merged >= {TARGET_RATIO}x base (single stream): {verdict} "
        f"(best {target['best_over_base']:.2f}x, median {target['median_over_base']:.2f}x, "
        f"per-round median {target['median_of_per_round_over_base']:.2f}x)"
    )
    out.append(
        "1-minute load average after each round: "
        + ", ".join(f"{x:.2f}" for x in speed["load_average_after_each_round"])
        + f" ({os.cpu_count()} cores)"
    )
    for shape in SHAPES:
        same = speed[shape]["merged_vs_unmerged_tokens"]
        differs = speed[shape]["unmerged_vs_base_tokens"]
        firsts = sorted({d["first_differing_token"] for d in same["differences"]})
        out.append(
            f"{shape}: merged vs unmerged greedy rows identical token for token: {same['identical']}/{same['rows']}"
            + (f" (first differing token at {firsts})" if firsts else "")
            + f"; unmerged differs from base in {differs['rows'] - differs['identical']}/{differs['rows']} rows"
        )
    out.append("")
    out.append(
        f"2. MergeAdapter / UnmergeAdapter latency (client side), {settings.merge_repeats} each on the idle server"
    )
    out.append(merge_table(cost, speed))
    out.append("")
    if "skipped" in auto:
        out.append(f"3. auto merge policy: skipped: {auto['skipped']}")
    else:
        out.append(
            f"3. merge_policy=auto: {settings.clients} clients x {settings.auto_tokens}-token requests; phase A "
            f"{settings.phase_a:g} s all on {ADAPTER!r}, phase B {settings.phase_b:g} s over a, b, c, d and the base; "
            f"sampled every {settings.sample_every:g} s; merge/unmerge times from the start of phase A / B"
        )
    for run in auto.get("runs", []):
        out.append("")
        out.append(
            f"{_window_label(run)}: "
            + ", ".join(f"{k}={v}" for k, v in run["policy_fields"].items())
            + (
                "; never merged"
                if run["requests"]["started_before_the_merge"] is None
                else f"; {run['requests']['started_before_the_merge']} requests started before the merge"
            )
        )
        out.append(auto_table(run))
        flapping = "" if run["switches"] == 2 else "  <- expected exactly 2 (one merge, one unmerge)"
        out.append(
            f"switches ({SWITCH_METRIC}): {run['switches']:.0f}{flapping}; sampled transitions: "
            + (
                ", ".join(
                    f"{x['from'] or 'none'} -> {x['to'] or 'none'} at {x['t']:.1f} s"
                    for x in run["sampled_transitions"]
                )
                or "none"
            )
            + f"; merged at the end: {run['merged_at_end'] or 'none'}; "
            f"load average after {run['load_average_after']:.2f}"
        )
        if run["errors"]:
            out.append(f"warning: {len(run['errors'])} trace requests went wrong: {run['errors'][:3]}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
