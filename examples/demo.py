"""Task switching per request: the example adapters and the base answer the same prompts in one mixed batch.

    make serve ARGS="--metrics-port 9100"      # in one terminal (the metrics port is optional)
    .venv/bin/python examples/demo.py          # in another: [ADDRESS] [--metrics URL]

Loads every adapter under examples/adapters into the running server (the server reads the files, so it must
run on this machine), sends one concurrent burst (each prompt to the base and to every adapter), prints the
answers side by side, and reads the server's `deltaserve_batch_size` histogram before and after: decode steps
with more rows than one adapter's requests held several adapters (and the base) at once.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltaserve.client import Client, DeltaserveError

from examples.tasks import TASKS

ADAPTERS = Path(__file__).resolve().parent / "adapters"
PROMPTS = ["What is 23 plus 19?", "Which is larger, 58 or 85?", "Tell me one thing about owls.", "4096"]
BASE = ""
MAX_NEW_TOKENS = 24


def adapter_dirs() -> dict[str, Path]:
    return {name: ADAPTERS / name for name in TASKS if (ADAPTERS / name / "adapter_config.json").exists()}


def load_all(client: Client, dirs: dict[str, Path]) -> None:
    for name, path in dirs.items():
        try:
            info = client.load_adapter(name, str(path))
            print(f"loaded {name}: {info.kind}, {info.size_bytes / 1e3:.0f} kB")
        except DeltaserveError as error:
            if "already" not in error.message:
                raise
            print(f"{name} is already loaded")


def batch_histogram(url: str) -> dict[float, float] | None:
    """{bucket upper bound: cumulative decode steps} of deltaserve_batch_size, or None if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    buckets = {}
    for line in text.splitlines():
        if line.startswith("deltaserve_batch_size_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def shared_steps(before: dict[float, float], after: dict[float, float], rows_per_adapter: int) -> tuple[int, int]:
    """(decode steps in the burst, steps with more rows than one adapter's requests): those mixed adapters."""
    bound = min(b for b in after if b >= rows_per_adapter)
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    small = after[bound] - before.get(bound, 0.0)
    return int(total), int(total - small)


def burst(client: Client, names: list[str], prompts: list[str]) -> dict[tuple[str, str], str]:
    jobs = [(name, prompt) for prompt in prompts for name in names]

    def one(job: tuple[str, str]) -> str:
        name, prompt = job
        result = client.generate(
            messages=[{"role": "user", "content": prompt}], adapter_id=name, max_new_tokens=MAX_NEW_TOKENS
        )
        return result.text

    with ThreadPoolExecutor(len(jobs)) as pool:
        return dict(zip(jobs, pool.map(one, jobs), strict=True))


def side_by_side(answers: dict[tuple[str, str], str], names: list[str], prompts: list[str], width: int = 40) -> str:
    def cell(text: str) -> str:
        text = " ".join(text.split())
        return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)

    header = " | ".join(cell(name or "base") for name in names)
    lines = []
    for prompt in prompts:
        lines.append(f"> {prompt}")
        lines.append(" | ".join(cell(answers[name, prompt]) for name in names))
    return "\n".join([header, "-" * len(header), *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="localhost:50051", help="the server's gRPC address")
    parser.add_argument(
        "--metrics", default="http://127.0.0.1:9100/metrics", help="the server's Prometheus /metrics URL"
    )
    args = parser.parse_args(argv)
    dirs = adapter_dirs()
    names = [BASE, *dirs]
    with Client(args.address, timeout=300) as client:
        client.wait_ready(60)
        load_all(client, dirs)
        before = batch_histogram(args.metrics)
        answers = burst(client, names, PROMPTS)
        after = batch_histogram(args.metrics)
    print(f"\n{len(PROMPTS)} prompts x {len(names)} (the base and {len(dirs)} adapters), sent at once:\n")
    print(side_by_side(answers, names, PROMPTS))
    print()
    for name in dirs:
        task = TASKS[name]
        print(f"{name} ({task.kind}): {task.description}")
    if before is None or after is None:
        print(f"\nno metrics at {args.metrics}: start the server with --metrics-port 9100 to see the shared batches")
        return 0
    steps, mixed = shared_steps(before, after, len(PROMPTS))
    print(
        f"\ndeltaserve_batch_size: {steps} decode steps in the burst; {mixed} of them had more than "
        f"{len(PROMPTS)} rows (one adapter's share), so the base and several adapters decoded together"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
