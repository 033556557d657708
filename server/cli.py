"""The `deltaserve` console script: `serve` runs the server; every other subcommand is the client CLI."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from deltaserve.client.cli import build_parser, run_client_command


def _preload(value: str) -> tuple[str, str]:
    adapter_id, sep, path = value.partition("=")
    if not sep or not adapter_id or not path:
        raise argparse.ArgumentTypeError(f"--preload wants ID=DIR, got {value!r}")
    return adapter_id, path


def add_serve_subcommand(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="start the gRPC server", description="Start the deltaserve gRPC server on a base model."
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 picks a free one)")
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    serve.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models) here",
    )
    add_engine_flags(serve)
    add_cluster_subcommand(subparsers)


def add_engine_flags(serve: argparse.ArgumentParser) -> None:
    """The flags named after ServerConfig's model, engine and adapter fields (`serve` and `serve-cluster`)."""
    serve.add_argument(
        "--model",
        default=None,
        help="a local Hugging Face causal-LM directory (default: embedded SmolLM2-135M-Instruct)",
    )
    serve.add_argument(
        "--metrics-max-adapters",
        type=int,
        default=64,
        help="distinct adapter ids that get their own metrics label; the rest are reported as 'other'",
    )
    serve.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    serve.add_argument(
        "--quantize",
        choices=("none", "nf4", "int8"),
        default="none",
        help="load the base through bitsandbytes",
    )
    serve.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (KV cache rows)")
    serve.add_argument("--max-seq-len", type=int, default=2048, help="context per request, prompt plus output")
    serve.add_argument(
        "--max-resident-adapters",
        "--max-adapters",
        dest="max_adapters",
        type=int,
        default=8,
        help="adapter slots on the device (least recently used idle adapters are evicted)",
    )
    serve.add_argument(
        "--max-cpu-adapters",
        type=int,
        default=32,
        help="adapters kept parsed in host memory besides those on the device; the rest are re-read from disk",
    )
    serve.add_argument(
        "--max-lora-rank",
        "--max-rank",
        dest="max_lora_rank",
        type=int,
        default=64,
        help="largest adapter rank accepted (a slot holds this rank)",
    )
    serve.add_argument(
        "--max-bottleneck-size",
        type=int,
        default=64,
        help="largest bottleneck adapter dimension accepted (a slot holds this size)",
    )
    serve.add_argument(
        "--default-max-new-tokens",
        type=int,
        default=256,
        help="max_new_tokens for requests that do not set it",
    )
    serve.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=4096,
        help="padded prompt tokens prefilled in one forward (at least one full context)",
    )
    serve.add_argument(
        "--preload",
        type=_preload,
        action="append",
        default=[],
        metavar="ID=DIR",
        help="load this adapter at start-up (repeatable)",
    )
    serve.add_argument(
        "--adapter-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="register every adapter directory under DIR at start-up, named after it (repeatable)",
    )
    serve.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="LoadAdapter paths must resolve under one of these (repeatable; default: any path)",
    )
    serve.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read adapter_model.bin (weights-only unpickling); safetensors only by default",
    )
    serve.add_argument("--max-adapter-bytes", type=int, default=None, help="refuse adapter weight files above this")
    serve.add_argument(
        "--admin-token",
        default=os.environ.get("DELTASERVE_ADMIN_TOKEN"),
        help="require 'authorization: Bearer TOKEN' on the Adapters service (env DELTASERVE_ADMIN_TOKEN)",
    )
    serve.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC over TLS")
    serve.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request message accepted (RESOURCE_EXHAUSTED above)",
    )
    serve.add_argument(
        "--merge-policy",
        choices=("off", "auto"),
        default="off",
        help="auto: merge the adapter that carries nearly all traffic, unmerge when the mix changes",
    )
    serve.add_argument(
        "--merge-window-steps",
        type=int,
        default=32,
        help="decode steps the auto merge policy looks back over (and waits after a switch)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish after SIGTERM/SIGINT",
    )
    serve.add_argument("--log-level", default="INFO")


def add_cluster_subcommand(subparsers) -> None:
    cluster = subparsers.add_parser(
        "serve-cluster",
        help="serve on Ray Serve: N replicas, adapter-affine routing, one OpenAI-compatible endpoint",
        description="Run deltaserve as a Ray Serve application (server/cluster/; needs the 'cluster' extra).",
    )
    cluster.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    cluster.add_argument("--host", default="127.0.0.1", help="Ray Serve HTTP proxy address (default 127.0.0.1)")
    cluster.add_argument("--http-port", type=int, default=8000, help="Ray Serve HTTP proxy port (default 8000)")
    cluster.add_argument(
        "--grpc-port",
        type=int,
        default=50051,
        help="Ray Serve gRPC proxy port for the deltaserve and TGIS gRPC APIs (default 50051; -1 turns it off)",
    )
    cluster.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="each replica serves its deltaserve /metrics on this port plus its rank on the node",
    )
    cluster.add_argument("--replicas", type=int, default=2, help="deltaserve replicas (default 2)")
    cluster.add_argument(
        "--max-adapters-per-replica",
        type=int,
        default=8,
        help="adapters one replica keeps loaded; the least recently used is unloaded for a new one",
    )
    cluster.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs reserved per replica")
    cluster.add_argument("--replica-gpus", type=float, default=0.0, help="Ray GPUs reserved per replica")
    cluster.add_argument("--torch-threads", type=int, default=None, help="torch threads per replica")
    cluster.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        help="autoscale between --replicas and this many replicas on queue depth (Ray Serve autoscaling)",
    )
    cluster.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=8.0,
        help="with --max-replicas: requests in flight per replica that the autoscaler aims for",
    )
    add_engine_flags(cluster)


def _server_config(args: argparse.Namespace):
    """ServerConfig from the parsed flags, or None after printing why they are refused."""
    from deltaserve.server.app import ServerConfig  # torch is imported only when serving

    positive = ("max_batch_size", "max_seq_len", "max_adapters", "max_lora_rank", "max_bottleneck_size")
    for name in (*positive, "default_max_new_tokens"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return None
    # Flags are named after ServerConfig's fields; only the grace period is spelled differently.
    names = {field.name for field in dataclasses.fields(ServerConfig)}
    return ServerConfig(
        **{name: value for name, value in vars(args).items() if name in names},
        shutdown_grace_seconds=args.shutdown_grace,
    )


def run_serve_cluster(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _server_config(args)
    if config is None:
        return 2
    try:
        import ray
        from deltaserve.server.app import adapters_under
        from deltaserve.server.cluster.ray_grpc import SERVICER_FUNCTIONS
        from deltaserve.server.cluster.ray_serve import ClusterConfig, autoscaling_config, build_app
        from ray import serve
    except ImportError as err:
        print(f"error: serve-cluster needs Ray Serve (pip install 'deltaserve[cluster]'): {err}", file=sys.stderr)
        return 1
    config.preload = [*config.preload, *adapters_under(config.adapter_dir)]
    config.adapter_dir = []
    autoscaling = None
    if args.max_replicas is not None:
        autoscaling = autoscaling_config(args.replicas, args.max_replicas, args.target_ongoing_requests)
    cluster = ClusterConfig(
        server=config,
        replicas=args.replicas,
        max_adapters_per_replica=args.max_adapters_per_replica,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        torch_threads=args.torch_threads,
        autoscaling=autoscaling,
    )
    ray.init(address=args.address)
    grpc_options = None
    if args.grpc_port >= 0:
        grpc_options = {"port": args.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS}
    serve.start(http_options={"host": args.host, "port": args.http_port}, grpc_options=grpc_options)
    serve.run(build_app(cluster), name="deltaserve", route_prefix="/", blocking=True)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from deltaserve.server.app import Server
    from deltaserve.server.errors import DeltaserveServerError

    config = _server_config(args)
    if config is None:
        return 2
    try:
        server = Server.create(config)
        return asyncio.run(server.serve_until_signalled())
    except DeltaserveServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(add_serve_subcommand)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "serve-cluster":
        return run_serve_cluster(args)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return run_client_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
