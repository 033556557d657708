"""What the Ray Serve application needs (ClusterConfig: the per-replica server settings and the deployment
settings) and what `deltaserve serve-cluster` needs besides it (ClusterLaunch: where Ray and its proxies run).
Same conventions as server/config.py: one-line docs, flags and Ray arguments from the field metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltaserve.server.config import PORT, ConfigGroup, ServerConfig, parse_text, setting, settings_of, spec
from deltaserve.server.errors import ConfigError


@dataclass(frozen=True)
class ClusterConfig(ConfigGroup):
    """What `build_app` needs: the per-replica server settings and the Ray Serve deployment settings."""

    server: ServerConfig = field(default_factory=ServerConfig)  # every replica's server (validated on its own)
    replicas: int = setting(2, "deltaserve replicas (with --max-replicas: the autoscaler's minimum)", minimum=1)
    max_adapters_per_replica: int = setting(
        8, "adapters one replica keeps loaded; the least recently used is unloaded for a new one", minimum=1
    )
    replica_cpus: float = setting(1.0, "Ray CPUs reserved per replica", minimum=0)
    replica_gpus: float = setting(0.0, "Ray GPUs reserved per replica", minimum=0)
    max_replicas: int | None = setting(
        None,
        "autoscale between --replicas and this many replicas on queue depth (Ray Serve autoscaling)",
        minimum=1,
        shown="off",
    )
    target_ongoing_requests: float = setting(
        8.0, "with --max-replicas: requests in flight per replica that the autoscaler aims for", minimum=0
    )
    autoscaling: dict[str, Any] | None = setting(
        None, "a whole Ray Serve autoscaling_config; overrides --replicas and --max-replicas", cli=False, ray=False
    )
    max_ongoing_requests: int = setting(32, "Ray Serve's max_ongoing_requests per replica", cli=False, ray=False)
    adapter_affinity: bool = setting(
        True,
        "route by adapter (Ray Serve multiplexing); False measures what affinity is worth (benchmarks/ray_replicas.py)",
        cli=False,
        ray=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ConfigError(
                f"--max-replicas must be at least --replicas ({self.replicas}), got {self.max_replicas}", "max_replicas"
            )

    def autoscaling_options(self) -> dict[str, Any] | None:
        """Ray Serve's autoscaling_config: the explicit one, else queue-depth scaling when --max-replicas is set."""
        if self.autoscaling or self.max_replicas is None:
            return self.autoscaling
        return {
            "min_replicas": self.replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


@dataclass(frozen=True)
class ClusterLaunch(ConfigGroup):
    """`serve-cluster` only: the Ray cluster and Ray Serve's proxies (a Serve config file sets these itself)."""

    address: str | None = setting(None, "Ray cluster to join", metavar="ADDRESS", shown="start a local one")
    host: str = setting(
        "127.0.0.1", "Ray Serve HTTP proxy address (replicas bind their metrics here too)", metavar="ADDRESS"
    )
    http_port: int = setting(8000, "Ray Serve HTTP proxy port", **PORT)
    grpc_port: int = setting(
        50051,
        "Ray Serve gRPC proxy port for the deltaserve and TGIS gRPC APIs (-1 turns it off)",
        **{**PORT, "minimum": -1},
    )
    metrics_port: int | None = setting(
        None, "each replica serves its deltaserve /metrics on this port plus its rank on the node", **PORT
    )


def cluster_from_args(args: dict[str, Any]) -> ClusterConfig:
    """ClusterConfig from a Ray Serve application's `args` (deploy/ray/serve.yaml): ClusterConfig's and
    ServerConfig's settings by field name, as text or YAML scalars, parsed and validated like the flags."""
    fields = {item.name: (item, kind) for item, kind in settings_of(ClusterConfig) if spec(item).ray}
    server_fields = {
        item.name: (item, kind)
        for group in ServerConfig.GROUPS.values()
        for item, kind in settings_of(group)
        if spec(item).ray
    }
    own: dict[str, Any] = {}
    server: dict[str, Any] = {}
    try:
        for name, value in args.items():
            if name not in fields and name not in server_fields:
                raise ConfigError(f"unknown deltaserve application argument {name!r}", name)
            item, kind = fields.get(name) or server_fields[name]
            (own if name in fields else server)[name] = parse_text(item, kind, str(value))
        return ClusterConfig(server=ServerConfig.of(**server), **own)
    except ConfigError as err:  # the application's args name settings by field, not by flag
        raise ConfigError(f"deltaserve application argument {err.setting}: {err}", err.setting) from err
