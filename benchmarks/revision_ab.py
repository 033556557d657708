"""Two builds of the server side by side: this checkout against an earlier git revision, same workload, same run.

Speed-ups claimed between commits cannot be read off runs from different hours on a noisy machine, so this
starts both builds as `deltaserve serve` subprocesses (the revision from a `git worktree` of it, imported ahead
of the installed package), loads the same adapters into each and gives them the workload of throughput.py in
turns: N concurrent greedy chat requests of exactly T tokens, on the base and spread over K rank-16 all-linear
LoRA adapters (request i on adapter i % K). Only one server works at a time; the idle one waits on its engine's
condition variable. Reported: tokens/s per (build, workload), medians over rounds, each build's mixed / base, and
the new build's speed relative to the old one. The greedy outputs of the two builds are compared row by row.

Run:  python benchmarks/revision_ab.py --revision 02bfc48          (N=16 x 64 tokens, K=8, 3 rounds)
      python benchmarks/revision_ab.py --revision 02bfc48 --quick  (N=4 x 8 tokens, K=2, 1 round)
Writes benchmarks/results/revision-ab-cpu.json (…-quick.json for --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import CHAT_PROMPTS, REPO, RESULTS, import_test_helpers, log, machine_info, make_adapter, write_json
from deltaserve.client import AsyncClient, Client
from deltaserve.server.model.loader import EMBEDDED_NAME, embedded_model_dir

# How the old build is imported: a `deltaserve` package whose subpackages are the revision's folders.
SHIM = """
import sys, types
root = sys.argv.pop(1)
package = types.ModuleType("deltaserve")
package.__path__ = [root + "/.deltaserve"]
sys.modules["deltaserve"] = package
from deltaserve.server.cli import main
sys.exit(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout(revision: str, parent: str) -> str:
    """A worktree of `revision` with a `.deltaserve` folder linking the package's parts, as pyproject maps them."""
    path = os.path.join(parent, "revision")
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", path, revision], check=True, capture_output=True
    )
    package = os.path.join(path, ".deltaserve")
    os.makedirs(package)
    for name in ("server", "adapters", "client"):
        os.symlink(os.path.join(path, name), os.path.join(package, name))
    return path


def start_server(name: str, command: list[str], args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([*command, "serve", "--port", str(port), *args], stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    with Client(target) as client:
        client.wait_ready(timeout=300)
    log(f"{name} serving on {target}")
    return process, target


async def batch(target: str, prompts: list[str], adapter_ids: list[str], tokens: int) -> tuple[float, list[list[int]]]:
    async with AsyncClient(target, timeout=600) as client:
        await client.model_info()
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                client.generate(
                    messages=[{"role": "user", "content": prompt}],
                    adapter_id=adapter_id,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                )
                for prompt, adapter_id in zip(prompts, adapter_ids, strict=True)
            )
        )
        seconds = time.perf_counter() - start
    return seconds, [r.token_ids for r in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revision", required=True, help="the git revision to compare this checkout against")
    parser.add_argument("--quick", action="store_true", help="smoke run: N=4 x 8 tokens, K=2, 1 round")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    n, tokens, k, rounds = (4, 8, 2, 1) if args.quick else (16, 64, 8, 3)
    rounds = args.rounds or rounds
    out = RESULTS / ("revision-ab-cpu-quick.json" if args.quick else "revision-ab-cpu.json")
    helpers = import_test_helpers()
    model_dir = embedded_model_dir()
    prompts = [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(n)]
    workloads = {"base": [""] * n, f"mixed-{k}": [f"lora{i % k}" for i in range(n)]}
    serve_args = ["--model", model_dir, "--max-adapters", str(k), "--max-lora-rank", "16", "--max-batch-size", str(n)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {f"lora{i}": make_adapter(helpers, model_dir, tmp, f"lora{i}", 16, seed=i) for i in range(k)}
        old_tree = checkout(args.revision, tmp)
        builds = {
            "old": [sys.executable, "-c", SHIM, old_tree],
            "new": [sys.executable, "-c", "import sys; from deltaserve.server.cli import main; sys.exit(main())"],
        }
        servers = {name: start_server(name, command, serve_args) for name, command in builds.items()}
        try:
            for _, target in servers.values():
                with Client(target) as client:
                    for adapter_id, path in adapters.items():
                        client.load_adapter(adapter_id, path)
            rates: dict[tuple[str, str], list[float]] = {(b, w): [] for b in builds for w in workloads}
            outputs: dict[tuple[str, str], list[list[int]]] = {}
            for key in rates:  # warm-up
                asyncio.run(batch(servers[key[0]][1], prompts, workloads[key[1]], 4))
            for round_ in range(rounds):
                order = list(rates)[round_ % len(rates) :] + list(rates)[: round_ % len(rates)]
                for build, workload in order:
                    seconds, outputs[build, workload] = asyncio.run(
                        batch(servers[build][1], prompts, workloads[workload], tokens)
                    )
                    rates[build, workload].append(n * tokens / seconds)
                    log(f"round {round_ + 1}/{rounds} {build} {workload}: {rates[build, workload][-1]:.1f} tok/s")
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=60)
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", old_tree], check=False)
    median = {key: statistics.median(values) for key, values in rates.items()}
    mixed = f"mixed-{k}"
    summary = {
        "old mixed / old base": median["old", mixed] / median["old", "base"],
        "new mixed / new base": median["new", mixed] / median["new", "base"],
        "new / old, base": median["new", "base"] / median["old", "base"],
        "new / old, mixed": median["new", mixed] / median["old", mixed],
    }
    same = {w: sum(a == b for a, b in zip(outputs["old", w], outputs["new", w], strict=True)) for w in workloads}
    print(f"{EMBEDDED_NAME} fp32 CPU ({os.cpu_count()} cores): N={n} x {tokens} tokens, K={k}; median of {rounds}")
    print(f"{'build':<6} {'workload':<10} {'tok/s (median)':>15}  rounds")
    for (build, workload), values in rates.items():
        print(f"{build:<6} {workload:<10} {median[build, workload]:>15.1f}  " + " ".join(f"{v:.1f}" for v in values))
    for name, value in summary.items():
        print(f"{name}: {value:.3f}")
    print("identical greedy rows, old vs new: " + ", ".join(f"{w} {c}/{n}" for w, c in same.items()))
    write_json(
        {
            "benchmark": "revision_ab",
            "machine": machine_info(),
            "model": EMBEDDED_NAME,
            "old_revision": args.revision,
            "new_revision": subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "settings": {"requests": n, "new_tokens": tokens, "adapters": k, "rank": 16, "rounds": rounds},
            "tokens_per_second": {f"{b} {w}": v for (b, w), v in rates.items()},
            "median": {f"{b} {w}": v for (b, w), v in median.items()},
            "ratios": summary,
            "identical_rows": same,
        },
        out,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
