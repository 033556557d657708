"""deltaserve on Ray Serve: N replicas of one engine each, adapter-affine routing, one HTTP endpoint.

Three deployments make the application (`build_app`):

- `AdapterCatalog` (one replica): the shared registry of adapter id -> (path, version). Adapters are
  registered here once; a path must lie under the allowed roots (`AdapterPathPolicy`). Replicas consult it.
- `DeltaserveReplica` (N replicas, or autoscaled): one deltaserve `Server` each, base model resident. Its
  adapters are Ray Serve multiplexed models: the first request for an adapter on a replica loads it into that
  replica's registry (validated there like a LoadAdapter call); Ray Serve's LRU (`max_adapters_per_replica`)
  unloads the least recently used one. Requests run through the replica's own `OpenAIFrontDoor` app, called
  in-process over ASGI, so generation is `GenerationService.run` as in every other front door.
- `Ingress` (Ray Serve's HTTP proxy, and its gRPC proxy when started, route here): reads the adapter from the
  request (`model` over HTTP; see `ray_grpc` for gRPC) and calls a replica with it as `multiplexed_model_id`, so
  Ray Serve's router prefers replicas that already hold the adapter. Listing, registering and unregistering
  adapters are answered from the catalog.

Each HTTP response carries `x-deltaserve-replica` (the replica's id), which is how affinity is observed.
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from deltaserve.server.app import Server, ServerConfig, adapters_under
from deltaserve.server.cluster.ray_grpc import GrpcIngressMethods
from deltaserve.server.errors import AdapterExistsError, AdapterNotFoundError, InvalidRequestError
from deltaserve.server.frontends.auth import AdapterPathPolicy
from deltaserve.server.frontends.grpc_api import status_for
from deltaserve.server.frontends.openai_http import BASE_ALIASES, OpenAIFrontDoor, OpenAIHttpError, _error_body
from deltaserve.server.model.loader import EMBEDDED_NAME
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
    # Route by adapter (Ray Serve multiplexing). False sends requests to any replica, the adapters still loaded
    # on demand there; it exists to measure what affinity is worth (benchmarks/ray_replicas.py).
    adapter_affinity: bool = True


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


# ---- one replica: one deltaserve engine ----------------------------------------------------------------
class _ResidentAdapter:
    """Ray Serve's multiplexed "model" for one adapter on one replica. Ray Serve's LRU calls `__del__` when it
    evicts the adapter (from an executor thread); the replica then unloads it once no request uses it."""

    def __init__(self, replica: "DeltaserveReplica", adapter_id: str) -> None:
        self.replica = replica
        self.adapter_id = adapter_id
        self.evicted = False

    def __del__(self) -> None:
        if self.evicted:
            return
        self.evicted = True
        with contextlib.suppress(RuntimeError):  # the replica's loop is gone: the process is ending anyway
            self.replica.loop.call_soon_threadsafe(self.replica.release, self.adapter_id)


@serve.deployment
class DeltaserveReplica:
    async def __init__(self, config: ClusterConfig, catalog: DeploymentHandle) -> None:
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        # The replica's own gRPC server listens on loopback only: the ingress reaches it through this replica, and
        # adapter administration goes through the catalog (the ingress checks the admin token).
        server_config = dataclasses.replace(
            config.server,
            host="127.0.0.1",
            port=0,
            http_port=None,
            metrics_port=None,
            preload=[],
            tls_cert=None,
            tls_key=None,
            admin_token=None,
        )
        self.server = await asyncio.to_thread(Server.create, server_config)
        await self.server.start()  # the engine, and this replica's own gRPC server on a loopback port
        self.loop = asyncio.get_running_loop()
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.server.port}",
            options=[("grpc.max_send_message_length", server_config.max_request_bytes)],
        )
        self.front = OpenAIFrontDoor(
            self.server.generation,
            self.server.adapters,
            model_name=self.server.loaded.name,
            max_request_bytes=server_config.max_request_bytes,
        )
        self.catalog = catalog
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.metrics_port = self._serve_metrics(config, context.rank.local_rank)
        self.versions: dict[str, int] = {}  # adapter id -> the catalog version loaded here
        self.in_use: Counter[str] = Counter()  # adapter id -> requests on this replica that use it now
        self.evicted: set[str] = set()  # dropped by Ray's LRU while in use: unloaded when its last request ends
        self.loads: Counter[str] = Counter()  # adapter id -> times this replica loaded it
        self.served: Counter[str] = Counter()  # adapter id -> requests this replica served for it

        async def _load_resident(adapter_id: str) -> _ResidentAdapter:
            return await self._load(adapter_id)

        self._resident = serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)(_load_resident)
        log.info("replica %s serving %s", self.replica_id, self.server.loaded.name)

    def _serve_metrics(self, config: ClusterConfig, local_rank: int) -> int | None:
        """Replicas on one node take consecutive ports from --metrics-port, by their rank on the node."""
        if config.server.metrics_port is None:
            return None
        port = config.server.metrics_port + local_rank
        try:
            self.server.metrics.serve(port, config.server.host)
        except OSError as err:
            log.warning("replica %s cannot serve its metrics on port %d: %s", self.replica_id, port, err)
            return None
        return port

    def check_health(self) -> None:
        """Ray Serve's periodic probe: a replica whose engine stopped is replaced."""
        if not self.server.engine.alive:
            raise RuntimeError("the deltaserve engine of this replica has stopped")

    # ---- adapters: loaded on demand, evicted by Ray Serve's LRU, never while a request uses them ----
    async def _load(self, adapter_id: str) -> _ResidentAdapter:
        """Ray Serve's multiplexed loader: the first request for an adapter here (or after its eviction)."""
        entry = await self.catalog.lookup.remote(adapter_id)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        self.evicted.discard(adapter_id)  # evicted but still in use: Ray Serve tracks it again, so it stays
        await self._load_version(adapter_id, *entry)
        return _ResidentAdapter(self, adapter_id)

    async def _load_version(self, adapter_id: str, path: str, version: int) -> None:
        if self.versions.get(adapter_id, 0) >= version:  # versions only grow: never step back to older weights
            return
        # A replaced adapter switches to the new weights; its running requests finish on the old ones.
        await self.server.adapters.load(adapter_id, path, replace=adapter_id in self.versions)
        self.versions[adapter_id] = version
        self.loads[adapter_id] += 1
        log.info("replica %s loaded adapter %r (version %d)", self.replica_id, adapter_id, version)

    async def _sync(self, adapter_id: str) -> None:
        """Make `adapter_id` resident here at the catalog's current version. Unknown ids are left for the server
        to refuse (NOT_FOUND / 404 model_not_found). Replace and unregister propagate through this check."""
        entry = await self.catalog.lookup.remote(adapter_id)
        if entry is None:  # never registered, or unregistered since it was loaded here
            self._unload(adapter_id)
            return
        await self._resident(adapter_id)  # Ray Serve's LRU bookkeeping; loads on a miss
        await self._load_version(adapter_id, *entry)  # a replaced adapter's new weights

    def release(self, adapter_id: str) -> None:
        """Ray Serve's LRU evicted the adapter: unload it now, or when its last request here ends."""
        if self.in_use[adapter_id]:
            self.evicted.add(adapter_id)
        else:
            self._unload(adapter_id)

    def _unload(self, adapter_id: str) -> None:
        self.evicted.discard(adapter_id)
        if self.versions.pop(adapter_id, None) is not None:
            with contextlib.suppress(AdapterNotFoundError):
                self.server.registry.unload(adapter_id)

    async def _sync_all(self, adapter_ids: list[str]) -> None:
        for adapter_id in adapter_ids:
            await self._sync(adapter_id)
            self.served[adapter_id] += 1

    @contextlib.contextmanager
    def _holding(self, adapter_ids: list[str]) -> Iterator[None]:
        """Marks the adapters in use for one request: Ray Serve evicting one meanwhile waits for the request to
        end, so a request never loses its adapter between being routed here and reaching the engine."""
        for adapter_id in adapter_ids:
            self.in_use[adapter_id] += 1
        try:
            yield
        finally:
            for adapter_id in adapter_ids:
                self.in_use[adapter_id] -= 1
                if not self.in_use[adapter_id]:
                    del self.in_use[adapter_id]
                    if adapter_id in self.evicted:
                        self._unload(adapter_id)

    # ---- requests ----
    async def forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, adapter_id: str
    ) -> AsyncIterator:
        """Serve one HTTP request for `adapter_id` ("" for the base) with this replica's OpenAI front door. Yields
        a head dict (status, headers) first, then the body in chunks (one for a JSON answer, one per event for a
        stream)."""
        adapters = [adapter_id] if adapter_id else []
        loads_before = self.loads[adapter_id]
        with self._holding(adapters):
            try:
                await self._sync_all(adapters)
            except Exception as err:  # e.g. the adapter's files no longer load
                status, error = _error_body(err, "prompt", "max_tokens")
                yield {"status": status, "headers": [(REPLICA_HEADER, self.replica_id)]}
                yield json.dumps({"error": error}).encode()
                return
            async for item in self._asgi(method, path, headers, body):
                if isinstance(item, dict) and adapter_id:
                    hit = "1" if self.loads[adapter_id] == loads_before else "0"  # found it resident here
                    item["headers"] += [(LOADS_HEADER, str(self.loads[adapter_id])), (HIT_HEADER, hit)]
                yield item

    async def grpc_unary(
        self, path: str, payload: bytes, metadata: list[tuple[str, Any]], adapters: list[str]
    ) -> tuple[str, str, bytes]:
        """Replay one unary call on this replica's own gRPC server: (status name, details, response bytes)."""
        with self._holding(adapters):
            try:
                await self._sync_all(adapters)
                response = await self.channel.unary_unary(path)(payload, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                return err.code().name, err.details() or "", b""
            except Exception as err:
                return (*_status_of(err), b"")
        return "OK", "", response

    async def grpc_stream(
        self, path: str, payload: bytes, metadata: list[tuple[str, Any]], adapters: list[str]
    ) -> AsyncIterator[bytes | tuple[str, str]]:
        """Replay one server-streaming call here: its messages' bytes, then (status name, details) if it failed."""
        call = None
        with self._holding(adapters):
            try:
                await self._sync_all(adapters)
                call = self.channel.unary_stream(path)(payload, metadata=metadata)
                async for message in call:
                    yield message
            except grpc.aio.AioRpcError as err:
                yield err.code().name, err.details() or ""
            except Exception as err:
                yield _status_of(err)
            finally:
                if call is not None:
                    call.cancel()  # ends the engine request too when the caller went away mid-stream

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


def _status_of(err: BaseException) -> tuple[str, str]:
    """(gRPC status name, details) for an error raised on the replica outside its gRPC server."""
    return status_for(err).name, str(err) or type(err).__name__


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
class Ingress(GrpcIngressMethods):
    """The application's entry: the OpenAI-compatible HTTP API (Ray Serve's HTTP proxy) and, when Serve's gRPC
    proxy is started with `ray_grpc.SERVICER_FUNCTIONS`, deltaserve's and TGIS's gRPC APIs (`GrpcIngressMethods`).
    """

    def __init__(
        self,
        replicas: DeploymentHandle,
        catalog: DeploymentHandle,
        model_name: str,
        admin_token: str | None,
        adapter_affinity: bool = True,
    ) -> None:
        self.replicas = replicas
        self.catalog = catalog
        self.model_name = model_name
        self._expected_auth = f"Bearer {admin_token}".encode() if admin_token else None
        self.adapter_affinity = adapter_affinity

    def _replica_for(self, adapter_id: str, stream: bool = False) -> DeploymentHandle:
        """The replicas' handle, routing to a replica that holds `adapter_id` where one does (Ray Serve
        multiplexing: the router prefers replicas that reported the id as loaded)."""
        if self.adapter_affinity and adapter_id:
            return self.replicas.options(stream=stream, multiplexed_model_id=adapter_id)
        return self.replicas.options(stream=stream)

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
        chunks = self._replica_for(adapter_id, stream=True).forward.remote(
            request.method, request.url.path, headers, body, adapter_id
        )
        try:
            head = await chunks.__anext__()
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as err:
            # The replica died (or none can take the request now): nothing was generated for the caller, who
            # may retry; Ray Serve restarts the replica and routes retries to live ones.
            log.warning("request failed on its replica: %s", type(err).__name__)
            actor = getattr(err, "actor_id", None)  # the lost replica's Ray actor, for the operator
            lost = f"{type(err).__name__}, actor {actor}" if actor else type(err).__name__
            return JSONResponse(
                {
                    "error": {
                        "message": f"the replica serving this request is unavailable ({lost}); retry",
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
            _, version = await self.catalog.register.remote(adapter_id, path, bool(body.get("load_inplace")))
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
