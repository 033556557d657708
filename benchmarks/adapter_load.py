"""Adapter loading on a live server: hot-load latency, the decode stall a load causes, cold vs warm requests.

On the embedded SmolLM2-135M-Instruct in fp32 on the CPU, with the real deltaserve gRPC server in-process on
127.0.0.1 and real PEFT LoRA adapters (target_modules="all-linear", random non-zero weights):

  1. hot load     LoadAdapter latency as the client sees it (the call returns once the adapter is validated
                  and servable), for each rank in `--ranks`; each load is followed by an unload, every load
                  uses a new id. One untimed load per rank first (the first load allocates the slot stacks).
                  Server: max_lora_rank=64, enough device slots that a load never evicts.
  2. decode stall S concurrent greedy streams of `--new-tokens` tokens each (min_new_tokens = max_new_tokens,
                  half on the base, half on a resident rank-16 adapter) record the client-side arrival time
                  of every streamed chunk; the inter-chunk gaps once every stream is running are the decode
                  step as a client sees it. Once without loads (baseline) and once while a background thread
                  loads and unloads adapters of the largest rank, `--churn-pause` seconds between cycles
                  (under load; its gaps are also split into those overlapping a LoadAdapter call and those
                  with none in flight); the conditions take turns for `--rounds` rounds. The stall a load
                  causes is the under-load max gap minus the baseline p50 gap.
  3. tiers        a server with 2 device slots and a 1-adapter host cache, 6 rank-16 adapters registered:
                  end-to-end latency of a short greedy request for an adapter in each state, checked with
                  ListAdapters right before the timed request: "device" (warm: requested once untimed, then
                  timed), "host" (evicted from the device, parsed copy in the host cache) and "disk" (host
                  copy dropped too: parsed again from its files, which sit in the OS page cache), plus the
                  base model as a reference.

Statistics are p50/p95 over the repeats (linear interpolation between order statistics), not best-of: these
are latencies, and the tail is the point.

Run:  python benchmarks/adapter_load.py          (ranks 8/16/64 x 8 loads, 4 streams x 96 tokens, 2 rounds, 10 requests
                                                 per state; a few minutes)
      python benchmarks/adapter_load.py --quick  (ranks 8/16 x 3 loads, 4 streams x 24 tokens, 1 round, 2 requests per
                                                 state; a smoke run)
Writes benchmarks/results/adapter-load-cpu.json (…-quick.json for --quick) and a PNG next to it
(skipped with a warning when matplotlib is missing: pip install matplotlib).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

from deltaserve.client import AsyncClient, Client
from deltaserve.testing.helpers import ServerThread
from harness import (
    CALL_TIMEOUT_S,
    Settings,
    cpu_config,
    description,
    embedded_model,
    format_table,
    log,
    make_adapter,
    max_seq_len_for,
    ms_summary,
    option,
    parse_settings,
    percentile,
    quiet,
    report,
    require,
    timed_rounds,
)
from harness import CHAT_PROMPTS as STREAM_PROMPTS
from transformers import AutoTokenizer

MAX_LORA_RANK = 64
RESIDENT_RANK = 16  # the adapter half the streams of part 2 run on
TIER_STATES = ("disk", "host", "device", "base")
TIER_PROMPT = "Tell me a fun fact about octopuses."
# Part 3's server: 6 rank-16 adapters over 2 device slots and a 1-entry host cache; 8-token requests.
TIER_ADAPTERS, TIER_RANK, TIER_SLOTS, TIER_HOST_CACHE, TIER_TOKENS = 6, 16, 2, 1, 8


@dataclass(frozen=True)
class LoadSettings(Settings):
    STEM = "adapter-load-cpu"

    ranks: tuple[int, ...] = option((8, 16, 64), "LoRA ranks to load", quick=(8, 16), minimum=1)
    repeats: int = option(8, "timed loads per rank", quick=3, minimum=1)
    streams: int = option(4, "concurrent streams in part 2 (half base, half adapter)", minimum=2)
    new_tokens: int = option(96, "tokens per stream in part 2", quick=24, minimum=1)
    rounds: int = option(2, "baseline/under-load rounds in part 2", quick=1, minimum=1)
    tier_repeats: int = option(10, "timed requests per adapter state in part 3", quick=2, minimum=1)
    churn_pause: float = option(1.0, "seconds between load/unload cycles in part 2", minimum=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "ranks", tuple(sorted(set(self.ranks))))
        require(max(self.ranks) <= MAX_LORA_RANK, f"--ranks must not exceed the server's max_lora_rank {MAX_LORA_RANK}")

    @property
    def churn_rank(self) -> int:
        return max(self.ranks)


def dir_bytes(path: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())


# ---- statistics -----------------------------------------------------------------------------------
# ---- part 1: hot-load latency ---------------------------------------------------------------------
@dataclass
class RankLoads:
    rank: int
    path: str
    size_bytes: int = 0
    file_bytes: int = 0
    seconds: list[float] = field(default_factory=list)
    unload_seconds: list[float] = field(default_factory=list)
    states: list[str] = field(default_factory=list)


def measure_hot_loads(target: str, paths: dict[int, str], settings: LoadSettings) -> list[RankLoads]:
    """Load then unload each rank in turn (the order rotates every repeat), a new id for every load."""
    results = {rank: RankLoads(rank, paths[rank], file_bytes=dir_bytes(paths[rank])) for rank in settings.ranks}
    ranks = list(settings.ranks)
    with Client(target, timeout=CALL_TIMEOUT_S) as client:
        client.model_info()  # connect before the clock starts
        for rank in ranks:  # warm-up: the first load allocates every layer's slot stacks
            client.load_adapter(f"warmup-r{rank}", paths[rank])
            client.unload_adapter(f"warmup-r{rank}")
        for rep in range(settings.repeats):
            for rank in ranks[rep % len(ranks) :] + ranks[: rep % len(ranks)]:
                adapter_id = f"hot-r{rank}-{rep}"
                start = time.perf_counter()
                info = client.load_adapter(adapter_id, paths[rank])
                loaded = time.perf_counter()
                client.unload_adapter(adapter_id)
                unloaded = time.perf_counter()
                record = results[rank]
                record.seconds.append(loaded - start)
                record.unload_seconds.append(unloaded - loaded)
                record.states.append(info.state)
                record.size_bytes = info.size_bytes
            log(
                f"hot load round {rep + 1}/{settings.repeats}: "
                + ", ".join(f"r{r} {results[r].seconds[-1] * 1e3:.0f} ms" for r in ranks)
            )
    return [results[rank] for rank in ranks]


# ---- part 2: the decode stall ---------------------------------------------------------------------
@dataclass
class StreamRun:
    """One batch of concurrent streams: per stream, (client arrival time, tokens) of every chunk."""

    condition: str
    chunks: list[list[tuple[float, int]]]
    load_windows: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each timed load

    @property
    def steady_start(self) -> float:
        """When the last stream got its first chunk: from then on every stream is in the decode batch."""
        return max(chunks[0][0] for chunks in self.chunks)

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of every inter-chunk interval that starts once every stream is running."""
        start = self.steady_start
        out = []
        for chunks in self.chunks:
            times = [t for t, n in chunks if n > 0]
            out.extend((a, b) for a, b in itertools.pairwise(times) if a >= start)
        return out

    def gap_seconds(self) -> list[float]:
        return [b - a for a, b in self.gaps()]

    def _overlaps_load(self, a: float, b: float) -> bool:
        return any(a < end and b > start for start, end in self.load_windows)

    def gaps_overlapping_loads(self) -> list[float]:
        return [b - a for a, b in self.gaps() if self._overlaps_load(a, b)]

    def gaps_without_loads(self) -> list[float]:
        return [b - a for a, b in self.gaps() if not self._overlaps_load(a, b)]

    @property
    def max_tokens_per_chunk(self) -> int:
        return max(n for chunks in self.chunks for _, n in chunks)


class Churner(threading.Thread):
    """Loads and unloads one adapter directory under fresh ids, `pause` seconds between cycles, until stopped;
    each load's (start, end) is recorded. Waits for `go` before the first load. Errors are kept for the main
    thread. The pause leaves decode steps with no load in flight, so gaps with and without one can be told apart."""

    def __init__(self, target: str, path: str, prefix: str, pause: float) -> None:
        super().__init__(name="adapter-churn", daemon=True)
        self.target, self.path, self.prefix, self.pause = target, path, prefix, pause
        self.go = threading.Event()
        self.stop = threading.Event()
        self.windows: list[tuple[float, float]] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            with Client(self.target, timeout=CALL_TIMEOUT_S) as client:
                client.model_info()
                self.go.wait()
                n = 0
                while not self.stop.is_set():
                    adapter_id = f"{self.prefix}-{n}"
                    start = time.perf_counter()
                    client.load_adapter(adapter_id, self.path)
                    self.windows.append((start, time.perf_counter()))
                    client.unload_adapter(adapter_id)
                    n += 1
                    self.stop.wait(self.pause)
        except Exception:
            self.error = traceback.format_exc()


async def _streams(target: str, settings: LoadSettings, tokens: int, on_all_started: threading.Event | None) -> list:
    """Run the S streams concurrently; returns each stream's [(arrival time, tokens in chunk), ...]."""
    adapters = ["" if i % 2 == 0 else "resident" for i in range(settings.streams)]
    first_seen = [False] * settings.streams

    async def one(i: int, client: AsyncClient) -> list[tuple[float, int]]:
        chunks = []
        async for chunk in client.generate_stream(
            messages=[{"role": "user", "content": STREAM_PROMPTS[i % len(STREAM_PROMPTS)]}],
            adapter_id=adapters[i],
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            temperature=0.0,
        ):
            chunks.append((time.perf_counter(), len(chunk.token_ids)))
            if not first_seen[i] and chunk.token_ids:
                first_seen[i] = True
                if all(first_seen) and on_all_started is not None:
                    on_all_started.set()
        return chunks

    async with AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        await client.model_info()  # connect before the streams start
        results = await asyncio.gather(*(one(i, client) for i in range(settings.streams)))
    for i, chunks in enumerate(results):
        got = sum(n for _, n in chunks)
        if got != tokens:
            raise RuntimeError(f"stream {i} generated {got} tokens, expected {tokens}")
    return results


def stream_run(target: str, settings: LoadSettings, churn_path: str | None, label: str) -> StreamRun:
    if churn_path is None:
        return StreamRun("baseline", asyncio.run(_streams(target, settings, settings.new_tokens, None)))
    churner = Churner(target, churn_path, f"churn-{label}", settings.churn_pause)
    churner.start()
    try:
        streams = asyncio.run(_streams(target, settings, settings.new_tokens, churner.go))
    finally:
        churner.go.set()  # never leave it waiting
        churner.stop.set()
        churner.join(CALL_TIMEOUT_S)
    if churner.is_alive():
        raise RuntimeError("the adapter churn thread did not stop (a LoadAdapter/UnloadAdapter call hangs?)")
    if churner.error is not None:
        raise RuntimeError(f"adapter churn failed during the streams:\n{churner.error}")
    # Loads that started after the last chunk do not overlap the streams: keep only those that did.
    end = max(chunks[-1][0] for chunks in streams)
    return StreamRun("under_load", streams, [w for w in churner.windows if w[0] < end])


def measure_stall(target: str, churn_path: str, settings: LoadSettings) -> list[StreamRun]:
    """Baseline and under-load batches of streams taking turns; one short warm-up batch without loads."""
    labels = itertools.count()

    def describe(run: StreamRun) -> str:
        gaps = run.gap_seconds()
        loads = f", {len(run.load_windows)} loads" if run.condition == "under_load" else ""
        return f"{len(gaps)} gaps, p50 {percentile(gaps, 50) * 1e3:.0f} ms, max {max(gaps) * 1e3:.0f} ms{loads}"

    rounds = timed_rounds(
        {
            "baseline": lambda: stream_run(target, settings, None, ""),
            "under_load": lambda: stream_run(target, settings, churn_path, str(next(labels))),
        },
        settings.rounds,
        warmups={"streams": lambda: asyncio.run(_streams(target, settings, min(8, settings.new_tokens), None))},
        describe=describe,
    )
    return [run for m in rounds.measurements.values() for run in m.runs]


def stall_summary(runs: list[StreamRun]) -> dict[str, object]:
    by_condition: dict[str, list[StreamRun]] = {"baseline": [], "under_load": []}
    for run in runs:
        by_condition[run.condition].append(run)
    out: dict[str, object] = {}
    for condition, group in by_condition.items():
        gaps = [g for run in group for g in run.gap_seconds()]
        entry: dict[str, object] = {
            "gap_ms": ms_summary(gaps),
            "gaps_ms": [g * 1e3 for g in gaps],
            "max_gap_ms_per_round": [max(run.gap_seconds()) * 1e3 for run in group],
            "max_tokens_per_chunk": max(run.max_tokens_per_chunk for run in group),
        }
        if condition == "under_load":
            windows = [w for run in group for w in run.load_windows]
            entry["loads"] = len(windows)
            entry["load_ms_during_streams"] = ms_summary([end - start for start, end in windows])
            overlapping = [g for run in group for g in run.gaps_overlapping_loads()]
            entry["gaps_overlapping_a_load"] = ms_summary(overlapping)
            entry["gaps_overlapping_a_load_ms"] = [g * 1e3 for g in overlapping]
            entry["gaps_without_a_load"] = ms_summary([g for run in group for g in run.gaps_without_loads()])
        out[condition] = entry
    base_p50 = out["baseline"]["gap_ms"]["p50"]
    out["stall_ms"] = out["under_load"]["gap_ms"]["max"] - base_p50
    out["baseline_max_over_p50_ms"] = out["baseline"]["gap_ms"]["max"] - base_p50
    return out


# ---- part 3: cold vs warm requests ----------------------------------------------------------------
def states(client: Client) -> dict[str, str]:
    return {info.adapter_id: info.state for info in client.list_adapters()}


def pick(current: dict[str, str], state: str) -> str | None:
    candidates = sorted(adapter_id for adapter_id, s in current.items() if s == state)
    return candidates[0] if candidates else None


def measure_tiers(target: str, paths: dict[str, str], settings: LoadSettings) -> dict[str, object]:
    """Time a short greedy request per adapter state; the state is checked right before each timed request.
    The request is streamed so that its time to first token (where bringing an adapter in lands: before the
    prefill) is recorded beside the end-to-end latency."""
    timings: dict[str, list[float]] = {state: [] for state in TIER_STATES}
    first_token: dict[str, list[float]] = {state: [] for state in TIER_STATES}
    mismatches: list[dict[str, object]] = []
    options = dict(
        messages=[{"role": "user", "content": TIER_PROMPT}],
        max_new_tokens=TIER_TOKENS,
        min_new_tokens=TIER_TOKENS,
        temperature=0.0,
    )

    def timed(client: Client, adapter_id: str, state: str) -> None:
        start = time.perf_counter()
        first, tokens = None, 0
        for chunk in client.generate_stream(adapter_id=adapter_id, **options):
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            tokens += len(chunk.token_ids)
        timings[state].append(time.perf_counter() - start)
        first_token[state].append(first - start)
        if tokens != TIER_TOKENS:
            raise RuntimeError(f"{adapter_id or 'base'} generated {tokens} tokens, expected {TIER_TOKENS}")

    with Client(target, timeout=CALL_TIMEOUT_S) as client:
        for adapter_id, path in paths.items():
            client.load_adapter(adapter_id, path)
        registered = states(client)
        log(f"tiers: registered {len(paths)} adapters: {registered}")
        client.generate(**options)  # warm-up on the base
        for rep in range(settings.tier_repeats):
            order = TIER_STATES[rep % len(TIER_STATES) :] + TIER_STATES[: rep % len(TIER_STATES)]
            for state in order:
                if state == "base":
                    timed(client, "", "base")
                    continue
                current = states(client)
                adapter_id = pick(current, state)
                if adapter_id is not None and state == "device":
                    client.generate(adapter_id=adapter_id, **options)  # warm: the timed request is the second
                    current = states(client)
                if adapter_id is None or current.get(adapter_id) != state:
                    log(f"warning: tiers: wanted an adapter in state {state!r}, states are {current}; skipped")
                    mismatches.append({"wanted": state, "adapter": adapter_id, "states": current})
                    continue
                timed(client, adapter_id, state)
            log(
                f"tiers round {rep + 1}/{settings.tier_repeats}: "
                + ", ".join(f"{s} {timings[s][-1] * 1e3:.0f} ms" for s in TIER_STATES if timings[s])
            )
        final = states(client)
    return {
        "registered_states": registered,
        "final_states": final,
        "seconds": timings,
        "first_token_seconds": first_token,
        "latency_ms": {state: ms_summary(t) for state, t in timings.items()},
        "first_token_ms": {state: ms_summary(t) for state, t in first_token.items()},
        "state_mismatches": mismatches,
    }


# ---- reporting ------------------------------------------------------------------------------------
def hot_load_table(loads: list[RankLoads]) -> str:
    rows = [
        [
            r.rank,
            f"{r.size_bytes / 1e6:.1f}",
            len(r.seconds),
            *(f"{percentile(r.seconds, q) * 1e3:.0f}" for q in (50, 95)),
            f"{max(r.seconds) * 1e3:.0f}",
            f"{percentile(r.unload_seconds, 50) * 1e3:.1f}",
        ]
        for r in loads
    ]
    return format_table(["rank", "size MB", "loads", "p50 ms", "p95 ms", "max ms", "unload p50 ms"], rows)


def stall_table(stall: dict[str, object]) -> str:
    under = stall["under_load"]
    rows = [
        ("baseline (no loads)", stall["baseline"]["gap_ms"]),
        (f"under load ({under['loads']} loads)", under["gap_ms"]),
        ("  overlapping a load", under["gaps_overlapping_a_load"]),
        ("  no load in flight", under["gaps_without_a_load"]),
    ]
    cells = [[name, g["n"], *(f"{g[k]:.0f}" for k in ("p50", "p95", "p99", "max"))] for name, g in rows]
    return format_table(["gaps", "n", "p50 ms", "p95 ms", "p99 ms", "max ms"], cells)


def tier_table(tiers: dict[str, object]) -> str:
    e2e, ttft = tiers["latency_ms"], tiers["first_token_ms"]
    rows = [
        [
            state,
            e2e[state]["n"],
            f"{e2e[state]['p50']:.0f}",
            f"{e2e[state]['p95']:.0f}",
            f"{e2e[state]['p50'] - e2e['device']['p50']:+.0f}",
            f"{ttft[state]['p50']:.0f}",
            f"{ttft[state]['p50'] - ttft['device']['p50']:+.0f}",
        ]
        for state in TIER_STATES
    ]
    return format_table(
        ["state", "requests", "e2e p50 ms", "e2e p95 ms", "vs device", "TTFT p50 ms", "vs device"], rows
    )


def result(
    model_name: str,
    settings: LoadSettings,
    loads: list[RankLoads],
    stall: dict[str, object],
    tiers: dict[str, object],
    max_seq_len: int,
) -> dict[str, object]:
    return {
        "model": model_name,
        "device": "cpu",
        "dtype": "float32",
        "target_modules": "all-linear",
        "server": {
            "max_lora_rank": MAX_LORA_RANK,
            "max_seq_len": max_seq_len,
            "parts_1_2": {"max_adapters": 4, "max_batch_size": settings.streams},
            "part_3": {"max_adapters": TIER_SLOTS, "max_cpu_adapters": TIER_HOST_CACHE},
            "in_process": "the server runs in a thread of the benchmark process (deltaserve.testing ServerThread)",
        },
        "statistic": "p50/p95: linear interpolation between order statistics; times from time.perf_counter",
        "hot_load": {
            f"r{r.rank}": {
                "rank": r.rank,
                "size_bytes": r.size_bytes,
                "file_bytes": r.file_bytes,
                "seconds": r.seconds,
                "p50_ms": percentile(r.seconds, 50) * 1e3,
                "p95_ms": percentile(r.seconds, 95) * 1e3,
                "max_ms": max(r.seconds) * 1e3,
                "unload_seconds": r.unload_seconds,
                "state_after_load": sorted(set(r.states)),
            }
            for r in loads
        },
        "stall": {
            "streams": settings.streams,
            "stream_adapters": "even streams on the base, odd ones on a resident rank-16 adapter",
            "tokens_per_stream": settings.new_tokens,
            "churn_rank": settings.churn_rank,
            "churn_pause_s": settings.churn_pause,
            "definition": "gap = time between consecutive streamed chunks of one stream (client side), counted "
            "once every stream has its first chunk; stall_ms = under-load max gap - baseline p50 gap",
            **stall,
        },
        "tiers": {
            "adapters": TIER_ADAPTERS,
            "rank": TIER_RANK,
            "device_slots": TIER_SLOTS,
            "host_cache": TIER_HOST_CACHE,
            "tokens": TIER_TOKENS,
            **tiers,
        },
    }


def draw(data: dict[str, object]) -> object:
    """Load latency per rank (p50 bars, p95 whiskers), the gap distributions, and latency per adapter state."""

    def plot(ax_load: object, ax_gap: object, ax_tier: object) -> None:
        draw_loads(ax_load, data)
        draw_gaps(ax_gap, data)
        draw_tiers(ax_tier, data)

    return plot


def draw_loads(ax_load: object, data: dict[str, object]) -> None:
    hot = list(data["hot_load"].values())
    labels = [f"r{h['rank']}\n{h['size_bytes'] / 1e6:.0f} MB" for h in hot]
    p50 = [h["p50_ms"] for h in hot]
    p95 = [h["p95_ms"] for h in hot]
    bars = ax_load.bar(
        labels, p50, color="#4c72b0", yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]]
    )
    ax_load.bar_label(bars, fmt="%.0f", label_type="center", color="white")
    ax_load.set_ylabel("LoadAdapter latency, ms (p50, whisker to p95)")
    ax_load.set_title("1. hot load (all-linear LoRA)", fontsize=10)


def draw_gaps(ax_gap: object, data: dict[str, object]) -> None:
    stall = data["stall"]
    curves = (
        ("baseline (no loads)", stall["baseline"]["gaps_ms"], "#55a868", "-"),
        ("under load, all gaps", stall["under_load"]["gaps_ms"], "#c44e52", "-"),
        ("under load, overlapping a load", stall["under_load"]["gaps_overlapping_a_load_ms"], "#c44e52", ":"),
    )
    for name, values, color, style in curves:
        gaps = sorted(values)
        if gaps:
            fractions = [(i + 1) / len(gaps) for i in range(len(gaps))]
            ax_gap.step(gaps, fractions, where="post", color=color, linestyle=style, label=name)
    ax_gap.set_xlabel("inter-chunk gap, ms")
    ax_gap.set_ylabel("fraction of gaps ≤ x")
    ax_gap.set_title(
        f"2. decode gaps, {stall['streams']} streams, r{stall['churn_rank']} loads ({stall['under_load']['loads']})",
        fontsize=10,
    )
    ax_gap.legend(loc="lower right", fontsize=8)


def draw_tiers(ax_tier: object, data: dict[str, object]) -> None:
    latency, first_token = data["tiers"]["latency_ms"], data["tiers"]["first_token_ms"]
    names = [s for s in TIER_STATES if latency[s]["n"]]
    bars = ax_tier.bar(names, [latency[s]["p50"] for s in names], color="#4c72b0", label="end to end")
    ax_tier.bar_label(bars, fmt="%.0f")
    inner = ax_tier.bar(names, [first_token[s]["p50"] for s in names], width=0.5, color="#dd8452", label="first token")
    ax_tier.bar_label(inner, fmt="%.0f", label_type="center")
    ax_tier.set_ylabel("request latency, ms (p50)")
    ax_tier.set_ylim(0, max(latency[s]["p50"] for s in names) * 1.2)
    ax_tier.legend(loc="upper right", fontsize=8, ncols=2)
    tiers = data["tiers"]
    ax_tier.set_title(
        f"3. {tiers['tokens']}-token request by adapter state ({tiers['device_slots']} slots, "
        f"{tiers['host_cache']} host)",
        fontsize=10,
    )


# ---- main -----------------------------------------------------------------------------------------
def make_adapters(model_dir: str, root: str, settings: LoadSettings) -> tuple[dict[int, str], str, dict[str, str]]:
    """One adapter per rank, the resident rank-16 one, and the tier adapters."""
    log(f"making LoRA adapters: ranks {list(settings.ranks)} and {TIER_ADAPTERS} x rank {TIER_RANK}")
    rank_paths = {rank: make_adapter(model_dir, root, f"r{rank}", rank, seed=rank) for rank in settings.ranks}
    resident = rank_paths.get(RESIDENT_RANK) or make_adapter(model_dir, root, "resident", RESIDENT_RANK, 99)
    tier_paths = {
        f"tier{i}": make_adapter(model_dir, root, f"tier{i}", TIER_RANK, seed=100 + i) for i in range(TIER_ADAPTERS)
    }
    return rank_paths, resident, tier_paths


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(LoadSettings, argv, description(__doc__))
    quiet()
    model_dir, model_name = embedded_model()
    tokens = max(settings.new_tokens, TIER_TOKENS)
    max_seq_len = max_seq_len_for(AutoTokenizer.from_pretrained(model_dir), tokens, [*STREAM_PROMPTS, TIER_PROMPT])
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-") as root:
        rank_paths, resident, tier_paths = make_adapters(model_dir, root, settings)
        # The resident adapter, the one being loaded, and room to spare: loads never evict.
        config = cpu_config(
            model_dir,
            max_batch_size=settings.streams,
            max_seq_len=max_seq_len,
            max_adapters=4,
            max_lora_rank=MAX_LORA_RANK,
        )
        log("part 1/2: starting the server")
        with ServerThread(config) as server:
            loads = measure_hot_loads(server.target, rank_paths, settings)
            with Client(server.target, timeout=CALL_TIMEOUT_S) as client:
                client.load_adapter("resident", resident)
            stall = stall_summary(measure_stall(server.target, rank_paths[settings.churn_rank], settings))
        tier_config = cpu_config(
            model_dir,
            max_batch_size=4,
            max_seq_len=max_seq_len,
            max_adapters=TIER_SLOTS,
            max_cpu_adapters=TIER_HOST_CACHE,
            max_lora_rank=MAX_LORA_RANK,
        )
        log("part 3: starting the server")
        with ServerThread(tier_config) as server:
            tiers = measure_tiers(server.target, tier_paths, settings)
    data = result(model_name, settings, loads, stall, tiers, max_seq_len)
    text = summary_text(model_name, settings, loads, stall, tiers)
    title = f"{model_name}, fp32 CPU ({os.cpu_count()} cores)"
    report("adapter_load", settings, data, text, draw(data), panels=3, size=(15, 4.2), title=title, dpi=110)
    return 0


def summary_text(model_name: str, settings: LoadSettings, loads: list, stall: dict, tiers: dict) -> list[str]:
    load_ms = stall["under_load"]["load_ms_during_streams"]
    text = [
        f"{model_name} fp32 CPU ({os.cpu_count()} cores), all-linear LoRA, server max_lora_rank {MAX_LORA_RANK}\n",
        f"1. hot load: LoadAdapter until it returns, {settings.repeats} loads per rank (each then unloaded)",
        hot_load_table(loads) + "\n",
        f"2. decode gaps: {settings.streams} greedy streams x {settings.new_tokens} tokens, {settings.rounds} "
        f"round(s) per condition; under load = rank-{settings.churn_rank} adapters loaded and unloaded, "
        f"{settings.churn_pause:g} s apart",
        stall_table(stall),
        f"stall = under-load max gap - baseline p50 gap: {stall['stall_ms']:.0f} ms "
        f"(baseline max - baseline p50: {stall['baseline_max_over_p50_ms']:.0f} ms); "
        f"LoadAdapter during the streams: p50 {load_ms['p50']:.0f} ms, max {load_ms['max']:.0f} ms\n",
        f"3. request latency by adapter state: {TIER_TOKENS}-token greedy request, {TIER_ADAPTERS} rank-{TIER_RANK} "
        f"adapters over {TIER_SLOTS} device slots + {TIER_HOST_CACHE} host-cache entry",
        tier_table(tiers),
    ]
    if tiers["state_mismatches"]:
        text.append(f"warning: {len(tiers['state_mismatches'])} timed requests skipped: the wanted state was not found")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
