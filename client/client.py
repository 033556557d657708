"""Sync and asyncio clients for a deltaserve server.

Both clients share one base class and the module-level request builders below, so the two only differ in
how a call is awaited; every gRPC failure surfaces as DeltaserveError.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any, ClassVar, Self, TypedDict, Unpack

import grpc
import grpc.aio
from deltaserve.client.errors import DeltaserveError, from_rpc_error, translate_rpc_errors
from deltaserve.client.types import AdapterInfo, GenerateResult, ModelInfo, StreamChunk, TokenizeResult
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.client.v1 import deltaserve_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "localhost:50051"

ChatInput = Sequence[Mapping[str, str] | tuple[str, str]]
"""Chat messages as {"role": ..., "content": ...} dicts or (role, content) tuples."""

Metadata = Sequence[tuple[str, str]]

# Health codes that mean "not up yet, ask again"; anything else (e.g. UNAUTHENTICATED) will not heal.
_HEALTH_TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND}
)
_HEALTH_POLL_INTERVAL_S = 0.1
_HEALTH_ATTEMPT_MAX_S = 1.0
# Service name "" asks about the server as a whole.
_HEALTH_REQUEST = health_pb2.HealthCheckRequest(service="")


class GenerateOptions(TypedDict, total=False):
    """Keyword options of generate/generate_stream; see build_generate_request for their meaning."""

    messages: ChatInput | None
    adapter_id: str
    max_new_tokens: int | None
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float | None
    seed: int | None
    stop: Sequence[str] | None
    repetition_penalty: float | None
    logprobs: bool
    adapter_mix: Mapping[str, float] | Sequence[tuple[str, float]] | None
    mix_method: str
    mix_density: float | None
    mix_majority_sign_method: str
    adapter_stack: Sequence[str] | None
    prompt_token_ids: Sequence[int] | None
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[int, float] | None
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool
    allowed_token_ids: Sequence[int] | None
    top_logprobs: int
    prompt_logprobs: int | None
    n: int
    tenant: str
    priority: int
    json_schema: str | Mapping[str, Any] | None
    json_object: bool
    regex: str | None
    choice: Sequence[str] | None
    grammar: str | None


def to_chat_messages(messages: ChatInput) -> list[pb.ChatMessage]:
    """Normalise dicts and (role, content) tuples into ChatMessage protos, failing early on bad shapes."""
    out = []
    for item in messages:
        if isinstance(item, Mapping):
            if "role" not in item or "content" not in item:
                raise ValueError(f"chat message needs 'role' and 'content' keys, got {sorted(item)}")
            role, content = item["role"], item["content"]
        else:
            role, content = item
        out.append(pb.ChatMessage(role=role, content=content))
    return out


def _check_one_input(text: str | None, messages: ChatInput | None, text_name: str) -> None:
    """The server wants exactly one of text and messages; saying so here gives a clearer error."""
    if (text is None) == (messages is None):
        raise ValueError(f"give exactly one of {text_name} and messages")


def build_generate_request(
    prompt: str | None = None,
    *,
    messages: ChatInput | None = None,
    adapter_id: str = "",
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    repetition_penalty: float | None = None,
    logprobs: bool = False,
    adapter_mix: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    mix_method: str = "",
    adapter_stack: Sequence[str] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    min_p: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    allowed_token_ids: Sequence[int] | None = None,
    top_logprobs: int = 0,
    prompt_logprobs: int | None = None,
    n: int = 1,
    mix_density: float | None = None,
    mix_majority_sign_method: str = "",
    tenant: str = "",
    priority: int = 0,
    json_schema: str | Mapping[str, Any] | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
) -> pb.GenerateRequest:
    """Build a GenerateRequest; proto3 `optional` fields are set only when given, so None means
    "server default" (max_new_tokens: --default-max-new-tokens, top_p/repetition_penalty: off, seed: fresh).

    temperature 0 is greedy; top_k 0 disables top-k; a single stop string is accepted as well as a list.
    adapter_mix ({adapter_id: weight} or pairs) asks for a weighted mix of loaded LoRA adapters instead of
    adapter_id, combined by mix_method ("cat" by default, "linear", "ties", "dare_linear", "dare_ties",
    "magnitude_prune" or "svd") as PEFT's add_weighted_adapter does, with mix_density and
    mix_majority_sign_method as PEFT's density and majority_sign_method.
    adapter_stack (adapter ids of any kinds, in order) applies several adapters together, e.g. a prefix plus
    a LoRA; see the proto for the composition rule. prompt_token_ids replaces prompt and messages; the other
    sampling controls (min_p, penalties, logit_bias, stop/allowed token ids, top_logprobs, prompt_logprobs)
    and n (several sequences: the result's `sequences`, a stream chunk's `index`) are described in the proto.
    tenant names whose fair share the request counts against (empty: its adapter's); priority orders requests
    on a server run with --scheduling priority (higher first). At most one constraint (docs/structured.md):
    json_schema (a schema as a mapping or its JSON text), json_object, regex, choice (strings) or grammar (EBNF).
    """
    if prompt_token_ids is None:
        _check_one_input(prompt, messages, "prompt")
    request = pb.GenerateRequest(
        adapter_id=adapter_id,
        prompt=prompt or "",
        messages=to_chat_messages(messages or ()),
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_k=top_k,
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        logprobs=logprobs,
        adapter_mix=[
            pb.AdapterWeight(adapter_id=name, weight=weight)
            for name, weight in (adapter_mix.items() if isinstance(adapter_mix, Mapping) else adapter_mix or ())
        ],
        mix_method=mix_method,
        mix_majority_sign_method=mix_majority_sign_method,
        adapter_stack=list(adapter_stack or ()),
        prompt_token_ids=list(prompt_token_ids or ()),
        min_p=min_p,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=dict(logit_bias or {}),
        stop_token_ids=list(stop_token_ids or ()),
        ignore_eos=ignore_eos,
        allowed_token_ids=list(allowed_token_ids or ()),
        top_logprobs=top_logprobs,
        n=n,
        tenant=tenant,
        priority=priority,
    )
    optional = {
        "prompt_logprobs": prompt_logprobs,
        "max_new_tokens": max_new_tokens,
        "top_p": top_p,
        "seed": seed,
        "repetition_penalty": repetition_penalty,
        "mix_density": mix_density,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(request, name, value)
    _set_constraint(request, json_schema, json_object, regex, choice, grammar)
    return request


def _set_constraint(
    request: pb.GenerateRequest,
    json_schema: str | Mapping[str, Any] | None,
    json_object: bool,
    regex: str | None,
    choice: Sequence[str] | None,
    grammar: str | None,
) -> None:
    given = {
        "json_schema": json_schema,
        "json_object": json_object or None,
        "regex": regex,
        "choice": choice,
        "grammar": grammar,
    }
    chosen = [name for name, value in given.items() if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"give at most one constraint, got {' and '.join(chosen)}")
    if json_schema is not None:
        request.json_schema = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    elif json_object:
        request.json_object = True
    elif regex is not None:
        request.regex = regex
    elif choice is not None:
        request.choice.choices.extend(choice)
    elif grammar is not None:
        request.grammar = grammar


def build_tokenize_request(text: str | None = None, *, messages: ChatInput | None = None) -> pb.TokenizeRequest:
    """Build a TokenizeRequest for exactly one of a raw text and chat messages."""
    _check_one_input(text, messages, "text")
    return pb.TokenizeRequest(text=text or "", messages=to_chat_messages(messages or ()))


def _adapter_list(response: pb.ListAdaptersResponse) -> list[AdapterInfo]:
    return [AdapterInfo.from_proto(info) for info in response.adapters]


def _health_attempt_timeout(deadline: float) -> float:
    """One health probe waits for the channel at most a second, and never past the overall deadline."""
    return max(0.0, min(deadline - time.monotonic(), _HEALTH_ATTEMPT_MAX_S))


def _raise_unless_transient(err: grpc.RpcError) -> None:
    """A server that is still starting is expected while polling; any other failure is final."""
    error = from_rpc_error(err)
    if error.code not in _HEALTH_TRANSIENT_CODES:
        raise error from err


def _not_ready_error(target: str, timeout: float) -> DeltaserveError:
    return DeltaserveError(grpc.StatusCode.DEADLINE_EXCEEDED, f"server at {target} was not SERVING within {timeout:g}s")


class _ClientBase:
    """State shared by Client and AsyncClient: the channel, the stubs and per-call defaults.

    Subclasses pick the gRPC flavour (`grpc` or `grpc.aio`) through `_grpc_api`; the generated stubs
    work on either kind of channel.
    """

    _grpc_api: ClassVar[ModuleType]

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Open a channel to `target`: insecure, or TLS when channel_credentials are given.

        timeout is the default deadline in seconds for every call (None: no deadline); metadata is sent
        with every call, e.g. [("authorization", "Bearer <admin token>")].
        """
        self.target = target
        self._timeout = timeout
        self._metadata = tuple(metadata or ())
        if channel_credentials is None:
            self._channel = self._grpc_api.insecure_channel(target)
        else:
            self._channel = self._grpc_api.secure_channel(target, channel_credentials)
        self._generation = pb_grpc.GenerationStub(self._channel)
        self._adapters = pb_grpc.AdaptersStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call_options(self, timeout: float | None) -> dict[str, Any]:
        """Per-call keyword arguments: the call's own timeout wins over the client default."""
        return {"timeout": self._timeout if timeout is None else timeout, "metadata": self._metadata}

    def _health_options(self, deadline: float) -> dict[str, Any]:
        """wait_for_ready makes a probe wait for the connection instead of failing at once."""
        timeout = _health_attempt_timeout(deadline)
        return {"timeout": timeout, "metadata": self._metadata, "wait_for_ready": True}


class Client(_ClientBase):
    """Blocking client. Use as a context manager, or call close() when done."""

    _grpc_api = grpc

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> GenerateResult:
        """Run one request to completion (see build_generate_request for the options)."""
        request = build_generate_request(prompt, **options)
        with translate_rpc_errors():
            return GenerateResult.from_proto(self._generation.Generate(request, **self._call_options(timeout)))

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Iterator[StreamChunk]:
        """Stream the output chunk by chunk. The RPC starts on the first next(); leaving the loop early
        (break, exception, close()) cancels it so the server stops generating.
        """
        request = build_generate_request(prompt, **options)  # validate now, not on first next()
        return self._stream(request, timeout)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[StreamChunk]:
        call = self._generation.GenerateStream(request, **self._call_options(timeout))
        try:
            with translate_rpc_errors():
                for response in call:
                    yield StreamChunk.from_proto(response)
        finally:
            call.cancel()  # no-op once the stream has finished

    def tokenize(
        self, text: str | None = None, *, messages: ChatInput | None = None, timeout: float | None = None
    ) -> TokenizeResult:
        """Tokenize exactly as generate would treat the same prompt or messages."""
        request = build_tokenize_request(text, messages=messages)
        with translate_rpc_errors():
            return TokenizeResult.from_proto(self._generation.Tokenize(request, **self._call_options(timeout)))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describe the served base model and its limits."""
        with translate_rpc_errors():
            response = self._generation.ModelInfo(pb.ModelInfoRequest(), **self._call_options(timeout))
        return ModelInfo.from_proto(response)

    def load_adapter(
        self, adapter_id: str, path: str, *, replace: bool = False, pin: bool = False, timeout: float | None = None
    ) -> AdapterInfo:
        """Load a PEFT adapter directory; `path` is sent as given and resolved on the server's disk.
        `replace` switches an existing id to these weights; `pin` keeps the adapter on the device."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, path=path, replace=replace, pin=pin)
        with translate_rpc_errors():
            return AdapterInfo.from_proto(self._adapters.LoadAdapter(request, **self._call_options(timeout)))

    def merge_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        """Fold a LoRA adapter into the base weights (zero-overhead serving of it)."""
        request = pb.MergeAdapterRequest(adapter_id=adapter_id)
        with translate_rpc_errors():
            return AdapterInfo.from_proto(self._adapters.MergeAdapter(request, **self._call_options(timeout)))

    def unmerge_adapter(self, *, timeout: float | None = None) -> str:
        """Restore the base weights exactly; returns the adapter that was merged."""
        with translate_rpc_errors():
            response = self._adapters.UnmergeAdapter(pb.UnmergeAdapterRequest(), **self._call_options(timeout))
        return response.adapter_id

    def pin_adapter(self, adapter_id: str, pinned: bool = True, *, timeout: float | None = None) -> AdapterInfo:
        """Pin (keep on the device, never evict) or unpin an adapter."""
        request = pb.PinAdapterRequest(adapter_id=adapter_id, pinned=pinned)
        with translate_rpc_errors():
            return AdapterInfo.from_proto(self._adapters.PinAdapter(request, **self._call_options(timeout)))

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> int:
        """Unload an adapter; returns how many in-flight requests still finish with it before it is freed."""
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        with translate_rpc_errors():
            return self._adapters.UnloadAdapter(request, **self._call_options(timeout)).draining_requests

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        """Every adapter the server knows, in the server's order."""
        with translate_rpc_errors():
            response = self._adapters.ListAdapters(pb.ListAdaptersRequest(), **self._call_options(timeout))
        return _adapter_list(response)

    def wait_ready(self, timeout: float) -> None:
        """Poll the standard gRPC health service until the server reports SERVING.

        Raises DeltaserveError(DEADLINE_EXCEEDED) after `timeout` seconds, or at once on a non-transient
        error such as UNAUTHENTICATED.
        """
        deadline = time.monotonic() + timeout
        while not self._is_serving(deadline):
            if time.monotonic() >= deadline:
                raise _not_ready_error(self.target, timeout)
            time.sleep(_HEALTH_POLL_INTERVAL_S)

    def _is_serving(self, deadline: float) -> bool:
        try:
            response = self._health.Check(_HEALTH_REQUEST, **self._health_options(deadline))
        except grpc.RpcError as err:
            _raise_unless_transient(err)
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        """Close the channel; calls still in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """asyncio client with the same methods as Client, awaited. Use `async with` or `await close()`."""

    _grpc_api = grpc.aio

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> GenerateResult:
        """Async form of Client.generate."""
        request = build_generate_request(prompt, **options)
        with translate_rpc_errors():
            response = await self._generation.Generate(request, **self._call_options(timeout))
        return GenerateResult.from_proto(response)

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncIterator[StreamChunk]:
        """Async form of Client.generate_stream. Leaving `async for` early cancels the RPC once the
        iterator is closed; wrap it in contextlib.aclosing() to make that immediate.
        """
        request = build_generate_request(prompt, **options)  # validate now, not on first anext()
        return self._stream(request, timeout)

    async def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> AsyncIterator[StreamChunk]:
        call = self._generation.GenerateStream(request, **self._call_options(timeout))
        try:
            with translate_rpc_errors():
                async for response in call:
                    yield StreamChunk.from_proto(response)
        finally:
            call.cancel()  # no-op once the stream has finished

    async def tokenize(
        self, text: str | None = None, *, messages: ChatInput | None = None, timeout: float | None = None
    ) -> TokenizeResult:
        """Async form of Client.tokenize."""
        request = build_tokenize_request(text, messages=messages)
        with translate_rpc_errors():
            response = await self._generation.Tokenize(request, **self._call_options(timeout))
        return TokenizeResult.from_proto(response)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Async form of Client.model_info."""
        with translate_rpc_errors():
            return ModelInfo.from_proto(
                await self._generation.ModelInfo(pb.ModelInfoRequest(), **self._call_options(timeout))
            )

    async def load_adapter(
        self, adapter_id: str, path: str, *, replace: bool = False, pin: bool = False, timeout: float | None = None
    ) -> AdapterInfo:
        """Async form of Client.load_adapter."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, path=path, replace=replace, pin=pin)
        with translate_rpc_errors():
            response = await self._adapters.LoadAdapter(request, **self._call_options(timeout))
        return AdapterInfo.from_proto(response)

    async def merge_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        """Async form of Client.merge_adapter."""
        request = pb.MergeAdapterRequest(adapter_id=adapter_id)
        with translate_rpc_errors():
            response = await self._adapters.MergeAdapter(request, **self._call_options(timeout))
        return AdapterInfo.from_proto(response)

    async def unmerge_adapter(self, *, timeout: float | None = None) -> str:
        """Async form of Client.unmerge_adapter."""
        with translate_rpc_errors():
            response = await self._adapters.UnmergeAdapter(pb.UnmergeAdapterRequest(), **self._call_options(timeout))
        return response.adapter_id

    async def pin_adapter(self, adapter_id: str, pinned: bool = True, *, timeout: float | None = None) -> AdapterInfo:
        """Async form of Client.pin_adapter."""
        request = pb.PinAdapterRequest(adapter_id=adapter_id, pinned=pinned)
        with translate_rpc_errors():
            response = await self._adapters.PinAdapter(request, **self._call_options(timeout))
        return AdapterInfo.from_proto(response)

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> int:
        """Async form of Client.unload_adapter."""
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        with translate_rpc_errors():
            response = await self._adapters.UnloadAdapter(request, **self._call_options(timeout))
        return response.draining_requests

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        """Async form of Client.list_adapters."""
        with translate_rpc_errors():
            return _adapter_list(
                await self._adapters.ListAdapters(pb.ListAdaptersRequest(), **self._call_options(timeout))
            )

    async def wait_ready(self, timeout: float) -> None:
        """Async form of Client.wait_ready."""
        deadline = time.monotonic() + timeout
        while not await self._is_serving(deadline):
            if time.monotonic() >= deadline:
                raise _not_ready_error(self.target, timeout)
            await asyncio.sleep(_HEALTH_POLL_INTERVAL_S)

    async def _is_serving(self, deadline: float) -> bool:
        try:
            response = await self._health.Check(_HEALTH_REQUEST, **self._health_options(deadline))
        except grpc.RpcError as err:
            _raise_unless_transient(err)
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        """Close the channel; calls still in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
