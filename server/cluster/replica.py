"""One replica: a full deltaserve server whose adapters are Ray Serve multiplexed models."""

import asyncio
import contextlib
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from deltaserve.server.app import Server
from deltaserve.server.cluster.config import ClusterConfig
from deltaserve.server.config import ServerConfig
from deltaserve.server.errors import AdapterNotFoundError
from deltaserve.server.frontends.openai.errors import error_body
from deltaserve.server.frontends.openai.server import OpenAIFrontDoor
from deltaserve.server.frontends.status import public_message, status_for
from deltaserve.server.kernels.threads import default_threads, one_thread_here
from ray import serve
from ray.serve.handle import DeploymentHandle

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-deltaserve-replica"
LOADS_HEADER = "x-deltaserve-adapter-loads"  # times the answering replica has loaded the request's adapter
HIT_HEADER = "x-deltaserve-adapter-hit"  # 1: the adapter was already resident on the answering replica


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


def _create_server(config: ServerConfig) -> Server:
    one_thread_here()
    return Server.create(config)


@serve.deployment
class DeltaserveReplica:
    async def __init__(self, config: ClusterConfig, catalog: DeploymentHandle) -> None:
        # The replica's own gRPC server listens on loopback only: the ingress reaches it through this replica, and
        # adapter administration goes through the catalog (the ingress checks the admin token). Its Adapters
        # service takes a random token nobody is given, so no other process on the node can load adapters there.
        # Its adapters come from the catalog on demand, so none are preloaded or read from --adapter-dir here.
        server_config = config.server.replace(
            host="127.0.0.1",
            port=0,
            http_port=None,
            metrics_port=None,
            preload=[],
            adapter_dir=[],
            tls_cert=None,
            tls_key=None,
            admin_token=secrets.token_urlsafe(32),
            # The engine computes with these; the model loads on a one-thread thread, as `deltaserve serve` does
            # (kernels/threads.py), so the replica process has a single OpenMP team.
            torch_threads=config.server.base.torch_threads or default_threads(),
        )
        self.server = await asyncio.to_thread(_create_server, server_config)
        await self.server.start()  # the engine, and this replica's own gRPC server on a loopback port
        self.loop = asyncio.get_running_loop()
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.server.port}",
            options=[("grpc.max_send_message_length", server_config.security.max_request_bytes)],
        )
        self.front = OpenAIFrontDoor(
            self.server.core,
            self.server.adapters,
            model_name=self.server.loaded.name,
            max_request_bytes=server_config.security.max_request_bytes,
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
        if config.server.doors.metrics_port is None:
            return None
        port = config.server.doors.metrics_port + local_rank
        try:
            self.server.metrics.serve(port, config.server.doors.host)
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
                status, error = error_body(err)
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
            "loopback_port": self.server.port,  # this replica's own gRPC server on 127.0.0.1
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
    return status_for(err).name, public_message(err)
