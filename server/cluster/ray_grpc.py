"""The deltaserve gRPC API (and TGIS's) through Ray Serve's gRPC proxy.

Ray Serve's proxy, started with `grpc_servicer_functions=SERVICER_FUNCTIONS`, decodes each call with deltaserve's
generated stubs and calls the ingress deployment's method of the same name with the request and a
`RayServegRPCContext`. `GrpcIngressMethods` are those methods:

- Generation calls are routed by the adapter the request body names (`adapter_id`, else the first member of a
  mix or stack; TGIS's `adapter_id` or `prefix_id`), passed to Ray Serve as the multiplexed model id. An
  unmodified deltaserve or TGIS client therefore gets adapter-affine routing without any Ray metadata.
- The chosen replica replays the call's bytes on its own loopback deltaserve gRPC server
  (`DeltaserveReplica.grpc_unary/grpc_stream`), so validation, status codes and messages are the single server's.
- The Adapters service is answered from the shared catalog; health from the ingress itself.

Ray routes by method name alone, and deltaserve.v1.Generation and fmaas.GenerationService share theirs (Generate,
GenerateStream, Tokenize, ModelInfo): each method looks at the request's type to know which service was called.
"""

import functools
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from deltaserve.client.fmaas import generation_pb2 as tgis_pb
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.server.errors import UnauthenticatedError
from deltaserve.server.frontends.auth import GRPC_ADMIN_NEEDS, grpc_authorization
from deltaserve.server.frontends.core import AdapterRef
from deltaserve.server.frontends.status import public_message, status_for
from google.protobuf import empty_pb2, message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext

SERVICER_FUNCTIONS = [
    "deltaserve.client.v1.deltaserve_pb2_grpc.add_GenerationServicer_to_server",
    "deltaserve.client.v1.deltaserve_pb2_grpc.add_AdaptersServicer_to_server",
    "deltaserve.client.fmaas.generation_pb2_grpc.add_GenerationServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]

# Generation requests by proto file: which service a request of that file was sent to.
_GENERATION_SERVICES = {
    pb.DESCRIPTOR.name: pb.DESCRIPTOR.services_by_name["Generation"],
    tgis_pb.DESCRIPTOR.name: tgis_pb.DESCRIPTOR.services_by_name["GenerationService"],
}
_SERVED_SERVICES = (
    "",
    *(service.full_name for service in _GENERATION_SERVICES.values()),
    pb.DESCRIPTOR.services_by_name["Adapters"].full_name,
)
# Invocation metadata that is Ray's routing or the transport's own, not the caller's: not replayed on the replica.
_NOT_FORWARDED = {"application", "multiplexed_model_id", "request_id", "session_id", "user-agent"}
_LOST = (RayActorError, BackPressureError, DeploymentUnavailableError)


class GrpcStatus(Exception):
    """Ends a call with the status already set on its RayServegRPCContext (Ray's proxy sends that status)."""


def unary(method: Callable) -> Callable:
    """A unary method whose refusals return rather than raise: Ray's proxy sends the status set on the context
    either way, and a returned refusal is not logged with a traceback as a failed request in two processes.
    The empty body that goes with it is never read by the caller."""

    @functools.wraps(method)
    async def wrapper(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        try:
            return await method(self, request, grpc_context)
        except GrpcStatus:
            return empty_pb2.Empty()

    return wrapper


def _fail(context: RayServegRPCContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.set_code(code)
    context.set_details(details)
    raise GrpcStatus(details)


def _fail_with(context: RayServegRPCContext, err: BaseException) -> NoReturn:
    if isinstance(err, _LOST):
        _fail(
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"the replica serving this call is unavailable ({type(err).__name__}); retry",
        )
    _fail(context, status_for(err), public_message(err))


def generation_method(request: Message, name: str) -> tuple[str, type[Message]]:
    """The full method path that a Generation-family request was sent to, and that method's response class."""
    service = _GENERATION_SERVICES[request.DESCRIPTOR.file.name]
    return f"/{service.full_name}/{name}", message_factory.GetMessageClass(service.methods_by_name[name].output_type)


def adapters_of(request: Message) -> list[str]:
    """The adapters a generation request uses, routing key first (empty for the base model)."""
    if isinstance(request, pb.GenerateRequest):
        mix = tuple((part.adapter_id, part.weight) for part in request.adapter_mix)
        return AdapterRef(request.adapter_id, tuple(request.adapter_stack), mix).routing_ids
    if isinstance(request, (tgis_pb.BatchedGenerationRequest, tgis_pb.SingleGenerationRequest)):
        # A conflicting adapter_id / prefix_id pair is refused by the replica's TGIS service.
        adapter = request.adapter_id or request.prefix_id
        return [adapter] if adapter else []
    return []


def forwarded_metadata(context: RayServegRPCContext) -> list[tuple[str, Any]]:
    """The caller's metadata to replay on the replica (x-request-id and the like)."""
    return [
        (key, value)
        for key, value in context.invocation_metadata()
        if key not in _NOT_FORWARDED and not key.startswith((":", "grpc-"))
    ]


class GrpcIngressMethods:
    """The gRPC half of the ingress deployment. The class that mixes it in provides `_replica_for(adapter_id,
    stream)` (the replicas' handle, routed by adapter), `catalog` (a deployment handle) and `token` (the
    server's `BearerToken`)."""

    # ---- deltaserve.v1.Generation and fmaas.GenerationService ----
    @unary
    async def Generate(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        return await self._unary(request, "Generate", grpc_context)

    async def GenerateStream(self, request: Message, grpc_context: RayServegRPCContext) -> AsyncIterator[Message]:
        path, response_type = generation_method(request, "GenerateStream")
        adapters = adapters_of(request)
        handle = self._replica_for(adapters[0] if adapters else "", stream=True)
        items = handle.grpc_stream.remote(path, request.SerializeToString(), forwarded_metadata(grpc_context), adapters)
        try:
            async for item in items:
                if isinstance(item, tuple):  # the call failed on the replica: (status name, details)
                    _fail(grpc_context, grpc.StatusCode[item[0]], item[1])
                yield response_type.FromString(item)
        except _LOST as err:
            _fail_with(grpc_context, err)

    @unary
    async def Tokenize(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        return await self._unary(request, "Tokenize", grpc_context)

    @unary
    async def ModelInfo(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        return await self._unary(request, "ModelInfo", grpc_context)

    async def _unary(self, request: Message, name: str, grpc_context: RayServegRPCContext) -> Message:
        path, response_type = generation_method(request, name)
        adapters = adapters_of(request)
        handle = self._replica_for(adapters[0] if adapters else "")
        try:
            status, details, payload = await handle.grpc_unary.remote(
                path, request.SerializeToString(), forwarded_metadata(grpc_context), adapters
            )
        except _LOST as err:
            _fail_with(grpc_context, err)
        if status != "OK":
            _fail(grpc_context, grpc.StatusCode[status], details)
        return response_type.FromString(payload)

    # ---- deltaserve.v1.Adapters: the shared catalog ----
    def _check_admin_metadata(self, grpc_context: RayServegRPCContext) -> None:
        try:
            self.token.check(grpc_authorization(grpc_context.invocation_metadata()), GRPC_ADMIN_NEEDS)
        except UnauthenticatedError as err:
            _fail_with(grpc_context, err)

    @unary
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, grpc_context: RayServegRPCContext) -> pb.AdapterInfo:
        self._check_admin_metadata(grpc_context)
        if request.pin:
            _fail(
                grpc_context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "pin is not offered on a Ray Serve cluster: each replica loads and evicts adapters on demand",
            )
        try:
            path, _ = await self.catalog.register.remote(request.adapter_id, request.path, request.replace)
        except Exception as err:
            _fail_with(grpc_context, err)
        return pb.AdapterInfo(adapter_id=request.adapter_id, path=path, state=pb.ADAPTER_STATE_DISK)

    @unary
    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, grpc_context: RayServegRPCContext
    ) -> pb.UnloadAdapterResponse:
        self._check_admin_metadata(grpc_context)
        try:
            await self.catalog.unregister.remote(request.adapter_id)
        except Exception as err:
            _fail_with(grpc_context, err)
        return pb.UnloadAdapterResponse(adapter_id=request.adapter_id)

    @unary
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, grpc_context: RayServegRPCContext
    ) -> pb.ListAdaptersResponse:
        self._check_admin_metadata(grpc_context)
        entries = await self.catalog.entries_list.remote()
        return pb.ListAdaptersResponse(
            adapters=[pb.AdapterInfo(adapter_id=i, path=path, state=pb.ADAPTER_STATE_DISK) for i, path in entries]
        )

    @unary
    async def PinAdapter(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        self._per_replica(grpc_context, "PinAdapter")

    @unary
    async def MergeAdapter(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        self._per_replica(grpc_context, "MergeAdapter")

    @unary
    async def UnmergeAdapter(self, request: Message, grpc_context: RayServegRPCContext) -> Message:
        self._per_replica(grpc_context, "UnmergeAdapter")

    def _per_replica(self, grpc_context: RayServegRPCContext, name: str) -> NoReturn:
        self._check_admin_metadata(grpc_context)
        _fail(
            grpc_context,
            grpc.StatusCode.UNIMPLEMENTED,
            f"{name} acts on one server's device and is not offered on a Ray Serve cluster; "
            "run `deltaserve serve` for single-task merged serving",
        )

    # ---- grpc.health.v1.Health ----
    @unary
    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in _SERVED_SERVICES:
            _fail(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        # This says the application's ingress answers; each replica's engine health is Ray Serve's to check.
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: Message, grpc_context: RayServegRPCContext) -> AsyncIterator[Message]:
        _fail(grpc_context, grpc.StatusCode.UNIMPLEMENTED, "Health.Watch is not offered through Ray Serve; use Check")
        yield  # pragma: no cover - makes this an async generator, as a streaming method must be
