"""The shared adapter catalog: one registry of adapter id -> (path, version) that every replica consults."""

from deltaserve.server.errors import AdapterExistsError, AdapterNotFoundError, InvalidRequestError
from deltaserve.server.frontends.auth import AdapterPathPolicy
from ray import serve


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class AdapterCatalog:
    """Adapter id -> (resolved path, version). The version grows on every register, so a replica that holds
    an older version of an id knows to reload it."""

    def __init__(self, adapter_root: list[str], preload: list[tuple[str, str]]) -> None:
        self.policy = AdapterPathPolicy(adapter_root)
        self.entries: dict[str, tuple[str, int]] = {}
        self.version = 0
        for adapter_id, path in preload:
            self.register(adapter_id, path)

    def register(self, adapter_id: str, path: str, replace: bool = False) -> tuple[str, int]:
        """Register (or with `replace`, re-point) an id; returns its resolved path and new version."""
        if not adapter_id:
            raise InvalidRequestError("adapter_id must not be empty")
        resolved = self.policy.resolve(path)  # PermissionDeniedError outside the roots
        if adapter_id in self.entries and not replace:
            raise AdapterExistsError(f"adapter {adapter_id!r} is already registered (replace it to change it)")
        self.version += 1
        self.entries[adapter_id] = (resolved, self.version)
        return resolved, self.version

    def unregister(self, adapter_id: str) -> None:
        if self.entries.pop(adapter_id, None) is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")

    def lookup(self, adapter_id: str) -> tuple[str, int] | None:
        return self.entries.get(adapter_id)

    def ids(self) -> list[str]:
        return sorted(self.entries)

    def entries_list(self) -> list[tuple[str, str]]:
        """(id, resolved path) of every registered adapter, by id."""
        return [(adapter_id, self.entries[adapter_id][0]) for adapter_id in sorted(self.entries)]
