"""deltaserve on Ray Serve: N replicas of one engine each, adapter-affine routing, one HTTP endpoint.

Three deployments make the application (`build_app`):

- `AdapterCatalog` (one replica): the shared registry of adapter id -> (path, version). Adapters are
  registered here once; a path must lie under the allowed roots (`AdapterPathPolicy`). Replicas consult it.
- `DeltaserveReplica` (N replicas, or autoscaled): one deltaserve `Server` each, base model resident. Its
  adapters are Ray Serve multiplexed models: the first request for an adapter on a replica loads it into that
  replica's registry (validated there like a LoadAdapter call); Ray Serve's LRU (`max_adapters_per_replica`)
  unloads the least recently used one. Requests run through the replica's own `OpenAIFrontDoor` app, called
  in-process over ASGI, so generation is `GenerationService.run` as in every other front door.
- `OpenAIIngress` (Ray Serve's HTTP proxy routes here): reads `model` from the body and calls a replica with
  `multiplexed_model_id=model`, so Ray Serve's router prefers replicas that already hold the adapter.
  `/v1/models` and the load/unload endpoints are answered from the catalog.

Each response carries `x-deltaserve-replica` (the replica's id), which is how affinity is observed.
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deltaserve.server.app import Server, ServerConfig
from deltaserve.server.errors import AdapterExistsError, AdapterNotFoundError
from deltaserve.server.model_loader import EMBEDDED_NAME
from deltaserve.server.openai_http import BASE_ALIASES, OpenAIFrontDoor, OpenAIHttpError, _error_body
from deltaserve.server.security import AdapterPathPolicy
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-deltaserve-replica"
LOADS_HEADER = "x-deltaserve-adapter-loads"  # times the answering replica has loaded the request's adapter
HIT_HEADER = "x-deltaserve-adapter-hit"  # 1: the adapter was already resident on the answering replica


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


# ---- the shared adapter registry ---------------------------------------------------------------------
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

    def register(self, adapter_id: str, path: str, replace: bool = False) -> int:
        if not adapter_id:
            raise AdapterNotFoundError("adapter_id must not be empty")
        resolved = self.policy.resolve(path)  # PermissionDeniedError outside the roots
        if adapter_id in self.entries and not replace:
            raise AdapterExistsError(f"adapter {adapter_id!r} is already registered (replace it to change it)")
        self.version += 1
        self.entries[adapter_id] = (resolved, self.version)
        return self.version

    def unregister(self, adapter_id: str) -> None:
        if self.entries.pop(adapter_id, None) is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")

    def lookup(self, adapter_id: str) -> tuple[str, int] | None:
        return self.entries.get(adapter_id)

    def ids(self) -> list[str]:
        return sorted(self.entries)


# ---- one replica: one deltaserve engine ----------------------------------------------------------------
class _ResidentAdapter:
    """Ray Serve's multiplexed "model" for one adapter on one replica. Ray Serve calls `__del__` when its LRU
    evicts the adapter; that unloads it from this replica's registry (once)."""

    def __init__(self, server: Server, adapter_id: str, version: int) -> None:
        self.server = server
        self.adapter_id = adapter_id
        self.version = version
        self.unloaded = False

    def __del__(self) -> None:
        if self.unloaded:
            return
        self.unloaded = True
        with contextlib.suppress(Exception):  # already gone (unregistered, replaced) is fine
            self.server.registry.unload(self.adapter_id)


@serve.deployment
class DeltaserveReplica:
    async def __init__(self, config: ClusterConfig, catalog: DeploymentHandle) -> None:
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        server_config = dataclasses.replace(
            config.server, host="127.0.0.1", port=0, http_port=None, metrics_port=None, preload=[]
        )
        self.server = await asyncio.to_thread(Server.create, server_config)
        await self.server.start()  # the engine, and this replica's own gRPC server on a loopback port
        self.front = OpenAIFrontDoor(
            self.server.generation,
            self.server.adapters,
            model_name=self.server.loaded.name,
            max_request_bytes=server_config.max_request_bytes,
        )
        self.catalog = catalog
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.metrics_port = None
        if config.server.metrics_port is not None:
            # Replicas on one node take consecutive ports from --metrics-port, by their rank on the node.
            port = config.server.metrics_port + context.rank.local_rank
            try:
                self.server.metrics.serve(port, config.server.host)
                self.metrics_port = port
            except OSError as err:
                log.warning("replica %s cannot serve its metrics on port %d: %s", self.replica_id, port, err)
        self.loads: Counter[str] = Counter()  # adapter id -> times this replica loaded it
        self.served: Counter[str] = Counter()  # adapter id -> requests this replica served for it

        async def _load_resident(adapter_id: str) -> _ResidentAdapter:
            return await self._load(adapter_id)

        self._resident = serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)(_load_resident)
        log.info("replica %s serving %s", self.replica_id, self.server.loaded.name)

    async def _load(self, adapter_id: str) -> _ResidentAdapter:
        entry = await self.catalog.lookup.remote(adapter_id)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        path, version = entry
        replace = any(record.adapter_id == adapter_id for record in self.server.registry.list())
        await self.server.adapters.load(adapter_id, path, replace=replace)
        self.loads[adapter_id] += 1
        log.info("replica %s loaded adapter %r (version %d)", self.replica_id, adapter_id, version)
        return _ResidentAdapter(self.server, adapter_id, version)

    async def _ensure_adapter(self, adapter_id: str) -> None:
        """Make `adapter_id` resident here at the catalog's current version; unknown ids are left for the front
        door to refuse (404 model_not_found). Replace and unregister propagate through this check."""
        try:
            resident = await self._resident(adapter_id)
        except AdapterNotFoundError:
            return
        entry = await self.catalog.lookup.remote(adapter_id)
        if entry is None:  # unregistered since it was loaded here
            resident.__del__()
            return
        path, version = entry
        if version != resident.version:  # replaced: the new weights, running requests finish on the old
            await self.server.adapters.load(adapter_id, path, replace=True)
            resident.version = version
            self.loads[adapter_id] += 1

    async def forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> AsyncIterator:
        """Serve one HTTP request with this replica's OpenAI front door. Yields a head dict (status, headers)
        first, then the body in chunks (one for a JSON answer, one per event for a stream)."""
        adapter_id = serve.get_multiplexed_model_id()
        loads_before = self.loads[adapter_id]
        if adapter_id and adapter_id not in (*BASE_ALIASES, self.server.loaded.name):
            try:
                await self._ensure_adapter(adapter_id)
            except Exception as err:
                status, error = _error_body(err, "prompt", "max_tokens")
                yield {"status": status, "headers": [(REPLICA_HEADER, self.replica_id)]}
                yield json.dumps({"error": error}).encode()
                return
            self.served[adapter_id] += 1
        async for item in self._asgi(method, path, headers, body):
            if isinstance(item, dict) and adapter_id:
                hit = "1" if self.loads[adapter_id] == loads_before else "0"  # found it resident here
                item["headers"] += [(LOADS_HEADER, str(self.loads[adapter_id])), (HIT_HEADER, hit)]
            yield item

    async def _asgi(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> AsyncIterator:
        messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        gone = asyncio.Event()  # set when the caller stops reading: the front door then cancels the request
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await messages.put(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(name.lower().encode(), value.encode()) for name, value in headers],
            "client": None,
            "server": None,
        }
        app = asyncio.create_task(self.front.app(scope, receive, send))
        try:
            while True:
                getter = asyncio.ensure_future(messages.get())
                await asyncio.wait({getter, app}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    app.result()  # the app ended without a complete response: raise what ended it
                    raise RuntimeError("the front door ended without a response")
                message = getter.result()
                if message["type"] == "http.response.start":
                    names = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                    yield {"status": message["status"], "headers": [*names, (REPLICA_HEADER, self.replica_id)]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        break
        finally:
            gone.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(app, timeout=30)

    def stats(self) -> dict[str, Any]:
        """This replica's id, the adapters it loaded (and how often) and served, and those resident now."""
        return {
            "replica": self.replica_id,
            "metrics_port": self.metrics_port,
            "loads": dict(self.loads),
            "served": dict(self.served),
            "resident": [record.adapter_id for record in self.server.registry.list()],
        }

    def metrics_text(self) -> bytes:
        """This replica's deltaserve metrics in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.server.metrics.registry)


# ---- the HTTP ingress -----------------------------------------------------------------------------------
async def _after_head(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body chunks; a replica lost once the head was sent ends the body early (an event stream then lacks
    its `data: [DONE]`, which is how a streaming client sees it)."""
    try:
        async for chunk in chunks:
            yield chunk
    except RayActorError as err:
        log.warning("replica lost in the middle of a response: %s", type(err).__name__)


ingress_app = FastAPI(title="deltaserve on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)

# Only these are forwarded: the front door reads them (request id, timeout, content type).
_FORWARDED_HEADERS = ("content-type", "x-request-id", "x-request-timeout")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class OpenAIIngress:
    def __init__(
        self, replicas: DeploymentHandle, catalog: DeploymentHandle, model_name: str, admin_token: str | None
    ) -> None:
        self.replicas = replicas
        self.catalog = catalog
        self.model_name = model_name
        self._expected_auth = f"Bearer {admin_token}".encode() if admin_token else None

    def _check_admin(self, request: HttpRequest) -> None:
        """Registering and unregistering adapters need the admin token, as on a single server."""
        if self._expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected_auth):
            raise OpenAIHttpError(401, "adapter loading and unloading need 'Authorization: Bearer <admin token>'")

    async def _forward(self, request: HttpRequest) -> Response:
        body = await request.body()
        try:
            model = json.loads(body).get("model") or ""
        except (ValueError, AttributeError):
            model = ""  # the replica's front door answers the malformed body
        adapter_id = "" if not isinstance(model, str) or model in (*BASE_ALIASES, self.model_name) else model
        headers = [(name, request.headers[name]) for name in _FORWARDED_HEADERS if name in request.headers]
        handle = self.replicas.options(stream=True, multiplexed_model_id=adapter_id)
        chunks = handle.forward.remote(request.method, request.url.path, headers, body)
        try:
            head = await chunks.__anext__()
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as err:
            # The replica died (or none can take the request now): nothing was generated for the caller, who
            # may retry; Ray Serve restarts the replica and routes retries to live ones.
            log.warning("request failed on its replica: %s", type(err).__name__)
            return JSONResponse(
                {
                    "error": {
                        "message": f"the replica serving this request is unavailable ({type(err).__name__}); retry",
                        "type": "service_unavailable_error",
                        "param": None,
                        "code": "unavailable",
                    }
                },
                status_code=503,
                headers={"retry-after": "1"},
            )
        return StreamingResponse(_after_head(chunks), status_code=head["status"], headers=dict(head["headers"]))

    @ingress_app.post("/v1/completions")
    async def completions(self, request: HttpRequest) -> Response:
        return await self._forward(request)

    @ingress_app.post("/v1/chat/completions")
    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self._forward(request)

    @ingress_app.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        cards = [{"id": self.model_name, "object": "model", "owned_by": "deltaserve", "parent": None}]
        for adapter_id in await self.catalog.ids.remote():
            cards.append({"id": adapter_id, "object": "model", "owned_by": "deltaserve", "parent": self.model_name})
        return JSONResponse({"object": "list", "data": cards})

    @ingress_app.post("/v1/load_lora_adapter")
    async def load_adapter(self, request: HttpRequest) -> JSONResponse:
        try:
            self._check_admin(request)
            body = await request.json()
            adapter_id, path = body["lora_name"], body["lora_path"]
            version = await self.catalog.register.remote(adapter_id, path, bool(body.get("load_inplace")))
        except Exception as err:
            status, error = _error_body(err, "prompt", "max_tokens")
            return JSONResponse({"error": error}, status_code=status)
        return JSONResponse({"id": adapter_id, "object": "model", "parent": self.model_name, "version": version})

    @ingress_app.post("/v1/unload_lora_adapter")
    async def unload_adapter(self, request: HttpRequest) -> JSONResponse:
        try:
            self._check_admin(request)
            adapter_id = (await request.json())["lora_name"]
            await self.catalog.unregister.remote(adapter_id)
        except Exception as err:
            status, error = _error_body(err, "prompt", "max_tokens")
            return JSONResponse({"error": error}, status_code=status)
        return JSONResponse({"id": adapter_id, "object": "model", "deleted": True})


def served_name(model: str | None) -> str:
    """The base model's served name, as `load_model` gives it (what a request's `model` names for the base)."""
    return EMBEDDED_NAME if model is None else os.path.basename(os.path.normpath(model))


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
    return OpenAIIngress.bind(replicas, catalog, served_name(config.server.model), config.server.admin_token)


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
        cluster.autoscaling = {
            "min_replicas": cluster.replicas,
            "max_replicas": int(args.pop("max_replicas")),
            "target_ongoing_requests": float(args.pop("target_ongoing_requests", "8")),
        }
    server = cluster.server
    for name in ("adapter_root", "adapter_dir"):
        setattr(server, name, [part for part in args.pop(name, "").split(",") if part])
    for item in [part for part in args.pop("preload", "").split(",") if part]:
        adapter_id, _, path = item.partition("=")
        server.preload.append((adapter_id, path))
    server.preload += _adapters_in(server.adapter_dir)
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


def _adapters_in(directories: list[str]) -> list[tuple[str, str]]:
    """(id, path) for every adapter directory directly under each of `directories`; the id is its name."""
    found = []
    for directory in directories:
        for name in sorted(os.listdir(directory)):
            if os.path.isfile(os.path.join(directory, name, "adapter_config.json")):
                found.append((name, os.path.join(directory, name)))
    return found
