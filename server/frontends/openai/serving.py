"""Translation between OpenAI's completion and chat bodies and the front-door core, and OpenAI's answers.

A body becomes the core's protocol-neutral `GenerationRequest`; `model` names the adapter (the base model's
name, "base" or an empty value mean none: vLLM's and LoRAX's convention). The core's refusals already name
the field as this door calls it, through the name tables below.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from deltaserve.server.engine.request import FinishReason, RequestOutput
from deltaserve.server.errors import AdapterNotFoundError
from deltaserve.server.frontends.core import (
    BASE_ALIASES,
    TENANT_PATTERN,
    AdapterRef,
    ChatTurn,
    Field,
    FieldError,
    FieldNames,
    FrontDoorCore,
    Generation,
    GenerationRequest,
    adapter_for_model,
    clean_request_id,
    listed_adapters,
)
from deltaserve.server.frontends.grpc_api import AdaptersService
from deltaserve.server.frontends.openai.errors import TIMEOUT_HEADER, OpenAIHttpError, error_body, error_response
from deltaserve.server.frontends.openai.logprobs import TokenTexts
from deltaserve.server.frontends.openai.protocol import (
    ChatBody,
    ChatMessage,
    CompletionBody,
    LoadAdapterBody,
    StreamOptions,
    UnloadAdapterBody,
    _GenerationBody,
)
from deltaserve.server.residency.registry import AdapterRecord
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

_FINISH_REASON = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.CANCELLED: "abort",  # vLLM's word for a request that ended before it was done
    FinishReason.ABORTED: "abort",
}


TENANT_HEADER = "x-tenant"  # names the request's tenant; wins over the body's `user`


def _names(max_tokens_field: str) -> FieldNames:
    """This door's names for the canonical fields it renames."""
    return {Field.MAX_NEW_TOKENS: max_tokens_field, Field.MIN_NEW_TOKENS: "min_tokens", Field.TENANT: TENANT_HEADER}


def user_tenant(user: str | None) -> str:
    """The tenant OpenAI's `user` names: the id itself when it is a tenant name, else a digest of it (an email
    with spaces, a long or non-ASCII id), so that any user string keeps one share of its own."""
    if not user:
        return ""
    if TENANT_PATTERN.fullmatch(user):
        return user
    return "user-" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class _Plan:
    """What the door needs besides the core's request to answer in OpenAI's shape."""

    request: GenerationRequest
    names: FieldNames
    model: str  # echoed in the response
    chat: bool
    logprobs: bool = False
    top_logprobs: int = 0  # 0 or 1 (1: the chosen token is known to be the most likely one)


def _check_common(body: _GenerationBody) -> None:
    body.check_extra_fields()
    if body.n is not None and body.n != 1:
        raise FieldError("n", f"n={body.n}: deltaserve returns one choice per request; send n=1 or several requests")


def _core_request(body: _GenerationBody, adapter_id: str, max_tokens: int | None, **given: Any) -> GenerationRequest:
    """The sampling fields of a body on the core's request (OpenAI's default temperature is 1: sampling)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return GenerationRequest(
        adapter=AdapterRef(adapter_id=adapter_id),
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        stop=tuple(stop),
        top_k=body.top_k or 0,
        min_new_tokens=body.min_tokens or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=None if body.seed is None else body.seed % 2**64,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        tenant=user_tenant(body.user),
        priority=-(body.priority or 0),  # vLLM's priority: lower values first; the core's: higher first
        **given,
    )


def _check_top_logprobs(field_name: str, count: int, request: GenerationRequest) -> None:
    """Only the chosen token's log-probability is computed. 0 asks for just that; 1 also asks for the most
    likely token, which is the chosen one only under plain greedy decoding (argmax of the raw logits)."""
    if count < 0:
        raise FieldError(field_name, f"{field_name} must be >= 0, got {count}")
    if count > 1:
        raise FieldError(
            field_name,
            f"{field_name}={count}: deltaserve returns only the chosen token's log-probability ({field_name} 0 or 1)",
        )
    plain_greedy = request.temperature == 0 and request.min_new_tokens == 0 and request.repetition_penalty in (0, 1)
    if count == 1 and not plain_greedy:
        raise FieldError(
            field_name,
            f"{field_name}=1 asks for the most likely token, which deltaserve knows only under plain greedy "
            "decoding (temperature 0, no repetition_penalty or min_tokens); ask for 0 to get the chosen "
            "token's log-probability",
        )


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = len(generation.prompt_ids), generation.generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(output: RequestOutput) -> tuple[str | None, str | None]:
    """OpenAI's finish_reason and vLLM's stop_reason (the stop string that matched)."""
    if output.finish_reason is None:
        return None, None
    return _FINISH_REASON[output.finish_reason], output.stop_sequence


async def _next(generation: Generation) -> RequestOutput:
    """The next output of an unfinished generation; TimeoutError once its deadline passed (the core has then
    cancelled the engine request)."""
    output = await generation.next()
    if output is None:
        raise TimeoutError
    return output


class _EventStream(StreamingResponse):
    """Server-sent events from `events`, which reads `generation`. Both are closed however the response ends (a
    client that went away included), so the engine request is cancelled at once rather than whenever the
    generator is garbage collected."""

    def __init__(self, events: AsyncIterator[str], generation: Generation, headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.generation.close()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def _message_text(message: ChatMessage, index: int) -> str:
    """A chat message's text: a string, or text content parts joined with newlines (as vLLM joins them)."""
    if message.content is None:
        raise FieldError(f"messages[{index}].content", f"messages[{index}].content is missing")
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise FieldError(
                f"messages[{index}].content",
                f"messages[{index}].content has a {part.type!r} part; deltaserve serves text parts only",
            )
        part.check_extra_fields(f"messages[{index}].content[].")
        texts.append(part.text)
    return "\n".join(texts)


class OpenAIServing:
    """The door's requests, answered through the front-door core; adapter admin through the AdaptersService."""

    def __init__(self, core: FrontDoorCore, adapters: AdaptersService, model_name: str) -> None:
        self.core = core
        self.adapters = adapters
        self.model_name = model_name
        self.created = int(time.time())
        self._token_texts = TokenTexts(core.tokenizer)

    # ---- models ------------------------------------------------------------------------------------------
    def model_card(self, model_id: str, parent: str | None) -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": self.created, "owned_by": "deltaserve"}
        # vLLM's fields for LoRA entries. `root` is the id, not a path: the list is open to every caller.
        card.update(root=model_id, parent=parent)
        if parent is None:
            card["max_model_len"] = self.core.max_seq_len
        return card

    def served_adapters(self) -> list[AdapterRecord]:
        """Adapters a request can name: servable and not a cached mix or stack."""
        return listed_adapters(self.core.engine.registry)

    async def list_models(self) -> JSONResponse:
        cards = [self.model_card(self.model_name, None)]
        cards += [self.model_card(record.adapter_id, self.model_name) for record in self.served_adapters()]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(self, model_id: str) -> JSONResponse:
        if model_id == self.model_name:
            return JSONResponse(self.model_card(model_id, None))
        if any(record.adapter_id == model_id for record in self.served_adapters()):
            return JSONResponse(self.model_card(model_id, self.model_name))
        return error_response(404, f"model {model_id!r} is neither the base model nor a loaded adapter", "model")

    # ---- translation -------------------------------------------------------------------------------------
    def completion_plan(self, body: CompletionBody) -> _Plan:
        _check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(item, str) for item in prompt):
                raise FieldError("prompt", "prompt must be text: token-id prompts are not served")
            if len(prompt) != 1:
                raise FieldError("prompt", f"one prompt per request, got a list of {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise FieldError("prompt", "prompt must not be empty")
        adapter = adapter_for_model(body.model, self.model_name)
        request = _core_request(body, adapter, body.max_tokens, prompt=prompt, logprobs=body.logprobs is not None)
        if body.logprobs is not None:
            _check_top_logprobs("logprobs", body.logprobs, request)
        model = body.model or self.model_name
        return _Plan(request, _names("max_tokens"), model, False, body.logprobs is not None, body.logprobs or 0)

    def chat_plan(self, body: ChatBody) -> _Plan:
        _check_common(body)
        if not body.messages:
            raise FieldError("messages", "messages must not be empty")
        messages = []
        for i, message in enumerate(body.messages):
            message.check_extra_fields(f"messages[{i}].")
            messages.append(ChatTurn(message.role, _message_text(message, i)))
        max_tokens_field, max_tokens = "max_tokens", body.max_tokens
        if body.max_completion_tokens is not None:
            if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
                raise FieldError("max_tokens", "max_tokens and max_completion_tokens disagree; give one of them")
            max_tokens_field, max_tokens = "max_completion_tokens", body.max_completion_tokens
        adapter = adapter_for_model(body.model, self.model_name)
        request = _core_request(body, adapter, max_tokens, messages=tuple(messages), logprobs=bool(body.logprobs))
        if body.top_logprobs is not None:
            if body.top_logprobs and not body.logprobs:
                raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
            _check_top_logprobs("top_logprobs", body.top_logprobs, request)
        model = body.model or self.model_name
        return _Plan(request, _names(max_tokens_field), model, True, bool(body.logprobs), body.top_logprobs or 0)

    # ---- running a request -------------------------------------------------------------------------------
    async def serve(
        self,
        request: HttpRequest,
        make_plan: Callable[[], _Plan],
        stream: bool | None,
        stream_options: StreamOptions | None,
    ) -> Any:
        """Answer one completion or chat request: JSON, or server-sent events when `stream`."""
        request_id = clean_request_id(request.headers.get("x-request-id"))
        headers = {"x-request-id": request_id}
        plan: _Plan | None = None
        generation: Generation | None = None
        try:
            plan = make_plan()
            deadline = self._deadline(request)
            core_request = dataclasses.replace(plan.request, request_id=request_id, deadline=deadline)
            if TENANT_HEADER in request.headers:  # checked by the core like any tenant name
                core_request = dataclasses.replace(core_request, tenant=request.headers[TENANT_HEADER])
            generation = await self._until_disconnect(request, self.core.submit(core_request, plan.names))
            if stream:
                # The first output is awaited here, so that a request the engine fails at once is answered
                # with its HTTP status rather than inside a 200 stream.
                first = await self._until_disconnect(request, _next(generation))
                include_usage = stream_options is not None and stream_options.include_usage
                events = self._events(plan, request_id, generation, first, include_usage)
                response, generation = _EventStream(events, generation, headers), None  # the stream closes it
                return response
            await self._until_disconnect(request, generation.collect())
            if generation.timed_out:
                raise TimeoutError
            answer = self._chat_answer if plan.chat else self._completion_answer
            return JSONResponse(answer(plan, request_id, generation), headers=headers)
        except _ClientGone:
            return error_response(499, "the client closed the connection; the request was cancelled")
        except Exception as err:
            status, body = self.error(err, plan)
            retry_after = getattr(err, "retry_after", None)  # a CapacityError's hint
            if retry_after:
                headers["retry-after"] = str(math.ceil(retry_after))
            return JSONResponse({"error": body}, status_code=status, headers=headers)
        finally:
            if generation is not None:
                generation.close()

    def error(self, err: BaseException, plan: _Plan | None) -> tuple[int, dict[str, Any]]:
        status, body = error_body(err)
        if isinstance(err, AdapterNotFoundError) and plan is not None:
            body.update(
                message=f"model {plan.model!r} is neither the base model ({self.model_name!r}) nor a loaded adapter "
                "(GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            )
        return status, body

    @staticmethod
    def _deadline(request: HttpRequest) -> float | None:
        given = request.headers.get(TIMEOUT_HEADER)
        if given is None:
            return None
        try:
            seconds = float(given)
        except ValueError:
            seconds = float("nan")
        if not seconds > 0 or seconds == float("inf"):
            raise OpenAIHttpError(400, f"{TIMEOUT_HEADER} must be a positive number of seconds, got {given!r}")
        return asyncio.get_running_loop().time() + seconds

    @staticmethod
    async def _until_disconnect(request: HttpRequest, work: Awaitable[Any]) -> Any:
        """Await `work`, cancelling it if the client goes away first (its body is already read, so the next
        ASGI message is the disconnect)."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise _ClientGone
        return task.result()

    def _logprobs(self, plan: _Plan, token_ids: list[int], logprobs: list[float], offset: int) -> Any:
        """The logprobs object of a choice (or of one streamed chunk) in the endpoint's own shape."""
        if not plan.logprobs:
            return None
        texts = [self._token_texts(token_id) for token_id in token_ids]
        if plan.chat:
            content = []
            for (text, raw), logprob in zip(texts, logprobs, strict=True):
                top = [{"token": text, "logprob": logprob, "bytes": raw}] if plan.top_logprobs else []
                content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": top})
            return {"content": content, "refusal": None}
        offsets = []
        for text, _ in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": [text for text, _ in texts],
            "token_logprobs": logprobs,
            "top_logprobs": [{text: logprob} for (text, _), logprob in zip(texts, logprobs, strict=True)],
            "text_offset": offsets,
        }

    def _completion_answer(self, plan: _Plan, request_id: str, generation: Generation) -> dict[str, Any]:
        return self._answer(plan, generation, f"cmpl-{request_id}", "text_completion", text=generation.text)

    def _chat_answer(self, plan: _Plan, request_id: str, generation: Generation) -> dict[str, Any]:
        message = {"role": "assistant", "content": generation.text, "refusal": None}
        return self._answer(plan, generation, f"chatcmpl-{request_id}", "chat.completion", message=message)

    def _answer(self, plan: _Plan, generation: Generation, answer_id: str, kind: str, **content: Any) -> dict[str, Any]:
        """The one-choice answer object both endpoints return; `content` is the choice's text or message."""
        finish_reason, stop_reason = _finish(generation.last)
        choice = {
            "index": 0,
            **content,
            "logprobs": self._logprobs(plan, generation.token_ids, generation.logprobs, 0),
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
        return {
            "id": answer_id,
            "object": kind,
            "created": int(time.time()),
            "model": plan.model,
            "choices": [choice],
            "usage": _usage(generation),
        }

    async def _events(
        self,
        plan: _Plan,
        request_id: str,
        generation: Generation,
        first: RequestOutput,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """The SSE stream: one chunk per engine output that carries text (or logprobs), the finish, the
        usage chunk if asked for, `[DONE]`. A failure after the first byte becomes an error event."""
        chat = plan.chat
        envelope = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": plan.model,
        }
        if include_usage:
            envelope["usage"] = None

        def chunk(**choice: Any) -> str:
            return _sse({**envelope, "choices": [{"index": 0, **choice}]})

        offset = 0
        with generation:
            try:
                if chat:
                    yield chunk(delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None)
                output = first
                while True:
                    finish_reason, stop_reason = _finish(output)
                    logprobs = self._logprobs(plan, output.token_ids, output.logprobs, offset)
                    offset += sum(len(self._token_texts(token_id)[0]) for token_id in output.token_ids)
                    if output.text or (logprobs and output.token_ids) or (finish_reason and not chat):
                        if chat:
                            yield chunk(delta={"content": output.text}, logprobs=logprobs, finish_reason=None)
                        else:
                            yield chunk(
                                text=output.text,
                                logprobs=logprobs,
                                finish_reason=finish_reason,
                                stop_reason=stop_reason,
                            )
                    if output.finished:
                        break
                    output = await _next(generation)
                if chat:
                    yield chunk(delta={}, logprobs=None, finish_reason=finish_reason, stop_reason=stop_reason)
                if include_usage:
                    yield _sse({**envelope, "choices": [], "usage": _usage(generation)})
            except Exception as err:
                _, body = self.error(err, plan)
                yield _sse({"error": body})
        yield "data: [DONE]\n\n"

    # ---- adapters (the routes check the admin token first) ------------------------------------------------
    async def load_adapter(self, body: LoadAdapterBody) -> dict[str, Any]:
        body.check_extra_fields()
        if body.lora_name in (*BASE_ALIASES, self.model_name):
            raise FieldError("lora_name", f"lora_name {body.lora_name!r} names the base model here; pick another")
        record = await self.adapters.load(body.lora_name, body.lora_path, replace=body.load_inplace)
        card = self.model_card(record.adapter_id, self.model_name)
        return {**card, "kind": record.kind, "rank": record.rank, "state": record.state.value}

    async def unload_adapter(self, body: UnloadAdapterBody) -> dict[str, Any]:
        body.check_extra_fields()
        if not body.lora_name:
            raise FieldError("lora_name", "lora_name must not be empty")
        draining = await self.adapters.unload(body.lora_name)
        return {"id": body.lora_name, "object": "model", "deleted": True, "draining_requests": draining}
