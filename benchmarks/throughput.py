"""Generated tokens per second: deltaserve against transformers' and PEFT's batched generate.

N concurrent greedy requests, each generating exactly `--new-tokens` tokens (min_new_tokens equals
max_new_tokens, so EOS never ends a row early), on the embedded SmolLM2-135M-Instruct in fp32 on the CPU.
Four systems get the same chat prompts (rendered with the tokenizer's chat template):

  server-base    the real deltaserve gRPC server (in-process, on 127.0.0.1), no adapter; all N requests
                 are in flight at once through AsyncClient + asyncio.gather
  server-mixed   the same server, the N requests spread round-robin over K LoRA adapters
                 (rank `--rank`, target_modules="all-linear", made with PEFT and loaded with LoadAdapter)
  hf-generate    transformers' batched `generate` on the base (left padding, greedy)
  peft-mixed     PEFT's mixed-adapter batched `generate(..., adapter_names=[...])` with all K adapters
                 loaded and the same per-row adapter assignment as server-mixed

Every timed run is end to end, text in and text out: the server runs include gRPC, tokenization and
detokenization; the generate runs include tokenizing the batch and decoding the outputs. Each system is
warmed up once; then the systems take turns for `--repeats` rounds (so machine noise hits all of them
alike) and each reports its BEST round (the highest tokens/s). The greedy outputs are also compared
row by row (server-base vs hf-generate, server-mixed vs peft-mixed) as a sanity check.

Run:  python benchmarks/throughput.py            (N=16, 64 tokens, K=8, 2 repeats; several minutes)
      python benchmarks/throughput.py --quick    (N=4, 16 tokens, K=2, 1 repeat; a smoke run)
Writes benchmarks/results/throughput-cpu.json (…-quick.json for --quick) and a PNG bar chart next to it
(skipped with a warning when matplotlib is missing: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import transformers
from common import CHAT_PROMPTS as PROMPTS
from common import RESULTS, Run, import_test_helpers, log, machine_info, pyplot, save_figure, write_json
from deltaserve.adapters import tensor_bytes
from deltaserve.client import AsyncClient
from deltaserve.server.config import ServerConfig
from deltaserve.server.model.loader import EMBEDDED_NAME, embedded_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SERVER_BASE = "server-base"
SERVER_MIXED = "server-mixed"
HF_GENERATE = "hf-generate"
PEFT_MIXED = "peft-mixed"
REQUEST_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Settings:
    n_requests: int
    new_tokens: int
    adapters: int
    rank: int
    repeats: int
    out: Path


@dataclass(frozen=True)
class Workload:
    """The N requests: one user message each, its chat-rendered prompt, and its adapter in mixed runs."""

    messages: list[str]
    rendered: list[str]
    adapter_ids: list[str]
    new_tokens: int


@dataclass
class Measurement:
    system: str
    runs: list[Run] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [run.tokens / run.seconds for run in self.runs]

    @property
    def best(self) -> float:
        return max(self.rates())

    @property
    def median(self) -> float:
        return statistics.median(self.rates())


# ---- setup ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=4, 16 tokens, K=2, 1 repeat")
    parser.add_argument("--requests", type=int, default=None, help="concurrent requests N (default 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64)")
    parser.add_argument("--adapters", type=int, default=None, help="LoRA adapters K (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per system (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG goes next to it)")
    args = parser.parse_args(argv)
    defaults = (4, 16, 2, 1) if args.quick else (16, 64, 8, 2)
    given = (args.requests, args.new_tokens, args.adapters, args.repeats)
    n, tokens, k, repeats = (d if g is None else g for g, d in zip(given, defaults, strict=True))
    if min(n, tokens, k, repeats, args.rank) < 1:
        parser.error("--requests, --new-tokens, --adapters, --repeats and --rank must be at least 1")
    out = args.out or RESULTS / ("throughput-cpu-quick.json" if args.quick else "throughput-cpu.json")
    return Settings(n, tokens, k, args.rank, repeats, out)


def build_workload(tokenizer: PreTrainedTokenizerBase, settings: Settings) -> Workload:
    """Cycle through the prompts; request i uses adapter i % K in the mixed runs."""
    messages = [PROMPTS[i % len(PROMPTS)] for i in range(settings.n_requests)]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
        for m in messages
    ]
    adapter_ids = [f"lora{i % settings.adapters}" for i in range(settings.n_requests)]
    return Workload(messages, rendered, adapter_ids, settings.new_tokens)


def make_adapters(helpers: ModuleType, model_dir: str, root: str, settings: Settings) -> dict[str, str]:
    """K random, non-zero LoRA adapters saved with PEFT's save_pretrained; adapter id -> directory."""
    paths = {}
    for i in range(settings.adapters):
        paths[f"lora{i}"] = helpers.make_lora(
            model_dir,
            os.path.join(root, f"lora{i}"),
            seed=i,
            r=settings.rank,
            lora_alpha=2 * settings.rank,
            target_modules="all-linear",
        )
    return paths


def load_base(model_dir: str) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def load_peft(model_dir: str, adapters: dict[str, str]) -> PreTrainedModel:
    """A PeftModel over its own copy of the base with all K adapters loaded under their ids."""
    from peft import PeftModel

    (first_id, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(load_base(model_dir), first_path, adapter_name=first_id)
    for adapter_id, path in rest:
        model.load_adapter(path, adapter_name=adapter_id)
    return model.eval()


def left_padded(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---- the systems ----------------------------------------------------------------------------------
async def _server_batch(target: str, work: Workload, adapter_ids: list[str]) -> Run:
    async with AsyncClient(target, timeout=REQUEST_TIMEOUT_S) as client:
        await client.model_info()  # connect before the clock starts
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                client.generate(
                    messages=[{"role": "user", "content": message}],
                    adapter_id=adapter_id,
                    max_new_tokens=work.new_tokens,
                    min_new_tokens=work.new_tokens,
                    temperature=0.0,
                )
                for message, adapter_id in zip(work.messages, adapter_ids, strict=True)
            )
        )
        seconds = time.perf_counter() - start
    return Run(seconds, [result.token_ids for result in results])


async def load_adapters(target: str, adapters: dict[str, str]) -> None:
    async with AsyncClient(target, timeout=REQUEST_TIMEOUT_S) as client:
        for adapter_id, path in adapters.items():
            await client.load_adapter(adapter_id, path)


def server_runner(target: str, work: Workload, mixed: bool) -> Callable[[], Run]:
    adapter_ids = work.adapter_ids if mixed else [""] * len(work.messages)
    return lambda: asyncio.run(_server_batch(target, work, adapter_ids))


def generate_runner(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, work: Workload, mixed: bool
) -> Callable[[], Run]:
    """transformers' (or, with adapter_names, PEFT's mixed-adapter) batched greedy generate."""
    extra = {"adapter_names": work.adapter_ids} if mixed else {}

    def run() -> Run:
        start = time.perf_counter()
        # The rendered template already holds the special tokens, as on the server.
        inputs = tokenizer(work.rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=work.new_tokens,
                min_new_tokens=work.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **extra,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        tokenizer.batch_decode(new, skip_special_tokens=True)
        return Run(time.perf_counter() - start, new.tolist())

    return run


def measure(systems: dict[str, Callable[[], Run]], settings: Settings, expected: int) -> list[Measurement]:
    """Warm every system up once, then time them in turn for `repeats` rounds."""
    for name, run in systems.items():
        log(f"warming up {name}")
        check_tokens(name, run(), expected)
    results = {name: Measurement(name) for name in systems}
    for round_ in range(settings.repeats):
        for name, run in systems.items():
            result = check_tokens(name, run(), expected)
            results[name].runs.append(result)
            log(f"round {round_ + 1}/{settings.repeats} {name}: {result.tokens / result.seconds:.1f} tok/s")
    return list(results.values())


def check_tokens(name: str, run: Run, expected: int) -> Run:
    if run.tokens != expected:
        raise RuntimeError(f"{name} generated {run.tokens} tokens, expected {expected}")
    return run


def matching_rows(a: Measurement, b: Measurement) -> int:
    """Rows whose greedy output is identical in the two systems' last runs."""
    return sum(x == y for x, y in zip(a.runs[-1].outputs, b.runs[-1].outputs, strict=True))


# ---- reporting ------------------------------------------------------------------------------------
def ratios(by_name: dict[str, Measurement]) -> dict[str, float]:
    best = {name: m.best for name, m in by_name.items()}
    return {
        "server_mixed / server_base": best[SERVER_MIXED] / best[SERVER_BASE],
        "server_mixed / peft_mixed": best[SERVER_MIXED] / best[PEFT_MIXED],
        "server_base / hf_generate": best[SERVER_BASE] / best[HF_GENERATE],
    }


def table(measurements: list[Measurement]) -> str:
    by_name = {m.system: m for m in measurements}
    header = f"{'system':<14} {'tok/s (best)':>12} {'tok/s (median)':>14} {'vs server-base':>14} {'vs peft-mixed':>13}"
    lines = [header, "-" * len(header)]
    for m in measurements:
        lines.append(
            f"{m.system:<14} {m.best:>12.1f} {m.median:>14.1f} "
            f"{m.best / by_name[SERVER_BASE].best:>13.2f}x {m.best / by_name[PEFT_MIXED].best:>12.2f}x"
        )
    return "\n".join(lines)


def weight_bytes(server: object) -> dict[str, float]:
    """Bytes a mixed decode step must read besides the base's: every active adapter's A and B. When decode
    is memory-bound, mixed/base throughput cannot beat 1 / (1 + adapter bytes / base bytes)."""
    base = tensor_bytes(server.loaded.model.parameters())
    adapters = sum(record.adapter.size_bytes for record in server.registry.list())
    return {"base_bytes": base, "adapter_bytes": adapters, "bandwidth_floor_mixed_over_base": 1 / (1 + adapters / base)}


def report(
    measurements: list[Measurement], settings: Settings, work: Workload, max_seq_len: int, sizes: dict[str, float]
) -> dict[str, object]:
    by_name = {m.system: m for m in measurements}
    return {
        "benchmark": "throughput",
        "machine": machine_info(),
        "model": EMBEDDED_NAME,
        "device": "cpu",
        "dtype": "float32",
        "n_requests": settings.n_requests,
        "new_tokens_per_request": settings.new_tokens,
        "tokens_per_run": settings.n_requests * settings.new_tokens,
        "adapters": settings.adapters,
        "rank": settings.rank,
        "target_modules": "all-linear",
        "repeats": settings.repeats,
        "statistic": "best of repeats (highest tokens/s), after one warm-up run per system",
        "server_max_seq_len": max_seq_len,
        "systems": {
            m.system: {
                "best_tokens_per_s": m.best,
                "median_tokens_per_s": m.median,
                "tokens_per_s": m.rates(),
                "seconds": [run.seconds for run in m.runs],
            }
            for m in measurements
        },
        "ratios": ratios(by_name),
        "weights": sizes,
        "greedy_rows_matching": {
            "server-base vs hf-generate": matching_rows(by_name[SERVER_BASE], by_name[HF_GENERATE]),
            "server-mixed vs peft-mixed": matching_rows(by_name[SERVER_MIXED], by_name[PEFT_MIXED]),
            "of": len(work.messages),
        },
    }


def write_plot(measurements: list[Measurement], settings: Settings, path: Path) -> bool:
    """A bar chart of the best tokens/s per system; False (with a warning) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [m.system for m in measurements]
    values = [m.best for m in measurements]
    bars = ax.bar(names, values, color=["#4c72b0", "#55a868", "#8c8c8c", "#c44e52"][: len(names)])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("generated tokens / s (best of repeats)")
    ax.set_title(
        f"{EMBEDDED_NAME}, fp32 CPU ({os.cpu_count()} cores): N={settings.n_requests}, "
        f"{settings.new_tokens} tokens, K={settings.adapters} LoRA r={settings.rank}",
        fontsize=9,
    )
    save_figure(fig, path)
    return True


# ---- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # keep the log readable
    helpers = import_test_helpers()
    model_dir = embedded_model_dir()
    tokenizer = left_padded(AutoTokenizer.from_pretrained(model_dir))
    work = build_workload(tokenizer, settings)
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in work.rendered)
    max_seq_len = longest + settings.new_tokens + 16
    expected = settings.n_requests * settings.new_tokens
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-") as root:
        log(f"making {settings.adapters} LoRA adapters (rank {settings.rank}, all-linear)")
        adapters = make_adapters(helpers, model_dir, root, settings)
        config = ServerConfig.of(
            model=model_dir,
            dtype="float32",
            device="cpu",
            max_batch_size=settings.n_requests,
            max_seq_len=max_seq_len,
            max_adapters=settings.adapters,
            max_lora_rank=settings.rank,
        )
        log("starting the server and loading the base and PEFT models")
        with helpers.ServerThread(config) as server:
            asyncio.run(load_adapters(server.target, adapters))
            sizes = weight_bytes(server.server)
            systems = {
                SERVER_BASE: server_runner(server.target, work, mixed=False),
                SERVER_MIXED: server_runner(server.target, work, mixed=True),
                HF_GENERATE: generate_runner(load_base(model_dir), tokenizer, work, mixed=False),
                PEFT_MIXED: generate_runner(load_peft(model_dir, adapters), tokenizer, work, mixed=True),
            }
            measurements = measure(systems, settings, expected)
    data = report(measurements, settings, work, max_seq_len, sizes)
    write_json(data, settings.out)
    plotted = write_plot(measurements, settings, settings.out.with_suffix(".png"))
    print(
        f"{EMBEDDED_NAME} fp32 CPU ({os.cpu_count()} cores), N={settings.n_requests} concurrent requests x "
        f"{settings.new_tokens} tokens, K={settings.adapters} LoRA adapters rank {settings.rank}, "
        f"best of {settings.repeats}"
    )
    print(table(measurements))
    for name, value in data["ratios"].items():
        print(f"{name}: {value:.2f}")
    print(
        f"adapters {sizes['adapter_bytes'] / 1e6:.0f} MB vs base {sizes['base_bytes'] / 1e6:.0f} MB: "
        f"bandwidth floor for server_mixed / server_base {sizes['bandwidth_floor_mixed_over_base']:.2f}"
    )
    match = data["greedy_rows_matching"]
    pairs = ", ".join(f"{pair} {count}/{match['of']}" for pair, count in match.items() if pair != "of")
    print(f"identical greedy rows: {pairs}")
    print(f"wrote {settings.out}" + (f" and {settings.out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
