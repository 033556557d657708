"""The paged KV cache, measured: four side-by-side comparisons on the embedded SmolLM2-135M-Instruct, fp32, CPU.

Every server is a `deltaserve serve` subprocess (as in revision_ab.py) with a /metrics port, which is scraped
before and after each run; the counters and histograms below are those runs' deltas.

  concurrency  this checkout against `--revision` (default da0dcee, the dense-slab build, run from a git
               worktree) at equal KV memory: the old build with `--max-batch-size R --max-seq-len S` holds
               R x S x bytes_per_token of KV (bytes_per_token = 2 x layers x kv_heads x head_dim x 4, 46,080 for
               this model); the new one gets `--kv-cache-memory` of those same bytes, `--max-batch-size 256`
               and the same S. N requests with a seeded, log-uniform length mix (prompts of exact token counts
               made of whole vocabulary words, outputs of exact length: min_new_tokens = max_new_tokens) are
               submitted at once. Reported per build: generated tokens / wall time, the largest
               `deltaserve_batch_size` bucket reached (rows per decode step: the most requests decoded
               together) and the mean rows per step; the new build's preemptions.
  prefix       prefix caching, time to first token of a hit against a miss: one server, K rank-16 all-linear
               LoRA adapters. Per round and adapter, a chat request whose system prompt (~P tokens) starts with
               a fresh nonce (a miss), then the same system prompt with another question (a hit); one request
               in flight at a time, 4 new tokens each. TTFT is the client's time to the first streamed chunk.
  seq-len      throughput does not depend on --max-seq-len: two servers, 512 and 8192, the same
               --kv-cache-memory, the workload of throughput.py (N concurrent greedy chat requests of exactly
               T tokens on the base) in turns.
  chunked      chunked prefill: 8 greedy streams decoding while long prompts (~L tokens) arrive, spaced by the
               streams' progress; every inter-token gap of the 8 streams (between consecutive streamed
               chunks), for `--max-prefill-tokens 256` (chunked) against 4096 (one forward per prompt).

Run:  python benchmarks/paged.py                              (all four parts; N=48, R=8, S=2048)
      python benchmarks/paged.py --quick                      (every part at its smallest settings)
      python benchmarks/paged.py --parts prefix,chunked       (some parts alone)
Writes benchmarks/results/paged-cpu.json (…-quick.json for --quick; paged-cpu-<parts>.json for some parts) and
a PNG with a panel per part next to it (skipped with a warning when matplotlib is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from deltaserve.client import AsyncClient
from deltaserve.server.config import parse_memory
from deltaserve.testing.helpers import free_port
from harness import (
    CALL_TIMEOUT_S,
    CHAT_PROMPTS,
    REPO,
    Run,
    Settings,
    chat_messages,
    description,
    embedded_model,
    format_table,
    log,
    make_adapter,
    ms_summary,
    on_loop,
    option,
    parse_settings,
    percentile,
    quiet,
    ratio,
    report,
    require,
    timed_rounds,
)
from prometheus_client.parser import text_string_to_metric_families
from revision_ab import SHIM, batch, checkout, start_server
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

PARTS = ("concurrency", "prefix", "seq-len", "chunked")
NEW_BUILD = [sys.executable, "-c", "import sys; from deltaserve.server.cli import main; sys.exit(main())"]
NEW_BATCH_SIZE = 256
TTFT_TOKENS = 4  # tokens of every prefix-part request: the first one is what is timed
LONG_NEW_TOKENS = 4  # tokens the long prompts of the chunked part generate


@dataclass(frozen=True)
class PagedSettings(Settings):
    STEM = "paged-cpu"

    parts: str = option(",".join(PARTS), "comma-separated parts to run, of " + ", ".join(PARTS))
    seed: int = option(0, "seed of the length mix, the prompt words and the nonces")
    kv_cache_memory: str = option("1GiB", "--kv-cache-memory of the prefix, seq-len and chunked servers")
    # concurrency
    revision: str = option("da0dcee", "the dense-slab build the concurrency part compares against")
    requests: int = option(48, "concurrency: requests N, submitted at once", quick=8, minimum=1)
    prompt_range: tuple[int, ...] = option(
        (50, 1500), "concurrency: shortest and longest prompt, tokens", quick=(20, 200), minimum=1
    )
    output_range: tuple[int, ...] = option(
        (20, 300), "concurrency: shortest and longest output, tokens", quick=(8, 32), minimum=1
    )
    old_batch_size: int = option(8, "concurrency: R, the old build's --max-batch-size", quick=2, minimum=1)
    seq_len: int = option(2048, "concurrency: S, --max-seq-len of both builds", quick=512, minimum=16)
    concurrency_rounds: int = option(1, "concurrency: timed rounds", minimum=1)
    # prefix
    adapters: int = option(8, "prefix: LoRA adapters K (rank 16, all-linear)", quick=4, minimum=1)
    system_tokens: int = option(1000, "prefix: P, tokens of the shared system prompt", quick=200, minimum=16)
    prefix_rounds: int = option(3, "prefix: rounds of one miss and one hit per adapter", quick=1, minimum=1)
    # seq-len
    batch_requests: int = option(16, "seq-len: concurrent chat requests", quick=4, minimum=1)
    batch_tokens: int = option(64, "seq-len: tokens per request", quick=8, minimum=1)
    seq_lens: tuple[int, ...] = option((512, 8192), "seq-len: the two --max-seq-len values", minimum=256)
    rounds: int = option(3, "seq-len: timed rounds", quick=1, minimum=1)
    # chunked
    streams: int = option(8, "chunked: decoding streams", minimum=1)
    stream_tokens: int = option(128, "chunked: tokens per stream", quick=32, minimum=4)
    long_prompts: int = option(2, "chunked: long prompts arriving during the streams", minimum=1)
    long_tokens: int = option(2000, "chunked: L, tokens of a long prompt", quick=400, minimum=16)
    prefill_budgets: tuple[int, ...] = option(
        (256, 4096), "chunked: --max-prefill-tokens, chunked then unchunked", minimum=1
    )
    chunked_rounds: int = option(2, "chunked: timed rounds", quick=1, minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.selected) - set(PARTS))
        require(bool(self.selected) and not unknown, f"--parts takes {', '.join(PARTS)}; got {unknown or 'none'}")
        for name in ("prompt_range", "output_range", "seq_lens", "prefill_budgets"):
            value = getattr(self, name)
            require(len(value) == 2, f"--{name.replace('_', '-')} takes two values")
        require(self.prompt_range[0] <= self.prompt_range[1], "--prompt-range: shortest first")
        require(self.output_range[0] <= self.output_range[1], "--output-range: shortest first")
        require(
            self.prompt_range[1] + self.output_range[1] <= self.seq_len,
            "the longest prompt plus the longest output must fit --seq-len",
        )
        require(self.batch_tokens + 128 <= min(self.seq_lens), "--seq-lens must hold a chat prompt and --batch-tokens")
        try:
            kv_bytes = parse_memory(self.kv_cache_memory)
        except ValueError:
            kv_bytes = None
        require(kv_bytes is not None, f"--kv-cache-memory must be a size such as 1GiB, got {self.kv_cache_memory!r}")

    @property
    def selected(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.parts.split(",") if part.strip())

    def stem(self) -> str:
        chosen = self.selected
        return self.STEM if set(chosen) == set(PARTS) else self.STEM + "-" + "-".join(chosen)


# ---- prompts of an exact token count --------------------------------------------------------------
class Words:
    """Prompts made of whole words of the tokenizer's vocabulary (each word one token after a space), trimmed or
    extended until the tokenizer counts exactly the tokens asked for."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        # " word" tokens whose capitalised form is a token too: mostly whole words rather than word pieces.
        self.words = sorted(
            t[1:]
            for t in vocab
            if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) > 4 and "Ġ" + t[1:].title() in vocab
        )
        require(len(self.words) > 1000, "this tokenizer has no byte-level BPE word tokens to build prompts from")

    def count(self, text: str) -> int:
        """Tokens of a raw prompt as the server counts them (tokenizer(prompt), special tokens included)."""
        return len(self.tokenizer(text)["input_ids"])

    def text(self, rng: random.Random, tokens: int, head: str = "") -> str:
        """`head` (e.g. a nonce) followed by words, exactly `tokens` tokens in all."""
        words = rng.choices(self.words, k=max(tokens - (self.count(head) if head else 0), 1))
        while (have := self.count(text := head + " " + " ".join(words))) != tokens:
            if have > tokens and words:
                words.pop()
            else:
                words.append(rng.choice(self.words))
            require(len(words) <= 2 * tokens + 8, f"cannot build a prompt of exactly {tokens} tokens")
        return text


# ---- servers and their metrics --------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    process: subprocess.Popen
    target: str
    metrics_port: int


@contextlib.contextmanager
def serving(builds: dict[str, tuple[list[str], list[str]]]) -> Iterator[dict[str, Served]]:
    """Start every (command, serve flags) build in turn with a /metrics port; stop them all at the end."""
    started: dict[str, Served] = {}
    try:
        for name, (command, args) in builds.items():
            port = free_port()
            process, target = start_server(name, command, [*args, "--metrics-port", str(port)])
            started[name] = Served(process, target, port)
        yield started
    finally:
        for served in started.values():
            served.process.terminate()
        for served in started.values():
            served.process.wait(timeout=60)


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a server's /metrics: (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def sample(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The value of one sample (0 when the server does not export it)."""
    return next((v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())), 0.0)


def delta(before: list, after: list, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def batch_histogram(before: list, after: list) -> dict[float, float]:
    """The `deltaserve_batch_size` observations between two scrapes: cumulative count per bucket bound."""
    name = "deltaserve_batch_size_bucket"
    return {
        float(labels["le"]): value - sample(before, name, le=labels["le"]) for n, labels, value in after if n == name
    }


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


def largest_bucket(histogram: dict[float, float]) -> tuple[float, float] | None:
    """(lower, upper) bound of the bucket holding the largest observation: the smallest bound whose cumulative
    count is the total, and the bound below it; None without observations."""
    total = histogram.get(math.inf, 0.0)
    if total <= 0:
        return None
    bounds = sorted(histogram)
    upper = next(b for b in bounds if histogram[b] >= total)
    lower = max((b for b in bounds if b < upper), default=0.0)
    return lower, upper


# ---- part 1: concurrency at equal KV memory -------------------------------------------------------
def bytes_per_token(model_dir: str) -> int:
    """K and V of one position over every layer, fp32."""
    config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4


def length_mix(s: PagedSettings) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of the N requests: log-uniform in each range (many short requests, a few
    long ones), seeded."""
    rng = random.Random(s.seed)

    def draw(lo: int, hi: int) -> int:
        return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))

    return [(draw(*s.prompt_range), draw(*s.output_range)) for _ in range(s.requests)]


@dataclass(frozen=True)
class MixRun(Run):
    """One concurrency run: the wall time, every request's output, and the server's counters over the run."""

    histogram: dict[float, float] = field(default_factory=dict)
    batch_rows: float = 0.0  # the histogram's sum: rows over all decode steps
    preemptions: float = 0.0

    @property
    def steps(self) -> float:
        return self.histogram.get(math.inf, 0.0)

    @property
    def mean_rows(self) -> float:
        return self.batch_rows / self.steps if self.steps else math.nan

    @property
    def max_rows(self) -> float:
        bucket = largest_bucket(self.histogram)
        return bucket[1] if bucket else math.nan


async def mix_run(served: Served, prompts: list[str], outputs: list[int]) -> MixRun:
    """All requests at once, each of exactly its output length; timed from the first submit."""
    before = scrape(served.metrics_port)
    async with AsyncClient(served.target, timeout=CALL_TIMEOUT_S) as client:
        await client.model_info()  # connect before the clock starts
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                client.generate(prompt, max_new_tokens=n, min_new_tokens=n, temperature=0.0)
                for prompt, n in zip(prompts, outputs, strict=True)
            )
        )
        seconds = time.perf_counter() - start
    after = scrape(served.metrics_port)
    run = MixRun(
        seconds,
        [r.token_ids for r in results],
        batch_histogram(before, after),
        delta(before, after, "deltaserve_batch_size_sum"),
        delta(before, after, "deltaserve_preemptions_total"),
    )
    if run.tokens != sum(outputs):
        raise RuntimeError(f"generated {run.tokens} tokens, expected {sum(outputs)}")
    return run


def concurrency_part(s: PagedSettings, model_dir: str, words: Words) -> dict[str, Any]:
    per_token = bytes_per_token(model_dir)
    kv_bytes = s.old_batch_size * s.seq_len * per_token
    mix = length_mix(s)
    log(
        f"concurrency: {s.requests} requests, {sum(p for p, _ in mix)} prompt and {sum(o for _, o in mix)} output "
        f"tokens; KV {kv_bytes / 2**20:.1f} MiB ({s.old_batch_size} x {s.seq_len} x {per_token} bytes)"
    )
    common = ["--max-seq-len", str(s.seq_len), "--log-level", "WARNING"]
    with tempfile.TemporaryDirectory(prefix="deltaserve-paged-") as tmp:
        old_tree = checkout(s.revision, tmp)
        builds = {
            "old": ([sys.executable, "-c", SHIM, old_tree], ["--max-batch-size", str(s.old_batch_size), *common]),
            "new": (
                NEW_BUILD,
                ["--max-batch-size", str(NEW_BATCH_SIZE), "--kv-cache-memory", str(kv_bytes), *common],
            ),
        }
        try:
            with serving(builds) as servers, asyncio.Runner() as runner:
                calls = dict.fromkeys(servers, 0)

                def system(name: str) -> Callable[[], MixRun]:
                    def run() -> MixRun:
                        # Fresh words every round (the same for both builds): no prefix-cache hit across rounds.
                        rng = random.Random(f"{s.seed}-mix-{calls[name]}")
                        calls[name] += 1
                        prompts = [words.text(rng, p) for p, _ in mix]
                        return runner.run(mix_run(servers[name], prompts, [o for _, o in mix]))

                    return run

                def warmup(name: str) -> Callable[[], MixRun]:
                    prompts = [words.text(random.Random(f"warm-{i}"), 32) for i in range(2)]
                    return on_loop(runner, lambda: mix_run(servers[name], prompts, [4, 4]))

                cells = timed_rounds(
                    {name: system(name) for name in servers},
                    s.concurrency_rounds,
                    warmups={name: warmup(name) for name in servers},
                    describe=lambda r: f"{r.rate:.1f} tok/s, up to {r.max_rows:g} rows, {r.preemptions:g} preemptions",
                ).measurements
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", old_tree], check=False)
    same = sum(a == b for a, b in zip(cells["old"].runs[-1].outputs, cells["new"].runs[-1].outputs, strict=True))
    return {
        "old_revision": s.revision,
        "kv_cache_bytes": kv_bytes,
        "bytes_per_token": per_token,
        "lengths": [{"prompt": p, "output": o} for p, o in mix],
        "old_flags": builds["old"][1],
        "new_flags": builds["new"][1],
        "builds": {
            name: {
                "median_tokens_per_s": m.median(),
                "tokens_per_s": m.values(),
                "seconds": m.values("seconds"),
                "max_rows_bucket": [largest_bucket(r.histogram) for r in m.runs],
                "mean_rows": m.values("mean_rows"),
                "decode_steps": m.values("steps"),
                "preemptions": m.values("preemptions"),
                "batch_histogram": {_le(b): c for b, c in m.runs[-1].histogram.items()},
            }
            for name, m in cells.items()
        },
        "new / old": ratio(cells["new"].median(), cells["old"].median()),
        "identical_greedy_rows": {"same": same, "of": s.requests},
    }


def concurrency_text(d: dict[str, Any]) -> list[str]:
    def bucket(run: list[float] | None) -> str:
        return "-" if run is None else f"{run[0]:g} < rows <= {run[1]:g}"

    rows = [
        [
            name,
            f"{b['median_tokens_per_s']:.1f}",
            bucket(b["max_rows_bucket"][-1]),
            f"{b['mean_rows'][-1]:.1f}",
            f"{b['decode_steps'][-1]:.0f}",
            f"{b['preemptions'][-1]:.0f}" if name == "new" else "-",
        ]
        for name, b in d["builds"].items()
    ]
    r, lengths = d["new / old"], d["lengths"]
    return [
        f"1. concurrency at equal KV memory ({d['kv_cache_bytes'] / 2**20:.1f} MiB): {len(lengths)} requests, prompts "
        f"{min(x['prompt'] for x in lengths)}-{max(x['prompt'] for x in lengths)} tokens, outputs "
        f"{min(x['output'] for x in lengths)}-{max(x['output'] for x in lengths)}; old = {d['old_revision']} "
        f"{' '.join(d['old_flags'])}",
        format_table(
            ["build", "tok/s (median)", "most rows per decode step", "mean rows", "steps", "preemptions"], rows
        ),
        f"new / old: {r['ratio']:.2f} ({r['tokens_per_s']:.1f} / {r['base_tokens_per_s']:.1f} tok/s); identical "
        f"greedy rows {d['identical_greedy_rows']['same']}/{d['identical_greedy_rows']['of']}",
    ]


def concurrency_plot(ax: Any, d: dict[str, Any]) -> None:
    names = list(d["builds"])
    bars = ax.bar(names, [d["builds"][n]["median_tokens_per_s"] for n in names], color=["#8c8c8c", "#4c72b0"])
    labels = []
    for n in names:
        bucket = d["builds"][n]["max_rows_bucket"][-1]
        labels.append(f"{d['builds'][n]['median_tokens_per_s']:.1f}\n<= {bucket[1]:g} rows" if bucket else "")
    ax.bar_label(bars, labels=labels, fontsize=8)
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"equal KV memory ({d['kv_cache_bytes'] / 2**20:.0f} MiB)", fontsize=9)
    ax.margins(y=0.25)


# ---- part 2: prefix caching, TTFT of a hit and a miss ---------------------------------------------
async def time_to_first_chunk(client: AsyncClient, system: str, question: str, adapter_id: str) -> float:
    """Seconds from the call to the first streamed chunk with tokens; the stream is read to its end."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    start, first = time.perf_counter(), None
    async for chunk in client.generate_stream(
        messages=messages,
        adapter_id=adapter_id,
        max_new_tokens=TTFT_TOKENS,
        min_new_tokens=TTFT_TOKENS,
        temperature=0.0,
    ):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return first


async def prefix_pairs(served: Served, paths: dict[str, str], words: Words, s: PagedSettings) -> dict[str, Any]:
    rng = random.Random(f"{s.seed}-prefix")
    shared = words.text(rng, s.system_tokens)
    questions = CHAT_PROMPTS
    async with AsyncClient(served.target, timeout=CALL_TIMEOUT_S) as client:
        for adapter_id, path in paths.items():
            await client.load_adapter(adapter_id, path)
            # Untimed: the adapter reaches its device slot, and a system-prompt-sized prefill is warm.
            await time_to_first_chunk(client, f"Warm-up {adapter_id}." + shared, "Hello!", adapter_id)
        before = scrape(served.metrics_port)
        pairs = []
        for round_ in range(s.prefix_rounds):
            for k, adapter_id in enumerate(paths):
                system = f"Session {round_}.{k}, reference {rng.randrange(10**9):09d}." + shared
                q = (round_ * len(paths) + k) * 2
                miss = await time_to_first_chunk(client, system, questions[q % len(questions)], adapter_id)
                hit = await time_to_first_chunk(client, system, questions[(q + 1) % len(questions)], adapter_id)
                pairs.append({"round": round_, "adapter": adapter_id, "miss_s": miss, "hit_s": hit})
            log(
                f"prefix round {round_ + 1}/{s.prefix_rounds}: miss median "
                f"{statistics.median(p['miss_s'] for p in pairs if p['round'] == round_) * 1e3:.0f} ms, hit median "
                f"{statistics.median(p['hit_s'] for p in pairs if p['round'] == round_) * 1e3:.0f} ms"
            )
        after = scrape(served.metrics_port)
    system = [{"role": "system", "content": "Session 0.0, reference 000000000." + shared}]
    rendered = words.tokenizer.apply_chat_template(system, tokenize=False)
    return {
        "pairs": pairs,
        "system_prompt_tokens": len(words.tokenizer(rendered, add_special_tokens=False)["input_ids"]),
        "prefix_cache_hits": delta(before, after, "deltaserve_prefix_cache_hits_total"),
        "prefix_cache_queries": delta(before, after, "deltaserve_prefix_cache_queries_total"),
    }


def prefix_part(s: PagedSettings, model_dir: str, words: Words) -> dict[str, Any]:
    rank = 16
    seq_len = max(2048, s.system_tokens + 256)
    flags = ["--max-adapters", str(s.adapters), "--max-lora-rank", str(rank), "--max-seq-len", str(seq_len)]
    flags += ["--kv-cache-memory", s.kv_cache_memory, "--log-level", "WARNING"]
    with tempfile.TemporaryDirectory(prefix="deltaserve-paged-") as tmp:
        log(f"prefix: making {s.adapters} LoRA adapters (rank {rank}, all-linear)")
        paths = {f"lora{i}": make_adapter(model_dir, tmp, f"lora{i}", rank, seed=i) for i in range(s.adapters)}
        with serving({"new": (NEW_BUILD, flags)}) as servers:
            d = asyncio.run(prefix_pairs(servers["new"], paths, words, s))
    miss = statistics.median(p["miss_s"] for p in d["pairs"])
    hit = statistics.median(p["hit_s"] for p in d["pairs"])
    return {
        **d,
        "flags": flags,
        "rank": rank,
        "median_miss_s": miss,
        "median_hit_s": hit,
        "hit / miss": {"ratio": hit / miss, "hit_s": hit, "miss_s": miss, "goal": "<= 0.3"},
        "hits_per_hit_request": d["prefix_cache_hits"] / len(d["pairs"]),
    }


def prefix_text(d: dict[str, Any]) -> list[str]:
    pairs = d["pairs"]
    rows = [
        [kind, *(f"{f([p[key] for p in pairs]) * 1e3:.1f}" for f in (statistics.median, min, max))]
        for kind, key in (("miss", "miss_s"), ("hit", "hit_s"))
    ]
    r = d["hit / miss"]
    return [
        f"2. prefix caching: a {d['system_prompt_tokens']}-token system prompt, {len({p['adapter'] for p in pairs})} "
        f"rank-{d['rank']} LoRA adapters, {len(pairs)} miss/hit pairs, {TTFT_TOKENS} tokens each",
        format_table(["request", "TTFT ms (median)", "min", "max"], rows),
        f"hit / miss TTFT: {r['ratio']:.3f} (goal <= 0.3); prefix-cache hits {d['prefix_cache_hits']:.0f} of "
        f"{d['prefix_cache_queries']:.0f} prompt positions looked up ({d['hits_per_hit_request']:.0f} per hit request)",
    ]


def prefix_plot(ax: Any, d: dict[str, Any]) -> None:
    kinds = (("miss", "miss_s", "#c44e52"), ("hit", "hit_s", "#55a868"))
    for x, (_, key, color) in enumerate(kinds):
        values = [p[key] * 1e3 for p in d["pairs"]]
        ax.scatter([x] * len(values), values, color=color, alpha=0.6, s=14)
        ax.hlines(statistics.median(values), x - 0.3, x + 0.3, color="k")
    ax.set_xticks(range(len(kinds)), [kind for kind, _, _ in kinds])
    ax.set_xlim(-0.6, len(kinds) - 0.4)
    ax.set_ylabel("time to first token, ms")
    ax.set_ylim(bottom=0)
    ax.set_title(f"prefix cache: hit / miss {d['hit / miss']['ratio']:.2f}", fontsize=9)


# ---- part 3: throughput against --max-seq-len -----------------------------------------------------
def seq_len_part(s: PagedSettings) -> dict[str, Any]:
    names = [f"max-seq-len {n}" for n in s.seq_lens]
    builds = {
        name: (NEW_BUILD, ["--max-seq-len", str(n), "--kv-cache-memory", s.kv_cache_memory, "--log-level", "WARNING"])
        for name, n in zip(names, s.seq_lens, strict=True)
    }
    prompts, ids = chat_messages(s.batch_requests), [""] * s.batch_requests
    with serving(builds) as servers, asyncio.Runner() as runner:

        def system(target: str, tokens: int) -> Callable[[], Run]:
            return on_loop(runner, lambda: batch(target, prompts, ids, tokens))

        cells = timed_rounds(
            {name: system(servers[name].target, s.batch_tokens) for name in names},
            s.rounds,
            warmups={name: system(servers[name].target, 4) for name in names},
        ).measurements
    same = sum(a == b for a, b in zip(cells[names[0]].runs[-1].outputs, cells[names[1]].runs[-1].outputs, strict=True))
    return {
        "seq_lens": list(s.seq_lens),
        "kv_cache_memory": s.kv_cache_memory,
        "servers": {
            name: {"median_tokens_per_s": m.median(), "tokens_per_s": m.values(), "seconds": m.values("seconds")}
            for name, m in cells.items()
        },
        "ratio": {**ratio(cells[names[1]].median(), cells[names[0]].median()), "goal": ">= 0.95"},
        "identical_greedy_rows": {"same": same, "of": s.batch_requests},
        "workload": {"requests": s.batch_requests, "tokens": s.batch_tokens},
    }


def seq_len_text(d: dict[str, Any]) -> list[str]:
    rows = [
        [name, f"{v['median_tokens_per_s']:.1f}", " ".join(f"{x:.1f}" for x in v["tokens_per_s"])]
        for name, v in d["servers"].items()
    ]
    r, (short, long) = d["ratio"], d["seq_lens"]
    return [
        f"3. throughput against --max-seq-len: {d['workload']['requests']} concurrent chat requests x "
        f"{d['workload']['tokens']} tokens, --kv-cache-memory {d['kv_cache_memory']}",
        format_table(["server", "tok/s (median)", "rounds"], rows),
        f"{long} / {short}: {r['ratio']:.3f} (goal >= 0.95; {r['tokens_per_s']:.1f} / {r['base_tokens_per_s']:.1f} "
        f"tok/s); identical greedy rows {d['identical_greedy_rows']['same']}/{d['identical_greedy_rows']['of']}",
    ]


def seq_len_plot(ax: Any, d: dict[str, Any]) -> None:
    names = list(d["servers"])
    values = [d["servers"][n]["median_tokens_per_s"] for n in names]
    bars = ax.bar([n.replace("max-seq-len ", "") for n in names], values, color=["#4c72b0", "#55a868"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xlabel("--max-seq-len")
    ax.set_ylabel("generated tokens / s (median)")
    ax.set_title(f"{d['seq_lens'][1]} / {d['seq_lens'][0]}: {d['ratio']['ratio']:.3f}", fontsize=9)


# ---- part 4: chunked prefill ----------------------------------------------------------------------
@dataclass(frozen=True)
class GapRun:
    """One chunked-part run: every inter-chunk gap of the decoding streams, and the long prompts' TTFT."""

    seconds: float
    gaps: list[float]
    long_ttft: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(self.gaps, 50)

    @property
    def p99(self) -> float:
        return percentile(self.gaps, 99)

    @property
    def max(self) -> float:
        return max(self.gaps)


async def gap_run(served: Served, messages: list[str], tokens: int, long_prompts: list[str]) -> GapRun:
    """The streams start together; long prompt j is sent once every stream has (j + 1) / (L + 1) of its tokens."""
    count = len(long_prompts)
    async with AsyncClient(served.target, timeout=CALL_TIMEOUT_S) as client:
        await client.model_info()  # connect before the clock starts
        received = [0] * len(messages)
        arrivals: list[list[float]] = [[] for _ in messages]

        async def stream(i: int) -> None:
            async for chunk in client.generate_stream(
                messages=[{"role": "user", "content": messages[i]}],
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                temperature=0.0,
            ):
                if chunk.token_ids:
                    arrivals[i].append(time.perf_counter())
                    received[i] += len(chunk.token_ids)

        async def long(j: int) -> float:
            while min(received) < (j + 1) * tokens // (count + 1):
                await asyncio.sleep(0.002)
            sent, first = time.perf_counter(), None
            async for chunk in client.generate_stream(
                long_prompts[j], max_new_tokens=LONG_NEW_TOKENS, min_new_tokens=LONG_NEW_TOKENS, temperature=0.0
            ):
                if chunk.token_ids and first is None:
                    first = time.perf_counter() - sent
            return math.nan if first is None else first

        start = time.perf_counter()
        results = await asyncio.gather(*(stream(i) for i in range(len(messages))), *(long(j) for j in range(count)))
        seconds = time.perf_counter() - start
    if received != [tokens] * len(messages):
        raise RuntimeError(f"streams received {received} tokens, expected {tokens} each")
    gaps = [b - a for times in arrivals for a, b in itertools.pairwise(times)]
    return GapRun(seconds, gaps, list(results[len(messages) :]))


def chunked_part(s: PagedSettings, words: Words) -> dict[str, Any]:
    chunked_budget, whole_budget = s.prefill_budgets
    names = {f"chunked {chunked_budget}": chunked_budget, f"unchunked {whole_budget}": whole_budget}
    seq = max(2048, s.long_tokens + 64)
    builds = {
        name: (
            NEW_BUILD,
            [
                *("--max-prefill-tokens", str(budget), "--max-seq-len", str(seq)),
                *("--kv-cache-memory", s.kv_cache_memory, "--log-level", "WARNING"),
            ],
        )
        for name, budget in names.items()
    }
    messages = chat_messages(s.streams)
    with serving(builds) as servers, asyncio.Runner() as runner:
        calls = dict.fromkeys(servers, 0)

        def system(name: str) -> Callable[[], GapRun]:
            def run() -> GapRun:
                # Fresh words every round (the same for both servers): the prefix cache never holds them.
                rng = random.Random(f"{s.seed}-long-{calls[name]}")
                calls[name] += 1
                longs = [words.text(rng, s.long_tokens) for _ in range(s.long_prompts)]
                return runner.run(gap_run(servers[name], messages, s.stream_tokens, longs))

            return run

        def warmup(name: str) -> Callable[[], GapRun]:
            longs = [words.text(random.Random(f"warm-long-{name}"), s.long_tokens)]
            return on_loop(runner, lambda: gap_run(servers[name], messages, 8, longs))

        cells = timed_rounds(
            {name: system(name) for name in servers},
            s.chunked_rounds,
            warmups={name: warmup(name) for name in servers},
            describe=lambda r: f"gaps p50 {r.p50 * 1e3:.0f} ms, p99 {r.p99 * 1e3:.0f} ms, max {r.max * 1e3:.0f} ms",
        ).measurements
    gaps = {name: [g for run in m.runs for g in run.gaps] for name, m in cells.items()}
    stats = {name: ms_summary(values) for name, values in gaps.items()}
    first, second = names
    return {
        "prefill_budgets": list(s.prefill_budgets),
        "workload": {
            "streams": s.streams,
            "stream_tokens": s.stream_tokens,
            "long_prompts": s.long_prompts,
            "long_tokens": s.long_tokens,
            "long_new_tokens": LONG_NEW_TOKENS,
        },
        "flags": {name: flags for name, (_, flags) in builds.items()},
        "gaps_ms": stats,
        "long_prompt_ttft_s": {name: [t for run in m.runs for t in run.long_ttft] for name, m in cells.items()},
        "seconds": {name: m.values("seconds") for name, m in cells.items()},
        "p99 chunked / unchunked": {
            "ratio": stats[first]["p99"] / stats[second]["p99"],
            "chunked_ms": stats[first]["p99"],
            "unchunked_ms": stats[second]["p99"],
        },
    }


def chunked_text(d: dict[str, Any]) -> list[str]:
    w, ttft = d["workload"], d["long_prompt_ttft_s"]
    rows = [
        [name, f"{g['n']:.0f}", *(f"{g[k]:.1f}" for k in ("p50", "p99", "max")), _seconds(ttft[name])]
        for name, g in d["gaps_ms"].items()
    ]
    r = d["p99 chunked / unchunked"]
    return [
        f"4. chunked prefill: {w['streams']} streams x {w['stream_tokens']} tokens while {w['long_prompts']} prompts "
        f"of {w['long_tokens']} tokens arrive; every inter-token gap of the streams",
        format_table(["--max-prefill-tokens", "gaps", "p50 ms", "p99 ms", "max ms", "long prompts' TTFT s"], rows),
        f"p99 gap chunked / unchunked: {r['ratio']:.3f} ({r['chunked_ms']:.1f} / {r['unchunked_ms']:.1f} ms)",
    ]


def _seconds(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def chunked_plot(ax: Any, d: dict[str, Any]) -> None:
    keys = ("p50", "p99", "max")
    names = list(d["gaps_ms"])
    width = 0.38
    for i, (name, color) in enumerate(zip(names, ["#4c72b0", "#c44e52"], strict=False)):
        xs = [k + (i - 0.5) * width for k in range(len(keys))]
        bars = ax.bar(xs, [d["gaps_ms"][name][k] for k in keys], width, label=name, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yscale("log")
    ax.set_ylabel("inter-token gap, ms")
    ax.legend(fontsize=7, title="--max-prefill-tokens", title_fontsize=7)
    ax.set_title(f"chunked prefill: p99 ratio {d['p99 chunked / unchunked']['ratio']:.2f}", fontsize=9)


# ---- main -----------------------------------------------------------------------------------------
TEXT = {"concurrency": concurrency_text, "prefix": prefix_text, "seq-len": seq_len_text, "chunked": chunked_text}
PLOTS = {"concurrency": concurrency_plot, "prefix": prefix_plot, "seq-len": seq_len_plot, "chunked": chunked_plot}


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(PagedSettings, argv, description(__doc__))
    quiet()
    model_dir, model_name = embedded_model()
    words = Words(AutoTokenizer.from_pretrained(model_dir))
    runs = {
        "concurrency": lambda: concurrency_part(s, model_dir, words),
        "prefix": lambda: prefix_part(s, model_dir, words),
        "seq-len": lambda: seq_len_part(s),
        "chunked": lambda: chunked_part(s, words),
    }
    parts: dict[str, Any] = {}
    for part in PARTS:
        if part in s.selected:
            log(f"part {part}")
            start = time.perf_counter()
            parts[part] = runs[part]()
            log(f"part {part} took {time.perf_counter() - start:.0f} s")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    data = {"model": model_name, "device": "cpu", "dtype": "float32", "revision": head.stdout.strip(), **parts}
    title = f"{model_name} fp32 CPU ({os.cpu_count()} cores): the paged KV cache"
    text = [title] + [line for part, d in parts.items() for line in ["", *TEXT[part](d)]]

    def draw(*axes: Any) -> None:
        for ax, (part, d) in zip(axes, parts.items(), strict=True):
            PLOTS[part](ax, d)

    report("paged", s, data, text, draw, panels=len(parts), size=(4.2 * len(parts), 4.2), title=title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
