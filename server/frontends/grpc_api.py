"""The native gRPC door (deltaserve.v1): Generation and Adapters.

A thin translation: a GenerateRequest becomes the core's protocol-neutral `GenerationRequest` and runs through
`FrontDoorCore.submit`; servicer methods never run model code. Every exception becomes a gRPC status through the
one table in `status.py`; the Adapters service's bearer token is checked by `auth.AdminTokenInterceptor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.client.v1 import deltaserve_pb2_grpc as pb_grpc
from deltaserve.server.engine.engine import Engine
from deltaserve.server.engine.grammar import GrammarKind, GrammarSpec
from deltaserve.server.engine.merge import MergeController
from deltaserve.server.engine.request import FinishReason, Request, RequestOutput, TokenLogprob
from deltaserve.server.errors import CapacityError
from deltaserve.server.frontends.core import (
    AdapterRef,
    ChatTurn,
    Field,
    FieldNames,
    FrontDoorCore,
    Generation,
    GenerationRequest,
    clean_request_id,
    merged_outputs,
)
from deltaserve.server.frontends.status import public_message, status_for
from deltaserve.server.kernels.threads import one_thread_here
from deltaserve.server.metrics import Metrics
from deltaserve.server.residency.registry import AdapterRecord, AdapterState

log = logging.getLogger(__name__)

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


async def _abort(context: grpc.aio.ServicerContext, err: BaseException) -> None:
    retry_after = getattr(err, "retry_after", None)  # a CapacityError's hint, in whole seconds
    trailing = (("retry-after", str(math.ceil(retry_after))),) if retry_after else ()
    await context.abort(status_for(err), public_message(err, request_id(context)), trailing_metadata=trailing)


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


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id` metadata when it is a sane token, else a fresh id."""
    given = [value for key, value in context.invocation_metadata() or () if key == "x-request-id"]
    return clean_request_id(given[0] if given else None)


def _turns(messages: Any) -> tuple[ChatTurn, ...]:
    return tuple(ChatTurn(message.role, message.content) for message in messages)


def generation_request(request: pb.GenerateRequest, rid: str) -> GenerationRequest:
    """The protocol-neutral request for a native GenerateRequest (unset optional fields: their neutral values)."""
    return GenerationRequest(
        prompt=request.prompt,
        messages=_turns(request.messages),
        adapter=AdapterRef(
            adapter_id=request.adapter_id,
            stack=tuple(request.adapter_stack),
            mix=tuple((part.adapter_id, part.weight) for part in request.adapter_mix),
            mix_method=request.mix_method,
            mix_density=request.mix_density if request.HasField("mix_density") else None,
            mix_majority_sign_method=request.mix_majority_sign_method,
        ),
        max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens") else None,
        min_new_tokens=request.min_new_tokens,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        seed=request.seed if request.HasField("seed") else None,
        repetition_penalty=request.repetition_penalty if request.HasField("repetition_penalty") else 1.0,
        stop=tuple(request.stop),
        logprobs=request.logprobs,
        prompt_token_ids=tuple(request.prompt_token_ids),
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=tuple(sorted(request.logit_bias.items())),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        allowed_token_ids=tuple(request.allowed_token_ids),
        top_logprobs=request.top_logprobs,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
        request_id=rid,
        tenant=request.tenant,
        priority=request.priority,
        grammar=_constraint(request),
    )


def _constraint(request: pb.GenerateRequest) -> GrammarSpec | None:
    """The request's `constraint` oneof as the core's grammar (docs/structured.md)."""
    which = request.WhichOneof("constraint")
    if which is None or (which == "json_object" and not request.json_object):
        return None
    if which == "json_object":
        return GrammarSpec(GrammarKind.JSON_OBJECT, param=which)
    if which == "choice":
        return GrammarSpec(GrammarKind.CHOICE, choices=tuple(request.choice.choices), param=which)
    kind = {"json_schema": GrammarKind.JSON_SCHEMA, "regex": GrammarKind.REGEX, "grammar": GrammarKind.GRAMMAR}[which]
    return GrammarSpec(kind, getattr(request, which), param=which)


NATIVE_NAMES: FieldNames = {}  # the core's canonical names are deltaserve.v1's
TOKENIZE_NAMES: FieldNames = {Field.PROMPT: "text"}


def _top(entries: list[tuple[int, float]]) -> pb.TopLogprobs:
    return pb.TopLogprobs(token_ids=[token for token, _ in entries], logprobs=[value for _, value in entries])


def _prompt_logprobs(scored: list[TokenLogprob] | None) -> list[pb.PromptLogprob]:
    return [
        pb.PromptLogprob(token_id=p.token_id, logprob=p.logprob, rank=p.rank or 0, top=_top(p.top))
        for p in scored or ()
    ]


def _whole(generation: Generation, index: int) -> pb.GenerateResponse:
    """A finished generation as one response: its totals, and the last output's finish."""
    last = generation.last
    combined = RequestOutput(
        generation.token_ids,
        generation.text,
        generation.logprobs,
        last.generated_tokens,
        last.finish_reason,
        last.stop_sequence,
        top_logprobs=generation.top_logprobs,
        prompt_logprobs=generation.prompt_logprobs,
    )
    response = _response(combined, generation.request)
    response.index = index
    return response


def _response(output: RequestOutput, request: Request) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        top_logprobs=[_top(entries) for entries in output.top_logprobs],
        prompt_logprobs=_prompt_logprobs(output.prompt_logprobs),
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
    """deltaserve.v1.Generation: GenerateRequest in, through the front-door core, GenerateResponse out."""

    def __init__(self, core: FrontDoorCore, model_info: Callable[[], pb.ModelInfoResponse]) -> None:
        self.core = core
        self.model_info = model_info

    async def _submit(self, request: pb.GenerateRequest, context) -> list[Generation]:
        count = self.core.check_sequences(request.n or 1, None, NATIVE_NAMES)
        return await self.core.submit_sequences(generation_request(request, request_id(context)), NATIVE_NAMES, count)

    @_unary_errors
    async def Generate(self, request, context):
        generations = await self._submit(request, context)
        try:
            await asyncio.gather(*(generation.collect() for generation in generations))
        finally:
            for generation in generations:
                generation.close()
        responses = [_whole(generation, index) for index, generation in enumerate(generations)]
        if len(responses) > 1:
            responses[0].sequences.extend(_whole(generation, i) for i, generation in enumerate(generations))
        return responses[0]

    @_stream_errors
    async def GenerateStream(self, request, context):
        generations = await self._submit(request, context)
        try:
            firsts = await asyncio.gather(*(generation.next() for generation in generations))
            if any(first is None for first in firsts):
                raise TimeoutError
            async for index, output in merged_outputs(generations, list(firsts)):
                if output.token_ids or output.finished or output.prompt_logprobs:
                    response = _response(output, generations[index].request)
                    response.index = index
                    yield response
        finally:
            for generation in generations:
                generation.close()

    @_unary_errors
    async def Tokenize(self, request, context):
        ids = await asyncio.to_thread(self.core.prompt_ids, request.text, _turns(request.messages), TOKENIZE_NAMES)
        return pb.TokenizeResponse(token_ids=ids, tokens=self.core.tokenizer.convert_ids_to_tokens(ids))

    @_unary_errors
    async def ModelInfo(self, request, context):
        return self.model_info()


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
        content_hash=record.content_hash,
        version=record.version,
        source=record.source,
    )


MAX_CONCURRENT_LOADS = 8  # adapter loads running at once; more are refused (RESOURCE_EXHAUSTED)


async def _in_daemon_thread(gate: threading.BoundedSemaphore, work: Callable[[], Any]) -> Any:
    """Run `work` on a daemon thread of its own, holding `gate` until the thread ends. A load that hangs (a
    stalled network file system) then holds no thread of the event loop's executor, which the other calls
    need, and never keeps the process from exiting; an abandoned await leaves the gate taken until it ends."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        result, error = None, None
        try:
            one_thread_here()  # only the engine thread computes with several (kernels/threads.py)
            result = work()
        except BaseException as err:
            error = err
        finally:
            gate.release()
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="deltaserve-load", daemon=True).start()
    return await future


class AdaptersService(pb_grpc.AdaptersServicer):
    def __init__(self, engine: Engine, metrics: Metrics, merges: MergeController) -> None:
        self.registry = engine.registry
        self.metrics = metrics
        self.merges = merges
        self._loads = threading.BoundedSemaphore(MAX_CONCURRENT_LOADS)

    @_unary_errors
    async def LoadAdapter(self, request, context):
        return adapter_info(await self.load(request.adapter_id, request.path, replace=request.replace, pin=request.pin))

    async def load(self, adapter_id: str, path: str, *, replace: bool = False, pin: bool = False) -> AdapterRecord:
        """Validate and register an adapter, with its metrics and log line (gRPC LoadAdapter and the HTTP
        load endpoint both come here)."""
        # Parsing and copying weights blocks: it runs on a thread of its own, never on the event loop.
        started = time.monotonic()
        try:
            if not self._loads.acquire(blocking=False):
                raise CapacityError(f"{MAX_CONCURRENT_LOADS} adapter loads are in progress; retry later")
            load = functools.partial(self.registry.load, adapter_id, path, replace=replace, pin=pin)
            record = await _in_daemon_thread(self._loads, load)
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
