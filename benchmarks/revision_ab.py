"""Two builds of the server side by side: this checkout against an earlier git revision, same workload, same run.

Speed-ups claimed between commits cannot be read off runs from different hours on a noisy machine, so this
starts both builds as `deltaserve serve` subprocesses (the revision from a `git worktree` of it, imported ahead
of the installed package), loads the same adapters into each and gives them the workload of throughput.py in
turns: N concurrent greedy chat requests of exactly T tokens, on the base and spread over K rank-16 all-linear
LoRA adapters (request i on adapter i % K, or with --spread zipf a skewed mix). Only one server works at a time;
the idle one waits on its engine's condition variable. Reported: tokens/s per (build, workload), medians over
rounds, each build's mixed / base, and the new build's speed relative to the old one. The greedy outputs of the
two builds are compared row by row.

Run:  python benchmarks/revision_ab.py --revision 02bfc48          (N=16 x 64 tokens, K=8, 3 rounds)
      python benchmarks/revision_ab.py --revision 02bfc48 --spread zipf   (a skewed mix: 6 3 2 1 1 1 1 1 requests)
      python benchmarks/revision_ab.py --revision 02bfc48 --quick  (N=4 x 8 tokens, K=2, 1 round)
Writes benchmarks/results/revision-ab-cpu.json (revision-ab-cpu-zipf.json with --spread zipf; …-quick.json for
--quick).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from deltaserve.client import AsyncClient, Client
from deltaserve.testing.helpers import free_port
from harness import (
    REPO,
    Measurement,
    Run,
    Settings,
    chat_messages,
    description,
    embedded_model,
    format_table,
    generate_batch,
    log,
    make_adapter,
    on_loop,
    option,
    parse_settings,
    ratio,
    report,
    require,
    timed_rounds,
    zipf_counts,
)

RANK = 16


@dataclass(frozen=True)
class RevisionSettings(Settings):
    STEM = "revision-ab-cpu"

    revision: str = option("", "the git revision to compare this checkout against (required)")
    requests: int = option(16, "concurrent requests N", quick=4, minimum=1)
    new_tokens: int = option(64, "tokens per request", quick=8, minimum=1)
    adapters: int = option(8, "LoRA adapters K of the mixed workload", quick=2, minimum=1)
    rounds: int = option(3, "timed rounds", quick=1, minimum=1)
    spread: str = option("round-robin", "requests over the K adapters: round-robin (i mod K) or zipf (skewed)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.revision), "--revision is required")
        require(self.spread in ("round-robin", "zipf"), "--spread must be round-robin or zipf")

    def stem(self) -> str:
        return self.STEM if self.spread == "round-robin" else f"{self.STEM}-zipf"


def assignment(s: RevisionSettings) -> list[str]:
    """Each request's adapter in the mixed workload."""
    if s.spread == "zipf":
        return [f"lora{k}" for k, count in enumerate(zipf_counts(s.requests, s.adapters)) for _ in range(count)]
    return [f"lora{i % s.adapters}" for i in range(s.requests)]


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


async def batch(target: str, prompts: list[str], adapter_ids: list[str], tokens: int) -> Run:
    async with AsyncClient(target, timeout=600) as client:
        await client.model_info()  # connect before the clock starts
        return await generate_batch(client, prompts, adapter_ids, tokens)


def measure(servers: dict[str, str], workloads: dict[str, list[str]], s: RevisionSettings) -> dict[str, Measurement]:
    """Every (build, workload) pair in turns; only one server works at a time."""
    prompts = chat_messages(s.requests)
    with asyncio.Runner() as runner:

        def system(target: str, ids: list[str], tokens: int) -> object:
            return on_loop(runner, lambda: batch(target, prompts, ids, tokens))

        pairs = {f"{b} {w}": (target, ids) for b, target in servers.items() for w, ids in workloads.items()}
        return timed_rounds(
            {key: system(*pair, s.new_tokens) for key, pair in pairs.items()},
            s.rounds,
            warmups={key: system(*pair, 4) for key, pair in pairs.items()},
        ).measurements


def run_builds(s: RevisionSettings, model_dir: str, workloads: dict[str, list[str]]) -> dict[str, Measurement]:
    serve_args = ["--model", model_dir, "--max-adapters", str(s.adapters), "--max-lora-rank", str(RANK)]
    serve_args += ["--max-batch-size", str(s.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {f"lora{i}": make_adapter(model_dir, tmp, f"lora{i}", RANK, seed=i) for i in range(s.adapters)}
        old_tree = checkout(s.revision, tmp)
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
            return measure({name: target for name, (_, target) in servers.items()}, workloads, s)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=60)
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", old_tree], check=False)


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(RevisionSettings, argv, description(__doc__))
    model_dir, model_name = embedded_model()
    n, mixed = s.requests, f"mixed-{s.adapters}"
    workloads = {"base": [""] * n, mixed: assignment(s)}
    cells = run_builds(s, model_dir, workloads)
    median = {key: m.median() for key, m in cells.items()}
    ratios = {
        "old mixed / old base": ratio(median[f"old {mixed}"], median["old base"]),
        "new mixed / new base": ratio(median[f"new {mixed}"], median["new base"]),
        "new / old, base": ratio(median["new base"], median["old base"]),
        "new / old, mixed": ratio(median[f"new {mixed}"], median[f"old {mixed}"]),
    }
    same = {
        w: sum(
            a == b for a, b in zip(cells[f"old {w}"].runs[-1].outputs, cells[f"new {w}"].runs[-1].outputs, strict=True)
        )
        for w in workloads
    }
    rows = [[key, f"{median[key]:.1f}", " ".join(f"{v:.1f}" for v in m.values())] for key, m in cells.items()]
    text = [
        f"{model_name} fp32 CPU ({os.cpu_count()} cores): N={n} x {s.new_tokens} tokens, K={s.adapters} "
        f"({s.spread}: {' '.join(str(workloads[mixed].count(f'lora{k}')) for k in range(s.adapters))}); "
        f"median of {s.rounds}",
        format_table(["build workload", "tok/s (median)", "rounds"], rows),
        *(f"{name}: {r['ratio']:.3f}" for name, r in ratios.items()),
        "identical greedy rows, old vs new: " + ", ".join(f"{w} {c}/{n}" for w, c in same.items()),
    ]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    data = {
        "model": model_name,
        "old_revision": s.revision,
        "new_revision": head.stdout.strip(),
        "rank": RANK,
        "assignment": workloads[mixed],
        "tokens_per_second": {key: m.values() for key, m in cells.items()},
        "median": median,
        "ratios": ratios,
        "identical_rows": same,
    }
    report("revision_ab", s, data, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
