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

import os
from typing import Any

from deltaserve.server.app import adapters_under
from deltaserve.server.cluster.catalog import AdapterCatalog
from deltaserve.server.cluster.config import ClusterConfig, cluster_from_args
from deltaserve.server.cluster.ingress import Ingress
from deltaserve.server.cluster.replica import DeltaserveReplica
from deltaserve.server.model.loader import EMBEDDED_NAME
from ray import serve


def served_name(model: str | None) -> str:
    """The base model's served name, as `load_model` gives it (what a request's `model` names for the base)."""
    return EMBEDDED_NAME if model is None else os.path.basename(os.path.normpath(model))


def build_app(config: ClusterConfig) -> serve.Application:
    """The Ray Serve application: catalog, replicas, ingress. The adapters under --adapter-dir are registered in
    the catalog (replicas load them on demand)."""
    adapters = config.server.adapters
    catalog = AdapterCatalog.bind(adapters.adapter_root, [*adapters.preload, *adapters_under(adapters.adapter_dir)])
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        "max_ongoing_requests": config.max_ongoing_requests,
    }
    autoscaling = config.autoscaling_options()
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = config.replicas
    replicas = DeltaserveReplica.options(**options).bind(config, catalog)
    return Ingress.bind(
        replicas,
        catalog,
        served_name(config.server.base.model),
        config.server.security.admin_token,
        config.adapter_affinity,
        config.server.security.max_request_bytes,
    )


def app_from_args(args: dict[str, Any]) -> serve.Application:
    """The application builder for `serve run` and Serve config files (deploy/ray/serve.yaml): `args` name
    ClusterConfig's and ServerConfig's settings by field (replicas, max_replicas, model, max_seq_len, ...), as
    text or YAML scalars; lists (adapter_root, adapter_dir, preload as id=path) are comma-separated. They are
    parsed and validated like the flags: a bad one raises ConfigError naming it."""
    return build_app(cluster_from_args(args))
