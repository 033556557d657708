"""Decode throughput against the number of distinct LoRA adapters in one batch, relative to the base.

On the embedded SmolLM2-135M-Instruct in fp32 on the CPU, with the real deltaserve gRPC server in-process on
127.0.0.1 (max_batch_size N, max_adapters = the largest K, max_lora_rank = the rank: every adapter holds a device
slot, nothing is evicted). N concurrent greedy requests (the chat prompts of throughput.py, exactly
`--new-tokens` tokens each: min_new_tokens = max_new_tokens) run as one batch for

  base     no adapter
  K=k      request i on adapter lora{i % k}: all k distinct rank-r all-linear LoRA adapters in every decode step

The adapters are real PEFT-format files (adapter_files.py: lora0 saved by PEFT, the others cloned from its files
with fresh random weights; cached in benchmarks/.cache/). A short warm-up batch of every configuration, then
`--rounds` rounds in which the configurations take turns (the order rotates). Reported per configuration (medians
over rounds): tokens/s end to end and decode tokens/s (server_batches.py says how each is counted), their ratio
to the base of the same run, and the bandwidth floor 1 / (1 + k * adapter bytes / base bytes): a memory-bound
decode step reads the base weights and every adapter in the batch once, so it cannot beat that ratio.

Run:  python benchmarks/adapter_scaling.py          (N=64 x 64 tokens, K = 1 2 4 8 16 32 64, 2 rounds)
      python benchmarks/adapter_scaling.py --quick  (N=8 x 8 tokens, K = 1 4 8, 1 round: a smoke run)
Writes benchmarks/results/adapter-scaling-cpu.json (…-quick.json for --quick) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import transformers
from adapter_files import adapter_set
from common import RESULTS, import_test_helpers, machine_info, write_json
from deltaserve.server.config import ServerConfig
from deltaserve.server.model.loader import EMBEDDED_NAME, embedded_model_dir
from server_batches import BASE, Config, max_seq_len_for, summarize, sweep, table, write_plot
from transformers import AutoTokenizer


@dataclass(frozen=True)
class Settings:
    n_requests: int
    new_tokens: int
    counts: tuple[int, ...]
    rank: int
    rounds: int
    out: Path


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=8, 8 tokens, K = 1 4 8, 1 round")
    parser.add_argument("--requests", type=int, default=None, help="concurrent requests N (default 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64)")
    parser.add_argument("--adapters", type=int, nargs="+", default=None, help="values of K (default 1 2 4 ... 64)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG goes next to it)")
    args = parser.parse_args(argv)
    defaults = (8, 8, (1, 4, 8), 1) if args.quick else (64, 64, (1, 2, 4, 8, 16, 32, 64), 2)
    given = (args.requests, args.new_tokens, tuple(args.adapters) if args.adapters else None, args.rounds)
    n, tokens, counts, rounds = (d if g is None else g for g, d in zip(given, defaults, strict=True))
    counts = tuple(sorted(set(counts)))
    if min(n, tokens, rounds, args.rank, *counts) < 1:
        parser.error("--requests, --new-tokens, --adapters, --rank and --rounds must be at least 1")
    if max(counts) > n:
        parser.error(f"K={max(counts)} exceeds N={n}: every adapter needs at least one request in the batch")
    out = args.out or RESULTS / ("adapter-scaling-cpu-quick.json" if args.quick else "adapter-scaling-cpu.json")
    return Settings(n, tokens, counts, args.rank, rounds, out)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    helpers = import_test_helpers()
    model_dir = embedded_model_dir()
    n = settings.n_requests
    paths = adapter_set(helpers, model_dir, EMBEDDED_NAME, settings.rank, max(settings.counts))
    ids = {f"lora{i}": path for i, path in enumerate(paths)}
    configs = [Config(BASE, [""] * n)] + [
        Config(f"K={k}", [f"lora{i % k}" for i in range(n)], adapters=k, rank=settings.rank) for k in settings.counts
    ]
    server_config = ServerConfig.of(
        model=model_dir,
        dtype="float32",
        device="cpu",
        max_batch_size=n,
        max_seq_len=max_seq_len_for(AutoTokenizer.from_pretrained(model_dir), settings.new_tokens),
        max_adapters=max(settings.counts),
        max_lora_rank=settings.rank,
    )
    result = sweep(helpers, server_config, ids, configs, settings.rounds, settings.new_tokens)
    summary = summarize(result.cells, result.floors())
    adapter_mb = {c.name: result.config_bytes(c) / 1e6 for c in configs}
    data = {
        "benchmark": "adapter_scaling",
        "machine": machine_info(),
        "model": EMBEDDED_NAME,
        "device": "cpu",
        "dtype": "float32",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "server": {
            **{name: server_config.settings()[name] for name in ("max_batch_size", "max_seq_len", "max_adapters")},
            "max_lora_rank": server_config.adapters.max_lora_rank,
            "in_process": "the server runs in a thread of the benchmark process (tests/helpers.py ServerThread)",
        },
        "adapters": "lora0 saved by PEFT (r=rank, lora_alpha=2*rank, all-linear, init_lora_weights=False); lora1.. "
        "cloned from its files with fresh random weights (benchmarks/adapter_files.py)",
        "base_bytes": result.base_bytes,
        "adapter_bytes_each": result.adapter_bytes["lora0"],
        "statistic": "median over rounds; ratios to the base of the same run; decode = streamed tokens / seconds "
        "while all N rows decode (client side); floor = 1 / (1 + K * adapter bytes / base bytes)",
        "load_average_after_rounds": result.loads,
        "configs": summary,
    }
    write_json(data, settings.out)
    title = (
        f"{EMBEDDED_NAME} fp32 CPU ({os.cpu_count()} cores): N={n} x {settings.new_tokens} tokens,\n"
        f"rank-{settings.rank} all-linear LoRA, K distinct adapters per batch"
    )
    plotted = write_plot(
        summary, "adapters", "distinct adapters in the batch (K)", title, settings.out.with_suffix(".png")
    )
    print(f"{title}; median of {settings.rounds} round(s)".replace("\n", " "))
    print(table(summary, adapter_mb))
    print(
        f"base {result.base_bytes / 1e6:.0f} MB, one adapter {result.adapter_bytes['lora0'] / 1e6:.1f} MB; "
        "load average after rounds: " + ", ".join(f"{x:.2f}" for x in result.loads)
    )
    print(f"wrote {settings.out}" + (f" and {settings.out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
