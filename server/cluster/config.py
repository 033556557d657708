"""What the Ray Serve application needs: the per-replica server settings and the deployment settings."""

from dataclasses import dataclass, field
from typing import Any

from deltaserve.server.app import ServerConfig


@dataclass
class ClusterConfig:
    """What `build_app` needs: the per-replica server settings and the Ray Serve deployment settings."""

    server: ServerConfig = field(default_factory=ServerConfig)
    replicas: int = 2
    max_adapters_per_replica: int = 8
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    torch_threads: int | None = None  # per replica; None leaves torch's default
    # Ray Serve autoscaling_config (e.g. {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8});
    # when set, `replicas` is ignored.
    autoscaling: dict[str, Any] | None = None
    max_ongoing_requests: int = 32
    # Route by adapter (Ray Serve multiplexing). False sends requests to any replica, the adapters still loaded
    # on demand there; it exists to measure what affinity is worth (benchmarks/ray_replicas.py).
    adapter_affinity: bool = True
