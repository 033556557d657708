"""Throughput of deltaserve on Ray Serve with 1 and with 2 replicas (same run, same machine), and the routing
hit rate under a skewed (zipf) adapter popularity; 2 replicas also without adapter affinity (requests routed to
any replica, adapters loaded on demand there), which isolates what the routing is worth.

    python benchmarks/ray_replicas.py [--requests 160] [--adapters 16] [--per-replica 4]   (--quick: 16 requests)

A local Ray cluster is started; each replica is one deltaserve engine (server/cluster/ray_serve.py). Requests are
greedy OpenAI completions through the Ray Serve HTTP proxy, `--concurrency` at a time, each naming an
adapter drawn from a zipf(s) popularity. A "hit" is a request whose adapter was already resident on the
replica that answered it (the x-deltaserve-adapter-hit header); with `--per-replica` below the number of
adapters, a miss means a load (and an LRU eviction). Writes benchmarks/results/ray-replicas-cpu.json and .png.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from deltaserve.testing.helpers import free_port
from harness import (
    CHAT_PROMPTS,
    Settings,
    cpu_config,
    description,
    embedded_model,
    format_table,
    log,
    make_adapter,
    option,
    parse_settings,
    ratio,
    report,
)


@dataclass(frozen=True)
class RaySettings(Settings):
    STEM = "ray-replicas-cpu"

    requests: int = option(160, "requests per run", quick=16, minimum=1)
    adapters: int = option(16, "distinct adapters", quick=4, minimum=1)
    per_replica: int = option(4, "max_adapters_per_replica (the LRU size)", quick=2, minimum=1)
    zipf: float = option(1.1, "zipf exponent of adapter popularity", minimum=0)
    concurrency: int = option(8, "requests in flight", quick=4, minimum=1)
    max_tokens: int = option(32, "tokens per completion", quick=4, minimum=1)
    port: int = option(0, "HTTP port of the Ray Serve proxy (0 = a free one)", minimum=0)


def _zipf_choices(names: list[str], s: float, count: int, seed: int) -> list[str]:
    weights = [1 / (rank + 1) ** s for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


def _complete(url: str, model: str, prompt: str, max_tokens: int) -> tuple[int, bool]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
        return answer["usage"]["completion_tokens"], response.headers.get("x-deltaserve-adapter-hit") == "1"


def run_one(
    s: RaySettings, port: int, model_dir: str, adapters: dict[str, str], replicas: int, affinity: bool, traffic: list
) -> dict:
    """One deployment: all the traffic through the HTTP proxy, `concurrency` requests at a time."""
    from deltaserve.server.cluster.ray_serve import ClusterConfig, build_app
    from ray import serve

    config = ClusterConfig(
        server=cpu_config(
            model_dir,
            max_seq_len=256,
            max_batch_size=8,
            max_adapters=s.per_replica,
            adapter_root=[os.path.dirname(next(iter(adapters.values())))],
            preload=sorted(adapters.items()),
        ),
        replicas=replicas,
        max_adapters_per_replica=s.per_replica,
        replica_cpus=1,
        torch_threads=max(1, (os.cpu_count() or 2) // replicas),
        adapter_affinity=affinity,
    )
    serve.run(build_app(config), name="deltaserve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    _complete(url, "base", CHAT_PROMPTS[0], 4)  # warm the path
    started = time.perf_counter()
    with ThreadPoolExecutor(s.concurrency) as pool:
        results = list(
            pool.map(
                lambda item: _complete(url, item[1], CHAT_PROMPTS[item[0] % len(CHAT_PROMPTS)], s.max_tokens),
                enumerate(traffic),
            )
        )
    seconds = time.perf_counter() - started
    serve.delete("deltaserve")
    tokens = sum(count for count, _ in results)
    return {
        "replicas": replicas,
        "affinity": affinity,
        "requests": len(traffic),
        "seconds": seconds,
        "requests_per_s": len(traffic) / seconds,
        "tokens_per_s": tokens / seconds,
        "hit_rate": sum(hit for _, hit in results) / len(traffic),
    }


def run_all(s: RaySettings, model_dir: str, adapters: dict[str, str], traffic: list[str]) -> list[dict]:
    """1 replica, 2 adapter-affine replicas, 2 replicas routed anywhere: one local Ray cluster for all three."""
    import ray
    from ray import serve

    port = s.port or free_port()
    ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, logging_level="warning")
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    runs = []
    for replicas, affinity in ((1, True), (2, True), (2, False)):
        log(f"{replicas} replica(s), {routing(affinity)}: {s.requests} requests over {s.adapters} adapters")
        runs.append(run_one(s, port, model_dir, adapters, replicas, affinity, traffic))
    serve.shutdown()
    ray.shutdown()
    return runs


def routing(affinity: bool) -> str:
    return "adapter-affine" if affinity else "any replica"


def draw(runs: list[dict]) -> object:
    labels = [
        f"{run['replicas']} replica{'s' if run['replicas'] > 1 else ''}\n" + ("affine" if run["affinity"] else "any")
        for run in runs
    ]

    def plot(left: object, right: object) -> None:
        left.bar(labels, [run["tokens_per_s"] for run in runs], color="tab:blue")
        left.set_ylabel("generated tokens/s")
        right.bar(labels, [run["hit_rate"] for run in runs], color="tab:green")
        right.set_ylabel("adapter already resident (hit rate)")
        right.set_ylim(0, 1)

    return plot


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(RaySettings, argv, description(__doc__))
    from deltaserve.testing.helpers import make_tiny_llama

    work = tempfile.mkdtemp(prefix="ray-replicas-")
    model_dir = make_tiny_llama(os.path.join(work, "model"), embedded_model()[0])
    names = [f"a{i:02d}" for i in range(s.adapters)]
    root = os.path.join(work, "adapters")
    adapters = {name: make_adapter(model_dir, root, name, 8, seed=i + 1) for i, name in enumerate(names)}
    runs = run_all(s, model_dir, adapters, _zipf_choices(names, s.zipf, s.requests, seed=0))
    base = runs[0]["tokens_per_s"]
    for run in runs:
        run["vs_one_replica"] = ratio(run["tokens_per_s"], base)
    rows = [
        [
            run["replicas"],
            routing(run["affinity"]),
            f"{run['requests_per_s']:.2f}",
            f"{run['tokens_per_s']:.1f}",
            f"{run['vs_one_replica']['ratio']:.2f}x",
            f"{run['hit_rate']:.2f}",
        ]
        for run in runs
    ]
    table = format_table(["replicas", "routing", "req/s", "tok/s", "vs 1", "hit rate"], rows, left=2)
    title = "deltaserve on Ray Serve, zipf adapter popularity (same run)"
    report(
        "ray_replicas",
        s,
        {"model": "tiny random Llama", "runs": runs},
        [table],
        draw(runs),
        panels=2,
        size=(8, 3.2),
        title=title,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
