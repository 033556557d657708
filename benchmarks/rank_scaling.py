"""Decode throughput against the LoRA rank, with a fixed number of distinct adapters in one batch, relative to the base.

The same setup and measurement as adapter_scaling.py (the embedded SmolLM2-135M-Instruct, fp32, CPU, the real
gRPC server in-process; N concurrent greedy requests of exactly `--new-tokens` tokens), for

  base     no adapter
  r=R      request i on adapter i % K of the rank-R set: K distinct rank-R all-linear LoRA adapters (default 8)

One server holds every set at once (max_adapters = K x the number of ranks, max_lora_rank = the largest rank), so
the ranks and the base take turns in every round. A slot is as wide as the largest rank; a rank-R adapter fills
its first R rows and a decode step reads only those. Reported as in adapter_scaling.py, with the bandwidth floor
1 / (1 + K * rank-R adapter bytes / base bytes).

Run:  python benchmarks/rank_scaling.py          (N=64 x 64 tokens, ranks 8 16 32 64, K=8, 2 rounds)
      python benchmarks/rank_scaling.py --quick  (N=8 x 8 tokens, ranks 8 64, K=4, 1 round: a smoke run)
Writes benchmarks/results/rank-scaling-cpu.json (…-quick.json for --quick) and a PNG next to it.
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
    ranks: tuple[int, ...]
    adapters: int
    rounds: int
    out: Path


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=8, 8 tokens, ranks 8 64, K=4, 1 round")
    parser.add_argument("--requests", type=int, default=None, help="concurrent requests N (default 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks (default 8 16 32 64)")
    parser.add_argument("--adapters", type=int, default=None, help="distinct adapters K per batch (default 8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG goes next to it)")
    args = parser.parse_args(argv)
    defaults = (8, 8, (8, 64), 4, 1) if args.quick else (64, 64, (8, 16, 32, 64), 8, 2)
    given = (args.requests, args.new_tokens, tuple(args.ranks) if args.ranks else None, args.adapters, args.rounds)
    n, tokens, ranks, k, rounds = (d if g is None else g for g, d in zip(given, defaults, strict=True))
    ranks = tuple(sorted(set(ranks)))
    if min(n, tokens, k, rounds, *ranks) < 1:
        parser.error("--requests, --new-tokens, --ranks, --adapters and --rounds must be at least 1")
    if k > n:
        parser.error(f"K={k} exceeds N={n}: every adapter needs at least one request in the batch")
    out = args.out or RESULTS / ("rank-scaling-cpu-quick.json" if args.quick else "rank-scaling-cpu.json")
    return Settings(n, tokens, ranks, k, rounds, out)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    helpers = import_test_helpers()
    model_dir = embedded_model_dir()
    n, k = settings.n_requests, settings.adapters
    ids = {
        f"r{rank}-lora{i}": path
        for rank in settings.ranks
        for i, path in enumerate(adapter_set(helpers, model_dir, EMBEDDED_NAME, rank, k))
    }
    configs = [Config(BASE, [""] * n)] + [
        Config(f"r={rank}", [f"r{rank}-lora{i % k}" for i in range(n)], adapters=k, rank=rank)
        for rank in settings.ranks
    ]
    server_config = ServerConfig.of(
        model=model_dir,
        dtype="float32",
        device="cpu",
        max_batch_size=n,
        max_seq_len=max_seq_len_for(AutoTokenizer.from_pretrained(model_dir), settings.new_tokens),
        max_adapters=len(ids),
        max_lora_rank=max(settings.ranks),
    )
    result = sweep(helpers, server_config, ids, configs, settings.rounds, settings.new_tokens)
    summary = summarize(result.cells, result.floors())
    adapter_mb = {c.name: result.config_bytes(c) / 1e6 for c in configs}
    data = {
        "benchmark": "rank_scaling",
        "machine": machine_info(),
        "model": EMBEDDED_NAME,
        "device": "cpu",
        "dtype": "float32",
        "settings": {key: (str(v) if isinstance(v, Path) else v) for key, v in asdict(settings).items()},
        "server": {
            **{name: server_config.settings()[name] for name in ("max_batch_size", "max_seq_len", "max_adapters")},
            "max_lora_rank": server_config.adapters.max_lora_rank,
            "in_process": "the server runs in a thread of the benchmark process (tests/helpers.py ServerThread)",
        },
        "adapters": "per rank: lora0 saved by PEFT (lora_alpha=2*rank, all-linear, init_lora_weights=False); "
        "lora1.. cloned from its files with fresh random weights (benchmarks/adapter_files.py)",
        "base_bytes": result.base_bytes,
        "adapter_bytes_each": {f"r={rank}": result.adapter_bytes[f"r{rank}-lora0"] for rank in settings.ranks},
        "statistic": "median over rounds; ratios to the base of the same run; decode = streamed tokens / seconds "
        "while all N rows decode (client side); floor = 1 / (1 + K * adapter bytes / base bytes)",
        "load_average_after_rounds": result.loads,
        "configs": summary,
    }
    write_json(data, settings.out)
    title = (
        f"{EMBEDDED_NAME} fp32 CPU ({os.cpu_count()} cores): N={n} x {settings.new_tokens} tokens,\n"
        f"K={k} distinct all-linear LoRA adapters of each rank"
    )
    plotted = write_plot(summary, "rank", "LoRA rank", title, settings.out.with_suffix(".png"))
    print(f"{title}; median of {settings.rounds} round(s)".replace("\n", " "))
    print(table(summary, adapter_mb))
    print(
        f"base {result.base_bytes / 1e6:.0f} MB; load average after rounds: "
        + ", ".join(f"{x:.2f}" for x in result.loads)
    )
    print(f"wrote {settings.out}" + (f" and {settings.out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
