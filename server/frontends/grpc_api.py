"""The gRPC API: validates requests, hands them to the engine, streams results back.

Servicer methods never run model code; they build an engine `Request`, submit it and await its outputs
through an asyncio queue fed from the engine thread. Every core exception is mapped to a gRPC status in
one place, `_STATUS_FOR`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from deltaserve.adapters import (
    AdapterAccessError,
    AdapterFormatError,
    AdapterLimitError,
    AdapterMismatchError,
    ParsedAdapter,
    UnsupportedAdapterError,
    compose,
)
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.client.v1 import deltaserve_pb2_grpc as pb_grpc
from deltaserve.server.engine.engine import Engine
from deltaserve.server.engine.merge import MergeController
from deltaserve.server.engine.request import FinishReason, Request, RequestOutput
from deltaserve.server.engine.sampling import SamplingParams
from deltaserve.server.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterUnreadableError,
    CapacityError,
    EngineFailedError,
    EngineStoppedError,
    InvalidRequestError,
    MergeError,
    NonFiniteOutputError,
    PermissionDeniedError,
)
from deltaserve.server.metrics import Metrics
from deltaserve.server.residency.mixes import MixSpec, combine, mix_spec
from deltaserve.server.residency.registry import AdapterRecord, AdapterState
from jinja2 import TemplateError

log = logging.getLogger(__name__)

_STATUS_FOR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AdapterExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (UnsupportedAdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (MergeError, grpc.StatusCode.FAILED_PRECONDITION),
    (NonFiniteOutputError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterUnreadableError, grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AdapterLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (AdapterAccessError, grpc.StatusCode.PERMISSION_DENIED),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (EngineFailedError, grpc.StatusCode.UNAVAILABLE),
)

_FINISH_TO_PROTO = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
}
_STATE_TO_PROTO = {
    AdapterState.LOADING: pb.ADAPTER_STATE_LOADING,
    AdapterState.DISK: pb.ADAPTER_STATE_DISK,
    AdapterState.HOST: pb.ADAPTER_STATE_HOST,
    AdapterState.DEVICE: pb.ADAPTER_STATE_DEVICE,
    AdapterState.UNLOADING: pb.ADAPTER_STATE_UNLOADING,
}


def status_for(err: BaseException) -> grpc.StatusCode:
    for error_type, code in _STATUS_FOR:
        if isinstance(err, error_type):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, err: BaseException) -> None:
    code = status_for(err)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=err)
    await context.abort(code, str(err) or type(err).__name__)


def _unary_errors(method: Callable) -> Callable:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as err:
            await _abort(context, err)

    return wrapper


def _stream_errors(method: Callable) -> Callable:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as err:
            await _abort(context, err)

    return wrapper


# ---- request preparation --------------------------------------------------------------------------
class RequestBuilder:
    """Turns a GenerateRequest into prompt token ids and SamplingParams, or InvalidRequestError."""

    def __init__(self, tokenizer: Any, max_seq_len: int, default_max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.default_max_new_tokens = default_max_new_tokens

    def prompt_ids(self, text: str, messages: Any, text_field: str) -> list[int]:
        if bool(text) == bool(messages):
            raise InvalidRequestError(f"give exactly one of {text_field} and messages (both empty or both set)")
        if text:
            return list(self.tokenizer(text)["input_ids"])
        for i, message in enumerate(messages):
            if not message.role:
                raise InvalidRequestError(f"messages[{i}].role is empty")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequestError("this model has no chat template; send a prompt instead of messages")
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            rendered = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # e.g. a template's raise_exception("roles must alternate user/assistant")
            raise InvalidRequestError(f"the model's chat template refuses these messages: {err}") from err
        # The template already holds any special tokens (BOS), so it is not tokenized with them again.
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def build(self, request: pb.GenerateRequest, extra_positions: int = 0) -> tuple[list[int], SamplingParams]:
        """Token ids and sampling parameters; `extra_positions` are the adapter's prefix entries and virtual
        tokens, which take context positions before the prompt."""
        ids = self.prompt_ids(request.prompt, request.messages, "prompt")
        return self.build_from_ids(ids, request, extra_positions)

    def build_from_ids(
        self, ids: list[int], request: pb.GenerateRequest, extra_positions: int = 0
    ) -> tuple[list[int], SamplingParams]:
        """`build` for a prompt already tokenized (a front door that truncates it, as TGIS does); the
        request's prompt and messages are not read."""
        if not ids:
            raise InvalidRequestError("the prompt tokenizes to no tokens")
        used = len(ids) + extra_positions
        if used >= self.max_seq_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens{_with_extra(extra_positions)}; the context holds "
                f"{self.max_seq_len} (prompt plus output)"
            )
        return ids, self._params(request, used, extra_positions)

    def _params(self, request: pb.GenerateRequest, used: int, extra_positions: int) -> SamplingParams:
        room = self.max_seq_len - used
        if request.HasField("max_new_tokens"):
            max_new = request.max_new_tokens
            if max_new <= 0:
                raise InvalidRequestError(f"max_new_tokens must be at least 1, got {max_new}")
            if max_new > room:
                raise InvalidRequestError(
                    f"max_new_tokens {max_new} does not fit the context: {used - extra_positions} prompt tokens"
                    f"{_with_extra(extra_positions)} + {max_new} > {self.max_seq_len}"
                )
        else:
            max_new = min(self.default_max_new_tokens, room)
        _check(request.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {request.min_new_tokens}")
        _check(request.temperature >= 0, f"temperature must be >= 0, got {request.temperature}")
        # float32 on the wire: 1e-4 arrives a hair below 1e-4, hence the tolerance.
        temperature_ok = request.temperature == 0 or MIN_TEMPERATURE * (1 - 1e-6) <= request.temperature < math.inf
        _check(
            temperature_ok,
            f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {request.temperature}",
        )
        _check(request.top_k >= 0, f"top_k must be >= 0, got {request.top_k}")
        top_p = request.top_p if request.HasField("top_p") else 1.0
        _check(0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}")
        penalty = request.repetition_penalty if request.HasField("repetition_penalty") else 1.0
        _check(0 < penalty < math.inf, f"repetition_penalty must be a finite number > 0, got {penalty}")
        _check(all(request.stop), "stop strings must not be empty")
        return SamplingParams(
            max_new_tokens=max_new,
            min_new_tokens=request.min_new_tokens,
            temperature=float(request.temperature),
            top_k=request.top_k,
            top_p=float(top_p),
            seed=request.seed if request.HasField("seed") else None,
            stop=tuple(request.stop),
            repetition_penalty=float(penalty),
            logprobs=request.logprobs,
        )


# Smaller positive temperatures (or an infinite one) can turn logits / temperature into inf or NaN, which would
# fail the sampling step of every request in the batch, not only this one.
MIN_TEMPERATURE = 1e-4


def _with_extra(extra_positions: int) -> str:
    return f" plus {extra_positions} prefix/virtual tokens of its adapter" if extra_positions else ""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def clean_request_id(given: str | None) -> str:
    """`given` (a caller's x-request-id, gRPC metadata or HTTP header) when it is a sane token, else a fresh id."""
    if isinstance(given, str) and _REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id` metadata when it is a sane token, else a fresh id (logged and returned)."""
    given = [value for key, value in context.invocation_metadata() or () if key == "x-request-id"]
    return clean_request_id(given[0] if given else None)


def _response(output: RequestOutput, request: Request) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=output.text,
        token_ids=output.token_ids,
        logprobs=output.logprobs,
        finish_reason=_FINISH_TO_PROTO[output.finish_reason],
        prompt_tokens=len(request.prompt_ids),
        generated_tokens=output.generated_tokens,
        adapter_id=request.adapter_id,
        request_id=request.request_id,
        stop_sequence=output.stop_sequence or "",
    )


# ---- services -------------------------------------------------------------------------------------
class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, engine: Engine, builder: RequestBuilder, model_info: Callable[[], pb.ModelInfoResponse]) -> None:
        self.engine = engine
        self.builder = builder
        self.model_info = model_info

    async def run(
        self,
        request: pb.GenerateRequest,
        request_id: str,
        build: Callable[[int], tuple[list[int], SamplingParams]] | None = None,
    ) -> AsyncIterator[tuple[RequestOutput, Request]]:
        """Submit one request and yield its outputs; leaving early (cancel, deadline) cancels it. Every front
        door (gRPC here, the OpenAI HTTP one in openai_http.py, the TGIS one in tgis.py) generates through
        this. `build(extra_positions)` replaces `self.builder.build(request, extra_positions)` for a front
        door that prepares the prompt ids itself; the adapter is still taken from `request`."""
        adapter = await self._acquire_adapter(request)
        extra_positions = adapter.extra_positions if adapter is not None else 0
        try:
            if build is None:
                prompt_ids, params = self.builder.build(request, extra_positions)
            else:
                prompt_ids, params = build(extra_positions)
        except BaseException:
            if adapter is not None:
                self.engine.registry.release(adapter, served=False)
            raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, output)

        engine_request = Request(request_id, prompt_ids, params, adapter, sink)
        try:
            self.engine.submit(engine_request)
        except BaseException:
            if adapter is not None:
                self.engine.registry.release(adapter, served=False)
            raise
        finished = False
        try:
            while not finished:
                output = await queue.get()
                if output.error is not None:
                    raise output.error
                finished = output.finished
                yield output, engine_request
        finally:
            if not finished:
                engine_request.cancel()
                self.engine.wake()

    async def _acquire_adapter(self, request: pb.GenerateRequest) -> AdapterRecord | None:
        chosen = [name for name, given in _ADAPTER_FIELDS.items() if given(request)]
        if len(chosen) > 1:
            raise InvalidRequestError(
                f"give one of adapter_id, adapter_mix and adapter_stack, not {' and '.join(chosen)}"
            )
        if request.mix_method and not request.adapter_mix:
            raise InvalidRequestError("mix_method needs adapter_mix")
        if request.adapter_mix:
            spec = mix_spec(request.mix_method, [(part.adapter_id, part.weight) for part in request.adapter_mix])
            return await asyncio.to_thread(self._acquire_derived, spec.mix_id, spec.components, spec)
        if request.adapter_stack:
            names = stack_members(list(request.adapter_stack))
            return await asyncio.to_thread(self._acquire_derived, "stack|" + "|".join(names), names, None)
        return self.engine.registry.acquire(request.adapter_id) if request.adapter_id else None

    def _acquire_derived(self, derived_id: str, members: tuple[str, ...], mix: MixSpec | None) -> AdapterRecord:
        """The cached mix or stack, or build it from the members' host copies and register it."""
        registry = self.engine.registry
        try:
            return registry.acquire(derived_id)
        except AdapterNotFoundError:
            pass

        def build(adapters: list[ParsedAdapter]) -> ParsedAdapter:
            if mix is None:
                return compose(derived_id, list(members), adapters)
            for adapter_id, adapter in zip(members, adapters, strict=True):
                if not adapter.is_plain_lora:
                    raise MergeError(
                        f"adapter {adapter_id!r} ({adapter.kind.value}) cannot be mixed; only plain LoRA can "
                        "(use adapter_stack to apply adapters of other kinds together)"
                    )
            return combine(mix, adapters)

        registry.derive(derived_id, members, build)
        return registry.acquire(derived_id)

    @_unary_errors
    async def Generate(self, request, context):
        text, token_ids, logprobs = [], [], []
        last = owner = None
        async for output, engine_request in self.run(request, request_id(context)):
            owner = engine_request
            text.append(output.text)
            token_ids.extend(output.token_ids)
            logprobs.extend(output.logprobs)
            last = output
        combined = RequestOutput(
            token_ids, "".join(text), logprobs, last.generated_tokens, last.finish_reason, last.stop_sequence
        )
        return _response(combined, owner)

    @_stream_errors
    async def GenerateStream(self, request, context):
        async for output, engine_request in self.run(request, request_id(context)):
            if output.token_ids or output.finished:
                yield _response(output, engine_request)

    @_unary_errors
    async def Tokenize(self, request, context):
        ids = self.builder.prompt_ids(request.text, request.messages, "text")
        return pb.TokenizeResponse(token_ids=ids, tokens=self.builder.tokenizer.convert_ids_to_tokens(ids))

    @_unary_errors
    async def ModelInfo(self, request, context):
        return self.model_info()


_ADAPTER_FIELDS: dict[str, Callable[[pb.GenerateRequest], bool]] = {
    "adapter_id": lambda request: bool(request.adapter_id),
    "adapter_mix": lambda request: bool(request.adapter_mix),
    "adapter_stack": lambda request: bool(request.adapter_stack),
}


def stack_members(names: list[str]) -> tuple[str, ...]:
    if any(not name for name in names):
        raise InvalidRequestError("adapter_stack names an empty adapter_id")
    if len(set(names)) != len(names):
        raise InvalidRequestError("adapter_stack names an adapter twice")
    return tuple(names)


_LOAD_RESULT = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.FAILED_PRECONDITION: "unsupported",
    grpc.StatusCode.ALREADY_EXISTS: "exists",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "capacity",
    grpc.StatusCode.PERMISSION_DENIED: "denied",
}


def _declared_kind(err: BaseException) -> str:
    """The kind a failed load's config declared, for the metrics label ("unknown" if it was not read)."""
    kind = getattr(err, "declared_kind", None)
    return "unknown" if kind is None else kind.value


def adapter_info(record: AdapterRecord) -> pb.AdapterInfo:
    state = _STATE_TO_PROTO[record.state]
    if record.merged:
        state = pb.ADAPTER_STATE_MERGED
    elif record.pinned and record.state is AdapterState.DEVICE:
        state = pb.ADAPTER_STATE_PINNED
    return pb.AdapterInfo(
        adapter_id=record.adapter_id,
        kind=record.kind,
        rank=record.rank,
        size_bytes=record.size_bytes,
        state=state,
        path=record.path,
        target_modules=record.target_modules,
        requests_served=record.requests_served,
        active_requests=record.active_requests,
        pinned=record.pinned,
        last_used_unix=record.last_used,
        virtual_tokens=record.extra_positions,
        mergeable=record.mergeable,
    )


class AdaptersService(pb_grpc.AdaptersServicer):
    def __init__(self, engine: Engine, metrics: Metrics, merges: MergeController) -> None:
        self.registry = engine.registry
        self.metrics = metrics
        self.merges = merges

    @_unary_errors
    async def LoadAdapter(self, request, context):
        return adapter_info(await self.load(request.adapter_id, request.path, replace=request.replace, pin=request.pin))

    async def load(self, adapter_id: str, path: str, *, replace: bool = False, pin: bool = False) -> AdapterRecord:
        """Validate and register an adapter, with its metrics and log line (gRPC LoadAdapter and the HTTP
        load endpoint both come here)."""
        # Parsing and copying weights blocks: it runs on a worker thread, never on the event loop.
        started = time.monotonic()
        try:
            record = await asyncio.to_thread(self.registry.load, adapter_id, path, replace=replace, pin=pin)
        except Exception as err:
            self.metrics.observe_load(
                _declared_kind(err), _LOAD_RESULT.get(status_for(err), "error"), time.monotonic() - started
            )
            raise
        self.metrics.observe_load(record.kind, "ok", time.monotonic() - started)
        log.info(
            "loaded adapter %r (%s, rank %d, %s) from %s",
            record.adapter_id,
            record.kind,
            record.rank,
            record.state.value,
            record.path,
        )
        return record

    @_unary_errors
    async def UnloadAdapter(self, request, context):
        draining = await self.unload(request.adapter_id)
        return pb.UnloadAdapterResponse(adapter_id=request.adapter_id, draining_requests=draining)

    async def unload(self, adapter_id: str) -> int:
        """Unload an adapter; returns how many in-flight requests still finish with it."""
        draining = await asyncio.to_thread(self.registry.unload, adapter_id)
        log.info("unloaded adapter %r (%d requests still finishing)", adapter_id, draining)
        return draining

    @_unary_errors
    async def MergeAdapter(self, request, context):
        record = await asyncio.to_thread(self.merges.merge, request.adapter_id)
        return adapter_info(record)

    @_unary_errors
    async def UnmergeAdapter(self, request, context):
        return pb.UnmergeAdapterResponse(adapter_id=await asyncio.to_thread(self.merges.unmerge))

    @_unary_errors
    async def PinAdapter(self, request, context):
        record = await asyncio.to_thread(self.registry.set_pinned, request.adapter_id, request.pinned)
        return adapter_info(record)

    @_unary_errors
    async def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[adapter_info(r) for r in self.registry.list()])
