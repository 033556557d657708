"""Shared by adapter_scaling.py and rank_scaling.py: batches of N concurrent greedy requests against the real server,
configurations taking turns each round, and the two throughputs reported for each batch.

  end to end   generated tokens / wall seconds of the whole batch, client side (prefill, gRPC, detokenization)
  decode       tokens / seconds over the window in which all N rows decode together: from the moment the last
               stream received its first token to the moment the first stream received its last one (client-side
               arrival of the streamed chunks). Requests reach the engine one by one, so the first few may be
               prefilled a step before the rest; the window leaves that ramp (and the last step's tail) out, and
               its step time is N / decode tokens per second.
Every request generates exactly `new_tokens` tokens (min_new_tokens = max_new_tokens: EOS never ends a row early).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapter_files import lora_bytes
from common import CHAT_PROMPTS, Run, log, pyplot, save_figure
from deltaserve.adapters import tensor_bytes
from deltaserve.client import AsyncClient
from deltaserve.server.config import ServerConfig
from transformers import PreTrainedTokenizerBase

CALL_TIMEOUT_S = 3600.0  # a hang shows up as DEADLINE_EXCEEDED rather than a stuck benchmark
BASE = "base"
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class Config:
    """One configuration: the adapter id of each of the N requests ("" = the base)."""

    name: str
    adapter_ids: list[str]
    adapters: int = 0  # distinct adapters in the batch
    rank: int = 0


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


@dataclass
class Cell:
    config: Config
    batches: list[Batch] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [b.rate for b in self.batches]

    def decode_rates(self) -> list[float]:
        return [b.decode_rate for b in self.batches]


def messages_for(n: int) -> list[str]:
    return [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(n)]


async def load_adapters(target: str, paths: dict[str, str]) -> dict[str, int]:
    """LoadAdapter each one (the server validates it); adapter id -> the size the server reports."""
    sizes = {}
    async with AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        for adapter_id, path in paths.items():
            info = await client.load_adapter(adapter_id, path)
            if info.state != "device":
                raise RuntimeError(f"{adapter_id} is {info.state!r} after loading; expected a device slot")
            sizes[adapter_id] = info.size_bytes
    return sizes


async def _stream(client: AsyncClient, message: str, adapter_id: str, new_tokens: int) -> list:
    chunks, ids = [], []
    async for chunk in client.generate_stream(
        messages=[{"role": "user", "content": message}],
        adapter_id=adapter_id,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        temperature=0.0,
    ):
        if chunk.token_ids:
            chunks.append((time.perf_counter(), len(chunk.token_ids)))
            ids.extend(chunk.token_ids)
    return chunks, ids


async def run_batch(client: AsyncClient, messages: list[str], adapter_ids: list[str], new_tokens: int) -> Batch:
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_stream(client, m, a, new_tokens) for m, a in zip(messages, adapter_ids, strict=True))
    )
    seconds = time.perf_counter() - start
    outputs = [ids for _, ids in results]
    if sum(map(len, outputs)) != len(messages) * new_tokens:
        raise RuntimeError(f"generated {sum(map(len, outputs))} tokens, expected {len(messages) * new_tokens}")
    return Batch(seconds, outputs, [chunks for chunks, _ in results])


async def measure(
    target: str, configs: list[Config], new_tokens: int, rounds: int, warmup_tokens: int
) -> tuple[dict[str, Cell], list[float]]:
    """A short warm-up batch of every configuration, then `rounds` rounds in which they take turns (the order
    rotates every round); also the 1-minute load average after each round."""
    cells = {c.name: Cell(c) for c in configs}
    loads = []
    async with AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        await client.model_info()  # connect before the clock starts
        for config in configs:
            await run_batch(client, messages_for(len(config.adapter_ids)), config.adapter_ids, warmup_tokens)
        log(f"warmed up {len(configs)} configurations")
        for round_ in range(rounds):
            k = round_ % len(configs)
            for config in configs[k:] + configs[:k]:
                messages = messages_for(len(config.adapter_ids))
                batch = await run_batch(client, messages, config.adapter_ids, new_tokens)
                cells[config.name].batches.append(batch)
                log(
                    f"round {round_ + 1}/{rounds} {config.name}: {batch.rate:.1f} tok/s end to end, "
                    f"{batch.decode_rate:.1f} decode ({batch.step_ms:.0f} ms/step)"
                )
            loads.append(os.getloadavg()[0])
    return cells, loads


def max_seq_len_for(tokenizer: PreTrainedTokenizerBase, new_tokens: int) -> int:
    """Room for the longest chat-rendered prompt plus the generated tokens."""
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
        for m in CHAT_PROMPTS
    ]
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered)
    return longest + new_tokens + 16


@dataclass(frozen=True)
class Sweep:
    cells: dict[str, Cell]
    base_bytes: int
    adapter_bytes: dict[str, int]  # adapter id -> bytes of its A and B at its rank in the served dtype
    loads: list[float]

    def config_bytes(self, config: Config) -> int:
        """Adapter bytes a decode step of this configuration reads besides the base's."""
        return sum(self.adapter_bytes[a] for a in set(config.adapter_ids) if a)

    def floors(self) -> dict[str, float]:
        """1 / (1 + adapter bytes / base bytes): a memory-bound decode step cannot do better against the base."""
        return {name: 1 / (1 + self.config_bytes(c.config) / self.base_bytes) for name, c in self.cells.items()}


def sweep(
    helpers: object,
    server_config: ServerConfig,
    paths: dict[str, str],
    configs: list[Config],
    rounds: int,
    new_tokens: int,
) -> Sweep:
    """Start the real server in-process, load every adapter, and measure the configurations in turns."""
    with helpers.ServerThread(server_config) as thread:
        asyncio.run(load_adapters(thread.target, paths))
        server = thread.server
        log(f"loaded {len(paths)} adapters; measuring {len(configs)} configurations")
        sizes = {r.adapter_id: lora_bytes(r.adapter, server.loaded.dtype) for r in server.registry.list()}
        base = tensor_bytes(server.loaded.model.parameters())
        cells, loads = asyncio.run(measure(thread.target, configs, new_tokens, rounds, WARMUP_TOKENS))
    return Sweep(cells, base, sizes, loads)


def summarize(cells: dict[str, Cell], floors: dict[str, float]) -> dict[str, dict[str, object]]:
    """Medians over rounds, and ratios to the base of the same run (median / median, and the median of the
    per-round ratios) next to each configuration's bandwidth floor."""
    base = cells[BASE]
    out = {}
    for name, cell in cells.items():
        per_round = [d / b for d, b in zip(cell.decode_rates(), base.decode_rates(), strict=True)]
        per_round_e2e = [r / b for r, b in zip(cell.rates(), base.rates(), strict=True)]
        last, base_last = cell.batches[-1].outputs, base.batches[-1].outputs
        out[name] = {
            "adapters": cell.config.adapters,
            "rank": cell.config.rank,
            "median_tokens_per_s": statistics.median(cell.rates()),
            "median_decode_tokens_per_s": statistics.median(cell.decode_rates()),
            "median_over_base": statistics.median(cell.rates()) / statistics.median(base.rates()),
            "median_decode_over_base": statistics.median(cell.decode_rates()) / statistics.median(base.decode_rates()),
            "median_of_per_round_decode_over_base": statistics.median(per_round),
            "median_of_per_round_over_base": statistics.median(per_round_e2e),
            "bandwidth_floor": floors.get(name, 1.0),
            "tokens_per_s": cell.rates(),
            "decode_tokens_per_s": cell.decode_rates(),
            "per_round_decode_over_base": per_round,
            "seconds": [b.seconds for b in cell.batches],
            "decode_step_ms": [b.step_ms for b in cell.batches],
            "median_decode_step_ms": statistics.median(b.step_ms for b in cell.batches),
            "decode_window_share": [b.decode_window[1] / b.tokens for b in cell.batches],
            "rows_differing_from_base": sum(a != b for a, b in zip(last, base_last, strict=True)),
        }
    return out


def table(summary: dict[str, dict[str, object]], adapter_mb: dict[str, float]) -> str:
    header = (
        f"{'config':<10} {'K':>3} {'rank':>4} {'adapters MB':>11} {'tok/s e2e':>9} {'decode tok/s':>12} "
        f"{'step ms':>8} {'e2e/base':>8} {'decode/base':>11} {'per-round':>9} {'floor':>6} {'rows!=base':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, s in summary.items():
        lines.append(
            f"{name:<10} {s['adapters']:>3} {s['rank'] or '-':>4} {adapter_mb.get(name, 0.0):>11.1f} "
            f"{s['median_tokens_per_s']:>9.1f} {s['median_decode_tokens_per_s']:>12.1f} "
            f"{s['median_decode_step_ms']:>8.0f} "
            f"{s['median_over_base']:>7.2f}x {s['median_decode_over_base']:>10.2f}x "
            f"{s['median_of_per_round_decode_over_base']:>8.2f}x {s['bandwidth_floor']:>6.2f} "
            f"{s['rows_differing_from_base']:>10}"
        )
    return "\n".join(lines)


def write_plot(summary: dict[str, dict[str, object]], x_key: str, x_label: str, title: str, path: Path) -> bool:
    """Decode and end-to-end throughput relative to the base against `x_key` (adapters or rank), with the
    bandwidth floor; False (with a warning) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    points = [s for name, s in summary.items() if name != BASE]
    xs = [s[x_key] for s in points]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [s["median_decode_over_base"] for s in points], "o-", color="#c44e52", label="decode / base")
    ax.plot(xs, [s["median_over_base"] for s in points], "s--", color="#4c72b0", label="end to end / base")
    for s in points:
        per_round = s["per_round_decode_over_base"]
        ax.plot([s[x_key]] * len(per_round), per_round, "k.", markersize=3)
    ax.plot(xs, [s["bandwidth_floor"] for s in points], ":", color="#8c8c8c", label="bandwidth floor")
    ax.axhline(1.0, color="k", linewidth=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(0, max(1.1, *(s["median_decode_over_base"] for s in points)) * 1.05)
    ax.set_xlabel(x_label)
    ax.set_ylabel("tokens/s relative to the base (same run)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True
