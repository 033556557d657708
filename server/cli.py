"""The `deltaserve` console script: `serve` runs the server; every other subcommand is the client CLI."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from deltaserve.client.cli import build_parser, run_client_command
from deltaserve.server.cluster.config import ClusterConfig, ClusterLaunch
from deltaserve.server.config import FrontDoorConfig, ServerConfig, add_flags, values_from
from deltaserve.server.errors import ConfigError, DeltaserveServerError

# The `serve` flags are ServerConfig's groups; `serve-cluster` has its own front doors (Ray Serve's proxies).
SERVE_GROUPS = tuple(ServerConfig.GROUPS.values())
REPLICA_GROUPS = tuple(group for group in SERVE_GROUPS if group is not FrontDoorConfig)
CLUSTER_GROUPS = (ClusterLaunch, ClusterConfig, *REPLICA_GROUPS)


def add_serve_subcommand(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="start the gRPC server", description="Start the deltaserve gRPC server on a base model."
    )
    add_flags(serve, SERVE_GROUPS)
    serve.set_defaults(subparser=serve)
    cluster = subparsers.add_parser(
        "serve-cluster",
        help="serve on Ray Serve: N replicas, adapter-affine routing, one OpenAI-compatible endpoint",
        description="Run deltaserve as a Ray Serve application (server/cluster/; needs the 'cluster' extra).",
    )
    add_flags(cluster, CLUSTER_GROUPS)
    cluster.set_defaults(subparser=cluster)


def _server_config(args: argparse.Namespace, groups: tuple[type, ...], **overrides: Any) -> ServerConfig:
    """ServerConfig from the parsed flags of `groups` (flag destinations are setting names); raises ConfigError."""
    settings = {}
    for group in groups:
        settings.update(values_from(args, group))
    return ServerConfig.of(**{**settings, **overrides})


def serve_config(argv: Sequence[str]) -> ServerConfig:
    """The ServerConfig that `deltaserve serve ARGV` runs with; raises ConfigError as serving would."""
    args = build_parser(add_serve_subcommand).parse_args(["serve", *argv])
    return _server_config(args, SERVE_GROUPS)


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cluster_config(argv: Sequence[str]) -> tuple[ClusterLaunch, ClusterConfig]:
    """What `deltaserve serve-cluster ARGV` runs with; raises ConfigError as serving would."""
    return _cluster_config(build_parser(add_serve_subcommand).parse_args(["serve-cluster", *argv]))


def _cluster_config(args: argparse.Namespace) -> tuple[ClusterLaunch, ClusterConfig]:
    launch = ClusterLaunch(**values_from(args, ClusterLaunch))
    # Replicas serve their metrics on the proxy's address, at --metrics-port plus their rank on the node.
    server = _server_config(args, REPLICA_GROUPS, host=launch.host, metrics_port=launch.metrics_port)
    return launch, ClusterConfig(server=server, **values_from(args, ClusterConfig))


def run_serve_cluster(args: argparse.Namespace) -> int:
    launch, cluster = _cluster_config(args)
    _logging(args)
    try:
        import ray
        from deltaserve.server.cluster.ray_grpc import SERVICER_FUNCTIONS
        from deltaserve.server.cluster.ray_serve import build_app
        from ray import serve
    except ImportError as err:
        print(f"error: serve-cluster needs Ray Serve (pip install 'deltaserve[cluster]'): {err}", file=sys.stderr)
        return 1
    ray.init(address=launch.address)
    grpc_options = None
    if launch.grpc_port >= 0:
        grpc_options = {"port": launch.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS}
    serve.start(http_options={"host": launch.host, "port": launch.http_port}, grpc_options=grpc_options)
    serve.run(build_app(cluster), name="deltaserve", route_prefix="/", blocking=True)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    config = _server_config(args, SERVE_GROUPS)
    _logging(args)
    return serve_process(config)


def serve_process(config: ServerConfig) -> int:
    """Serve `config` as this process's one server until a signal (0) or the engine's death (1). This thread
    (model loading, then the event loop) computes with one torch thread and the engine thread with
    --torch-threads, so that the process has a single OpenMP team (kernels/threads.py)."""
    from deltaserve.server.app import Server  # torch is imported only when serving
    from deltaserve.server.kernels.threads import default_threads, one_thread_here

    config = config.replace(torch_threads=config.base.torch_threads or default_threads())
    one_thread_here()
    try:
        server = Server.create(config)
        return asyncio.run(server.serve_until_signalled())
    except ConfigError:
        raise  # exit 2, like the flags' own errors
    except DeltaserveServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run_server_command(args: argparse.Namespace) -> int:
    """`serve` or `serve-cluster`; a refused setting is reported like argparse's own errors (exit 2)."""
    try:
        return run_serve(args) if args.command == "serve" else run_serve_cluster(args)
    except ConfigError as err:
        args.subparser.print_usage(sys.stderr)
        print(f"{args.subparser.prog}: error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(add_serve_subcommand)
    args = parser.parse_args(argv)
    if args.command in ("serve", "serve-cluster"):
        return _run_server_command(args)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return run_client_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
