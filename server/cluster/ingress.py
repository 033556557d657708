"""The application's entry: the OpenAI-compatible HTTP API and, through Ray Serve's gRPC proxy, the gRPC APIs."""

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from deltaserve.server.cluster.ray_grpc import GrpcIngressMethods
from deltaserve.server.errors import InvalidRequestError
from deltaserve.server.frontends.auth import HTTP_ADMIN_NEEDS, BearerToken
from deltaserve.server.frontends.core import adapter_for_model
from deltaserve.server.frontends.openai.errors import OpenAIHttpError, error_json
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

log = logging.getLogger(__name__)


async def _after_head(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body chunks; a replica lost once the head was sent ends the body early (an event stream then lacks
    its `data: [DONE]`, which is how a streaming client sees it)."""
    try:
        async for chunk in chunks:
            yield chunk
    except RayActorError as err:
        log.warning("replica lost in the middle of a response: %s", type(err).__name__)


class BodyTooLargeError(OpenAIHttpError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the server's {limit} bytes (--max-request-bytes)")


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
        max_request_bytes: int = 4 << 20,
    ) -> None:
        self.replicas = replicas
        self.catalog = catalog
        self.model_name = model_name
        self.token = BearerToken(admin_token)
        self.adapter_affinity = adapter_affinity
        self.max_request_bytes = max_request_bytes

    def _replica_for(self, adapter_id: str, stream: bool = False) -> DeploymentHandle:
        """The replicas' handle, routing to a replica that holds `adapter_id` where one does (Ray Serve
        multiplexing: the router prefers replicas that reported the id as loaded)."""
        if self.adapter_affinity and adapter_id:
            return self.replicas.options(stream=stream, multiplexed_model_id=adapter_id)
        return self.replicas.options(stream=stream)

    def _check_admin(self, request: HttpRequest) -> None:
        """Registering and unregistering adapters need the admin token, as on a single server."""
        self.token.check(request.headers.get("authorization"), HTTP_ADMIN_NEEDS)

    async def _body(self, request: HttpRequest) -> bytes:
        """The request body, read in chunks and refused (413) past --max-request-bytes, as a single server does."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_request_bytes:
                raise BodyTooLargeError(self.max_request_bytes)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _json(self, request: HttpRequest) -> Any:
        try:
            return json.loads(await self._body(request))
        except (ValueError, RecursionError):
            raise InvalidRequestError("the request body is not valid JSON") from None

    async def _forward(self, request: HttpRequest) -> Response:
        try:
            body = await self._body(request)
        except BodyTooLargeError as err:
            return error_json(err)
        try:
            model = json.loads(body).get("model") or ""
        except (ValueError, AttributeError):
            model = ""  # the replica's front door answers the malformed body
        adapter_id = adapter_for_model(model, self.model_name)
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
            body = await self._json(request)
            adapter_id, path = body["lora_name"], body["lora_path"]
            _, version = await self.catalog.register.remote(adapter_id, path, bool(body.get("load_inplace")))
        except Exception as err:
            return error_json(err)
        return JSONResponse({"id": adapter_id, "object": "model", "parent": self.model_name, "version": version})

    @ingress_app.post("/v1/unload_lora_adapter")
    async def unload_adapter(self, request: HttpRequest) -> JSONResponse:
        try:
            self._check_admin(request)
            adapter_id = (await self._json(request))["lora_name"]
            await self.catalog.unregister.remote(adapter_id)
        except Exception as err:
            return error_json(err)
        return JSONResponse({"id": adapter_id, "object": "model", "deleted": True})
