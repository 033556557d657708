"""deltaserve on Ray Serve: N replicas of one engine each, adapter-affine routing, one HTTP endpoint.

Three deployments make the application (`build_app`):

- `AdapterCatalog` (one replica): the shared registry of adapter id -> (path, version). Adapters are
  registered here once; a path must lie under the allowed roots (`AdapterPathPolicy`). Replicas consult it.
- `DeltaserveReplica` (N replicas, or autoscaled): one deltaserve `Server` each, base model resident. Its
  adapters are Ray Serve multiplexed models: the first request for an adapter on a replica loads it into that
  replica's registry (validated there like a LoadAdapter call); Ray Serve's LRU (`max_adapters_per_replica`)
  unloads the least recently used one. Requests run through the replica's own `OpenAIFrontDoor` app, called
  in-process over ASGI, so generation is `FrontDoorCore.submit` as in every other front door.
- `Ingress` (Ray Serve's HTTP proxy, and its gRPC proxy when started, route here): reads the adapter from the
  request (`model` over HTTP; see `ray_grpc` for gRPC) and calls a replica with it as `multiplexed_model_id`, so
  Ray Serve's router prefers replicas that already hold the adapter. Listing, registering and unregistering
  adapters are answered from the catalog.

Each HTTP response carries `x-deltaserve-replica` (the replica's id), which is how affinity is observed.
"""

import dataclasses
import os
from typing import Any

from deltaserve.server.app import ServerConfig, adapters_under
from deltaserve.server.cluster.catalog import AdapterCatalog
from deltaserve.server.cluster.config import ClusterConfig
from deltaserve.server.cluster.ingress import Ingress
from deltaserve.server.cluster.replica import DeltaserveReplica
from deltaserve.server.model.loader import EMBEDDED_NAME
from ray import serve


def served_name(model: str | None) -> str:
    """The base model's served name, as `load_model` gives it (what a request's `model` names for the base)."""
    return EMBEDDED_NAME if model is None else os.path.basename(os.path.normpath(model))


def autoscaling_config(min_replicas: int, max_replicas: int, target_ongoing_requests: float) -> dict[str, Any]:
    """Ray Serve's autoscaling_config scaling on queue depth: requests in flight per replica."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing_requests,
    }


def build_app(config: ClusterConfig) -> serve.Application:
    """The Ray Serve application: catalog, replicas, ingress."""
    catalog = AdapterCatalog.bind(config.server.adapter_root, config.server.preload)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        "max_ongoing_requests": config.max_ongoing_requests,
    }
    if config.autoscaling:
        options["autoscaling_config"] = config.autoscaling
    else:
        options["num_replicas"] = config.replicas
    replicas = DeltaserveReplica.options(**options).bind(config, catalog)
    return Ingress.bind(
        replicas, catalog, served_name(config.server.model), config.server.admin_token, config.adapter_affinity
    )


def app_from_args(args: dict[str, str]) -> serve.Application:
    """The application builder for `serve run` and Serve config files (deploy/ray/serve.yaml): `args` are
    strings. Keys: model, replicas, max_adapters_per_replica, replica_cpus, replica_gpus, torch_threads,
    max_replicas and target_ongoing_requests (autoscaling), adapter_root and adapter_dir (comma-separated),
    preload (comma-separated id=path), and ServerConfig's numeric and text fields by name (max_seq_len, dtype...)."""
    args = {name: str(value) for name, value in args.items()}  # a YAML config may give numbers
    cluster = ClusterConfig()
    for name, kind in (("replicas", int), ("max_adapters_per_replica", int), ("torch_threads", int)):
        if name in args:
            setattr(cluster, name, kind(args.pop(name)))
    for name in ("replica_cpus", "replica_gpus"):
        if name in args:
            setattr(cluster, name, float(args.pop(name)))
    if "max_replicas" in args:
        max_replicas = int(args.pop("max_replicas"))
        target = float(args.pop("target_ongoing_requests", "8"))
        cluster.autoscaling = autoscaling_config(cluster.replicas, max_replicas, target)
    server = cluster.server
    for name in ("adapter_root", "adapter_dir"):
        setattr(server, name, [part for part in args.pop(name, "").split(",") if part])
    for item in [part for part in args.pop("preload", "").split(",") if part]:
        adapter_id, _, path = item.partition("=")
        server.preload.append((adapter_id, path))
    server.preload += adapters_under(server.adapter_dir)
    server.adapter_dir = []
    types = {item.name: type(getattr(server, item.name)) for item in dataclasses.fields(ServerConfig)}
    for name, value in args.items():
        if name not in types:
            raise ValueError(f"unknown deltaserve application argument {name!r}")
        if name in ("metrics_port", "max_adapter_bytes"):  # int or None
            value = int(value)
        elif types[name] is bool:
            value = value.lower() in ("1", "true", "yes")
        elif types[name] not in (str, type(None)):
            value = types[name](value)
        setattr(server, name, value)
    return build_app(cluster)
