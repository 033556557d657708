"""Throughput of deltaserve on Ray Serve with 1 and with 2 replicas (same run, same machine), and the routing
hit rate under a skewed (zipf) adapter popularity; 2 replicas also without adapter affinity (requests routed to
any replica, adapters loaded on demand there), which isolates what the routing is worth.

    python benchmarks/ray_replicas.py [--requests 160] [--adapters 16] [--per-replica 4]

A local Ray cluster is started; each replica is one deltaserve engine (server/cluster/ray_serve.py). Requests are
greedy OpenAI completions through the Ray Serve HTTP proxy, `--concurrency` at a time, each naming an
adapter drawn from a zipf(s) popularity. A "hit" is a request whose adapter was already resident on the
replica that answered it (the x-deltaserve-adapter-hit header); with `--per-replica` below the number of
adapters, a miss means a load (and an LRU eviction). Writes benchmarks/results/ray-replicas-cpu.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import common


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _zipf_choices(names: list[str], s: float, count: int, seed: int) -> list[str]:
    weights = [1 / (rank + 1) ** s for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


def _complete(url: str, model: str, prompt: str, max_tokens: int) -> tuple[int, bool]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
        return answer["usage"]["completion_tokens"], response.headers.get("x-deltaserve-adapter-hit") == "1"


def run_one(args, model_dir: str, adapters: dict[str, str], replicas: int, affinity: bool, traffic: list[str]) -> dict:
    from deltaserve.server.cluster.ray_serve import ClusterConfig, build_app
    from deltaserve.server.config import ServerConfig
    from ray import serve

    config = ClusterConfig(
        server=ServerConfig.of(
            model=model_dir,
            max_seq_len=256,
            max_batch_size=8,
            max_adapters=args.per_replica,
            adapter_root=[os.path.dirname(next(iter(adapters.values())))],
            preload=sorted(adapters.items()),
        ),
        replicas=replicas,
        max_adapters_per_replica=args.per_replica,
        replica_cpus=1,
        torch_threads=max(1, (os.cpu_count() or 2) // replicas),
        adapter_affinity=affinity,
    )
    serve.run(build_app(config), name="deltaserve", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    prompts = common.CHAT_PROMPTS
    _complete(url, "base", prompts[0], 4)  # warm the path
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(
            pool.map(
                lambda item: _complete(url, item[1], prompts[item[0] % len(prompts)], args.max_tokens),
                enumerate(traffic),
            )
        )
    seconds = time.perf_counter() - started
    serve.delete("deltaserve")
    tokens = sum(count for count, _ in results)
    hits = sum(hit for _, hit in results)
    return {
        "replicas": replicas,
        "affinity": affinity,
        "requests": len(traffic),
        "seconds": seconds,
        "requests_per_s": len(traffic) / seconds,
        "tokens_per_s": tokens / seconds,
        "hit_rate": hits / len(traffic),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--per-replica", type=int, default=4, help="max_adapters_per_replica (the LRU size)")
    parser.add_argument("--zipf", type=float, default=1.1, help="zipf exponent of adapter popularity")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    args.port = args.port or _free_port()

    import ray
    from deltaserve.server.model.loader import embedded_model_dir
    from ray import serve

    helpers = common.import_test_helpers()
    work = tempfile.mkdtemp(prefix="ray-replicas-")
    model_dir = helpers.make_tiny_llama(os.path.join(work, "model"), embedded_model_dir())
    root = os.path.join(work, "adapters")
    names = [f"a{i:02d}" for i in range(args.adapters)]
    adapters = {
        name: common.make_adapter(helpers, model_dir, root, name, 8, seed=i + 1) for i, name in enumerate(names)
    }
    traffic = _zipf_choices(names, args.zipf, args.requests, seed=0)

    ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, logging_level="warning")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING"})
    runs = []
    for replicas, affinity in ((1, True), (2, True), (2, False)):
        routing = "adapter-affine" if affinity else "any replica"
        common.log(f"{replicas} replica(s), {routing}: {args.requests} requests over {args.adapters} adapters")
        runs.append(run_one(args, model_dir, adapters, replicas, affinity, traffic))
    serve.shutdown()
    ray.shutdown()

    base = runs[0]["tokens_per_s"]
    print(f"{'replicas':>8} {'routing':>15} {'req/s':>8} {'tok/s':>8} {'vs 1':>6} {'hit rate':>9}")
    for run in runs:
        routing = "adapter-affine" if run["affinity"] else "any replica"
        run["vs_one_replica"] = run["tokens_per_s"] / base
        print(
            f"{run['replicas']:>8} {routing:>15} {run['requests_per_s']:>8.2f} {run['tokens_per_s']:>8.1f}"
            f" {run['vs_one_replica']:>5.2f}x {run['hit_rate']:>9.2f}"
        )
    settings = {k: v for k, v in vars(args).items() if k != "port"}
    result = {"benchmark": "ray_replicas", "machine": common.machine_info(), "settings": settings, "runs": runs}
    common.write_json(result, common.RESULTS / "ray-replicas-cpu.json")
    plot(runs, common.RESULTS / "ray-replicas-cpu.png")


def plot(runs: list[dict], path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    labels = [
        f"{run['replicas']} replica{'s' if run['replicas'] > 1 else ''}\n" + ("affine" if run["affinity"] else "any")
        for run in runs
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.bar(labels, [run["tokens_per_s"] for run in runs], color="tab:blue")
    left.set_ylabel("generated tokens/s")
    right.bar(labels, [run["hit_rate"] for run in runs], color="tab:green")
    right.set_ylabel("adapter already resident (hit rate)")
    right.set_ylim(0, 1)
    figure.suptitle("deltaserve on Ray Serve, zipf adapter popularity (same run)")
    common.save_figure(figure, path)


if __name__ == "__main__":
    main()
