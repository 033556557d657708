"""Decode throughput relative to the base as one axis of a mixed LoRA batch grows: the number of distinct adapters
in the batch (--axis adapters) or their rank (--axis rank).

On the embedded SmolLM2-135M-Instruct in fp32 on the CPU, with the real deltaserve gRPC server as a `deltaserve
serve` process on 127.0.0.1 (max_batch_size N; every adapter holds a device slot, nothing is evicted). N
concurrent greedy streams (the harness's chat prompts, exactly `--new-tokens` tokens each: min_new_tokens =
max_new_tokens) run as one batch for

  base     no adapter
  K=k      (--axis adapters) request i on lora{i % k}: k distinct rank-`--rank` all-linear adapters in every step
  r=R      (--axis rank) request i on adapter i % K of the rank-R set: K distinct rank-R adapters; one server holds
           every set (max_lora_rank = the largest rank; a rank-R adapter fills the first R rows of its slot)

The adapters are real PEFT-format files (adapter_files.py; cached in benchmarks/.cache/). A 4-token warm-up batch
of every configuration, then `--rounds` rounds in which the configurations take turns. Two rates per batch:
end to end (generated tokens / wall seconds of the batch, client side) and decode (tokens / seconds over the
window in which all N rows decode together: from the last stream's first token to the first stream's last; the
ramp of requests reaching the engine one by one is left out; step ms = N / decode rate). Reported per
configuration: medians over rounds, their ratios to the base of the same run, and the bandwidth floor
1 / (1 + adapter bytes in the batch / base bytes): a memory-bound decode step cannot beat it.

Run:  python benchmarks/sweep.py --axis adapters   (N=64 x 64 tokens, K = 1 2 4 8 16 32 64 at rank 16, 2 rounds)
      python benchmarks/sweep.py --axis rank       (N=64 x 64 tokens, ranks 8 16 32 64 with K=8, 2 rounds)
      add --quick for a smoke run (N=8 x 8 tokens; K = 1 4 8, or ranks 8 64 with K=4; 1 round)
Writes benchmarks/results/adapter-scaling-cpu.json or rank-scaling-cpu.json (…-quick.json) and a PNG next to it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapter_files import adapter_set
from deltaserve.client import AsyncClient
from harness import (
    CALL_TIMEOUT_S,
    Measurement,
    Rounds,
    Run,
    ServerProcess,
    Settings,
    chat_messages,
    cpu_config,
    description,
    embedded_model,
    format_table,
    load_adapters,
    log,
    max_seq_len_for,
    on_loop,
    option,
    parse_settings,
    quiet,
    report,
    require,
    served,
    served_bytes,
    stream_chunks,
    timed_rounds,
)
from transformers import AutoTokenizer

BASE = "base"
WARMUP_TOKENS = 4
POINTS = {"adapters": (1, 2, 4, 8, 16, 32, 64), "rank": (8, 16, 32, 64)}
QUICK_POINTS = {"adapters": (1, 4, 8), "rank": (8, 64)}
STEMS = {"adapters": "adapter-scaling-cpu", "rank": "rank-scaling-cpu"}


@dataclass(frozen=True)
class SweepSettings(Settings):
    axis: str = option("adapters", "what grows: 'adapters' (distinct adapters per batch) or 'rank' (their rank)")
    points: tuple[int, ...] = option((), "values along the axis (() = adapters 1..64 or ranks 8..64)", minimum=1)
    requests: int = option(64, "concurrent requests N", quick=8, minimum=1)
    new_tokens: int = option(64, "tokens per request", quick=8, minimum=1)
    adapters: int = option(8, "distinct adapters K per batch on the rank axis", quick=4, minimum=1)
    rank: int = option(16, "LoRA rank on the adapters axis", minimum=1)
    rounds: int = option(2, "timed rounds", quick=1, minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.axis in POINTS, f"--axis must be one of {', '.join(POINTS)}")
        points = self.points or (QUICK_POINTS if self.quick else POINTS)[self.axis]
        object.__setattr__(self, "points", tuple(sorted(set(points))))
        most = max(self.points) if self.axis == "adapters" else self.adapters
        require(most <= self.requests, f"K={most} exceeds N={self.requests}: every adapter needs a request")

    def stem(self) -> str:
        return STEMS[self.axis]


@dataclass(frozen=True)
class Config:
    """One configuration: the adapter id of each of the N requests ("" = the base)."""

    name: str
    adapter_ids: list[str]
    adapters: int = 0  # distinct adapters in the batch
    rank: int = 0


def configs(s: SweepSettings) -> list[Config]:
    """The base, then one configuration per point; adapter ids are r{rank}-lora{i}."""
    n = s.requests
    if s.axis == "adapters":
        points = [(f"K={k}", k, s.rank) for k in s.points]
    else:
        points = [(f"r={r}", s.adapters, r) for r in s.points]
    return [Config(BASE, [""] * n)] + [
        Config(name, [f"r{rank}-lora{i % k}" for i in range(n)], k, rank) for name, k, rank in points
    ]


# ---- one batch of streams -------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch(Run):
    """A timed batch of streams, with when each chunk arrived."""

    chunks: list[list[tuple[float, int]]]  # per request: (arrival time, tokens) of every streamed chunk with tokens

    @property
    def decode_window(self) -> tuple[float, int]:
        """(seconds, tokens) while every row decodes: after the last first token, up to the first last token."""
        start = max(row[0][0] for row in self.chunks)
        end = min(row[-1][0] for row in self.chunks)
        return end - start, sum(n for row in self.chunks for t, n in row if start < t <= end)

    @property
    def decode_rate(self) -> float:
        seconds, tokens = self.decode_window
        return tokens / seconds if seconds > 0 else float("nan")

    @property
    def step_ms(self) -> float:
        return 1e3 * len(self.outputs) / self.decode_rate


async def run_batch(client: AsyncClient, adapter_ids: list[str], new_tokens: int) -> Batch:
    messages = chat_messages(len(adapter_ids))
    start = time.perf_counter()
    results = await asyncio.gather(
        *(stream_chunks(client, m, a, new_tokens) for m, a in zip(messages, adapter_ids, strict=True))
    )
    outputs = [ids for _, ids in results]
    batch = Batch(time.perf_counter() - start, outputs, [chunks for chunks, _ in results])
    if batch.tokens != len(messages) * new_tokens:
        raise RuntimeError(f"generated {batch.tokens} tokens, expected {len(messages) * new_tokens}")
    return batch


# ---- the sweep ------------------------------------------------------------------------------------
async def load_all(client: AsyncClient, paths: dict[str, str]) -> None:
    """Every adapter must land in a device slot: the sweep measures mixing, not residency."""
    for adapter_id, info in (await load_adapters(client, paths)).items():
        if info.state != "device":
            raise RuntimeError(f"{adapter_id} is {info.state!r} after loading; expected a device slot")


def adapter_paths(plan: list[Config], model_dir: str, model_name: str) -> dict[str, str]:
    """Adapter id -> directory: per rank, as many adapters as the configuration using most of them needs."""
    counts: dict[int, int] = {}
    for config in plan[1:]:
        counts[config.rank] = max(counts.get(config.rank, 0), config.adapters)
    return {
        f"r{rank}-lora{i}": path
        for rank, count in counts.items()
        for i, path in enumerate(adapter_set(model_dir, model_name, rank, count))
    }


def measure(server: ServerProcess, paths: dict[str, str], plan: list[Config], s: SweepSettings) -> Rounds:
    """Load every adapter, then the configurations take turns on one client (one event loop for all rounds)."""
    with asyncio.Runner() as runner:
        client = AsyncClient(server.target, timeout=CALL_TIMEOUT_S)
        runner.run(load_all(client, paths))
        runner.run(client.model_info())  # connected before the clock starts

        def system(config: Config, tokens: int) -> Callable[[], Batch]:
            return on_loop(runner, lambda: run_batch(client, config.adapter_ids, tokens))

        rounds = timed_rounds(
            {c.name: system(c, s.new_tokens) for c in plan},
            s.rounds,
            warmups={c.name: system(c, WARMUP_TOKENS) for c in plan},
            describe=lambda b: f"{b.rate:.1f} tok/s end to end, {b.decode_rate:.1f} decode ({b.step_ms:.0f} ms/step)",
        )
        runner.run(client.close())
    for config in plan:
        rounds.measurements[config.name].info["config"] = config
    return rounds


def adapter_bytes(paths: dict[str, str]) -> dict[str, int]:
    """Adapter id -> bytes of its A and B at its own rank in fp32: what a decode step reads for it."""
    return {adapter_id: served_bytes(path) for adapter_id, path in paths.items()}


def summarize(cells: dict[str, Measurement], batch_bytes: dict[str, int], base_bytes: int) -> dict[str, dict]:
    """Medians over rounds and their ratios to the base of the same run (with the base's rates beside them),
    the median of the per-round ratios, and the bandwidth floor."""
    base = cells[BASE]
    out = {}
    for name, cell in cells.items():
        config = cell.info["config"]
        per_round = [d / b for d, b in zip(cell.values("decode_rate"), base.values("decode_rate"), strict=True)]
        per_round_e2e = [r / b for r, b in zip(cell.values(), base.values(), strict=True)]
        last, base_last = cell.runs[-1].outputs, base.runs[-1].outputs
        out[name] = {
            "adapters": config.adapters,
            "rank": config.rank,
            "adapter_bytes": batch_bytes[name],
            "median_tokens_per_s": cell.median(),
            "median_decode_tokens_per_s": cell.median("decode_rate"),
            "base_median_tokens_per_s": base.median(),
            "base_median_decode_tokens_per_s": base.median("decode_rate"),
            "median_over_base": cell.median() / base.median(),
            "median_decode_over_base": cell.median("decode_rate") / base.median("decode_rate"),
            "median_of_per_round_decode_over_base": statistics.median(per_round),
            "median_of_per_round_over_base": statistics.median(per_round_e2e),
            "bandwidth_floor": 1 / (1 + batch_bytes[name] / base_bytes),
            "tokens_per_s": cell.values(),
            "decode_tokens_per_s": cell.values("decode_rate"),
            "per_round_decode_over_base": per_round,
            "seconds": cell.values("seconds"),
            "decode_step_ms": cell.values("step_ms"),
            "median_decode_step_ms": cell.median("step_ms"),
            "decode_window_share": [b.decode_window[1] / b.tokens for b in cell.runs],
            "rows_differing_from_base": sum(a != b for a, b in zip(last, base_last, strict=True)),
        }
    return out


def table(summary: dict[str, dict]) -> str:
    header = ["config", "K", "rank", "adapters MB", "tok/s e2e", "decode tok/s", "step ms", "e2e/base"]
    header += ["decode/base", "per-round", "floor", "rows!=base"]
    rows = [
        [
            name,
            s["adapters"],
            s["rank"] or "-",
            f"{s['adapter_bytes'] / 1e6:.1f}",
            f"{s['median_tokens_per_s']:.1f}",
            f"{s['median_decode_tokens_per_s']:.1f}",
            f"{s['median_decode_step_ms']:.0f}",
            f"{s['median_over_base']:.2f}x",
            f"{s['median_decode_over_base']:.2f}x",
            f"{s['median_of_per_round_decode_over_base']:.2f}x",
            f"{s['bandwidth_floor']:.2f}",
            s["rows_differing_from_base"],
        ]
        for name, s in summary.items()
    ]
    return format_table(header, rows)


def draw(summary: dict[str, dict], x_key: str, x_label: str, title: str) -> object:
    """Decode and end-to-end throughput relative to the base against the axis, with the bandwidth floor."""
    points = [s for name, s in summary.items() if name != BASE]
    xs = [s[x_key] for s in points]

    def plot(ax: object) -> None:
        ax.plot(xs, [s["median_decode_over_base"] for s in points], "o-", color="#c44e52", label="decode / base")
        ax.plot(xs, [s["median_over_base"] for s in points], "s--", color="#4c72b0", label="end to end / base")
        for s in points:
            ax.plot([s[x_key]] * len(s["per_round_decode_over_base"]), s["per_round_decode_over_base"], "k.", ms=3)
        ax.plot(xs, [s["bandwidth_floor"] for s in points], ":", color="#8c8c8c", label="bandwidth floor")
        ax.axhline(1.0, color="k", linewidth=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, max(1.1, *(s["median_decode_over_base"] for s in points)) * 1.05)
        ax.set_xlabel(x_label)
        ax.set_ylabel("tokens/s relative to the base (same run)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)

    return plot


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(SweepSettings, argv, description(__doc__))
    quiet()
    model_dir, model_name = embedded_model()
    plan = configs(s)
    paths = adapter_paths(plan, model_dir, model_name)
    config = cpu_config(
        model_dir,
        max_batch_size=s.requests,
        max_seq_len=max_seq_len_for(AutoTokenizer.from_pretrained(model_dir), s.new_tokens),
        max_adapters=len(paths),
        max_lora_rank=max(c.rank for c in plan),
    )
    with ServerProcess(config) as server:
        log(f"loading {len(paths)} adapters; measuring {len(plan)} configurations")
        rounds = measure(server, paths, plan, s)
    sizes = adapter_bytes(paths)
    base_bytes = served_bytes(model_dir)
    batch_bytes = {c.name: sum(sizes[a] for a in set(c.adapter_ids) if a) for c in plan}
    summary = summarize(rounds.measurements, batch_bytes, base_bytes)
    what = f"rank-{s.rank} all-linear LoRA, K distinct adapters per batch"
    if s.axis == "rank":
        what = f"K={s.adapters} distinct all-linear LoRA adapters of each rank"
    title = f"{model_name} fp32 CPU: N={s.requests} x {s.new_tokens} tokens,\n{what}"
    x_label = "distinct adapters in the batch (K)" if s.axis == "adapters" else "LoRA rank"
    data = {
        "model": model_name,
        "device": "cpu",
        "dtype": "float32",
        "server": served(config, "max_batch_size", "max_seq_len", "max_adapters", "max_lora_rank"),
        "adapters": "per rank: lora0 saved by PEFT (lora_alpha=2*rank, all-linear, init_lora_weights=False); "
        "lora1.. cloned from its files with fresh random weights (benchmarks/adapter_files.py)",
        "base_bytes": base_bytes,
        "statistic": "median over rounds; ratios to the base of the same run; decode = streamed tokens / seconds "
        "while all N rows decode (client side); floor = 1 / (1 + adapter bytes in the batch / base bytes)",
        "load_average_after_rounds": rounds.loads,
        "configs": summary,
    }
    loads = ", ".join(f"{x:.2f}" for x in rounds.loads)
    text = [
        f"{title}; median of {s.rounds} round(s)".replace("\n", " "),
        table(summary),
        f"base {base_bytes / 1e6:.0f} MB; load average after rounds: {loads}",
    ]
    x_key = "adapters" if s.axis == "adapters" else "rank"
    report(f"{s.axis}_scaling", s, data, text, draw(summary, x_key, x_label, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
