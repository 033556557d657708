"""The OpenAI-compatible HTTP front door (`--http-port`): completions, chat completions, the model list and
vLLM-style adapter load/unload, served by uvicorn inside the gRPC server's event loop.

It is a translation layer only. A completion or chat request becomes the `pb.GenerateRequest` the gRPC API
takes and runs through `GenerationService.run`, so validation, adapter acquisition (host- or disk-resident
adapters are brought in), the engine, stop strings, cancellation and metrics are the gRPC path's. `model`
names the adapter: the base model's name, "base" or an empty value mean no adapter (vLLM's and LoRAX's
convention). Failures are the core's exceptions, mapped by `api.status_for` to a gRPC code and from that
code to an HTTP status (the usual google.rpc correspondence), in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import grpc
import uvicorn
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.server.engine.request import FinishReason, Request, RequestOutput
from deltaserve.server.errors import AdapterNotFoundError, InvalidRequestError
from deltaserve.server.frontends.grpc_api import AdaptersService, GenerationService, clean_request_id, status_for
from deltaserve.server.residency.registry import AdapterRecord, AdapterState
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

BASE_ALIASES = ("", "base")  # besides the base model's own name
TIMEOUT_HEADER = "x-request-timeout"  # seconds; the request is cancelled and answered 504 after that

# gRPC status -> HTTP status, as google.rpc.Code documents the correspondence; anything else is 500.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

_FINISH_REASON = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.CANCELLED: "abort",  # vLLM's word for a request that ended before it was done
    FinishReason.ABORTED: "abort",
}


# ---- errors -----------------------------------------------------------------------------------------
class OpenAIHttpError(Exception):
    """A refusal decided by this layer (an HTTP status of its own, and the request field it is about)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


class FieldError(InvalidRequestError):
    """A bad request field, named in OpenAI's terms; INVALID_ARGUMENT like any other InvalidRequestError."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _grpc_code(err: BaseException) -> grpc.StatusCode:
    if isinstance(err, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return status_for(err)


def _error_body(err: BaseException, prompt_field: str, max_tokens_field: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error object for an exception raised while serving a request."""
    if isinstance(err, OpenAIHttpError):
        status, message, param, code = err.status, str(err), err.param, err.code
    else:
        grpc_code = _grpc_code(err)
        status = _HTTP_STATUS.get(grpc_code, 500)
        message, param, code = str(err) or type(err).__name__, None, grpc_code.name.lower()
        if isinstance(err, FieldError):
            param = err.param
        elif isinstance(err, InvalidRequestError):
            message, param = _in_openai_terms(message, prompt_field, max_tokens_field)
        elif isinstance(err, TimeoutError):
            message = f"the request did not finish within its {TIMEOUT_HEADER}; it was cancelled"
        if status == 500:
            log.exception("internal error", exc_info=err)
    body = {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}
    return status, body


# The core's messages name GenerateRequest fields; an OpenAI caller knows them by these names.
_SAMPLING_PARAMS = ("temperature", "top_p", "top_k", "repetition_penalty", "stop", "min_tokens", "seed")


def _in_openai_terms(message: str, prompt_field: str, max_tokens_field: str) -> tuple[str, str | None]:
    """Rename GenerateRequest fields in a core message to the caller's names; the field it is about."""
    message = re.sub(r"\bmax_new_tokens\b", max_tokens_field, message)
    message = re.sub(r"\bmin_new_tokens\b", "min_tokens", message)
    for name in (max_tokens_field, *_SAMPLING_PARAMS):
        if re.match(rf"{name}\b", message):
            return message, name
    if message.startswith(
        ("the prompt", "messages", prompt_field, "this model has no chat template", "the model's chat")
    ):
        return message, prompt_field
    return message, None


# ---- request bodies ---------------------------------------------------------------------------------
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]

# Fields that do not change what is generated: accepted and ignored.
_IGNORED_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls"}
)
# Fields deltaserve does not implement, accepted only with the value that means "off".
_NEUTRAL_VALUES: dict[str, Callable[[Any], bool]] = {
    "echo": lambda value: not value,
    "best_of": lambda value: value in (None, 1),
    "suffix": lambda value: not value,
    "logit_bias": lambda value: not value,
    "presence_penalty": lambda value: not value,
    "frequency_penalty": lambda value: not value,
    "tools": lambda value: not value,
    "tool_choice": lambda value: value in (None, "none", "auto"),
    "functions": lambda value: not value,
    "function_call": lambda value: value in (None, "none", "auto"),
    "response_format": lambda value: value is None or (isinstance(value, dict) and value.get("type") == "text"),
    "modalities": lambda value: value is None or value == ["text"],
}


class _Body(BaseModel):
    """A request body: declared fields are validated; any other field must be known to be harmless."""

    model_config = ConfigDict(extra="allow")

    def check_extra_fields(self, where: str = "") -> None:
        """Refuse an unknown field, or a known one set to a value that would change the result."""
        for name, value in (self.model_extra or {}).items():
            if name in _IGNORED_FIELDS:
                continue
            neutral = _NEUTRAL_VALUES.get(name)
            if neutral is None:
                raise FieldError(where + name, f"unrecognized request field {where + name!r}")
            if not neutral(value):
                raise FieldError(
                    where + name,
                    f"{where + name}={json.dumps(value)} is not supported by deltaserve (leave it out or unset)",
                )


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationBody(_Body):
    model: str | None = None
    max_tokens: Int32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: Int32 | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions, which deltaserve's sampler has too
    top_k: Int32 | None = None
    min_tokens: Int32 | None = None
    repetition_penalty: float | None = None


class CompletionBody(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Int32 | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a participant's name: the chat templates deltaserve serves do not use it


class ChatBody(_GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = None
    top_logprobs: Int32 | None = None


class LoadAdapterBody(_Body):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's flag: replace an adapter of the same name


class UnloadAdapterBody(_Body):
    lora_name: str


# ---- translation ------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What the HTTP layer needs besides the GenerateRequest to answer in OpenAI's shape."""

    generate: pb.GenerateRequest
    model: str  # echoed in the response
    prompt_field: str  # "prompt" or "messages"
    max_tokens_field: str  # "max_tokens" or "max_completion_tokens"
    logprobs: bool = False
    top_logprobs: int = 0  # 0 or 1 (1: the chosen token is known to be the most likely one)


def _check_common(body: _GenerationBody) -> None:
    body.check_extra_fields()
    if body.n is not None and body.n != 1:
        raise FieldError("n", f"n={body.n}: deltaserve returns one choice per request; send n=1 or several requests")


def _sampling_fields(body: _GenerationBody, adapter_id: str, max_tokens: int | None) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    fields: dict[str, Any] = {
        "adapter_id": adapter_id,
        # OpenAI's default temperature is 1 (sampling); 0 is greedy decoding.
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "stop": stop,
        "top_k": body.top_k or 0,
        "min_new_tokens": body.min_tokens or 0,
    }
    if max_tokens is not None:
        fields["max_new_tokens"] = max_tokens
    if body.top_p is not None:
        fields["top_p"] = body.top_p
    if body.seed is not None:
        fields["seed"] = body.seed % 2**64
    if body.repetition_penalty is not None:
        fields["repetition_penalty"] = body.repetition_penalty
    return fields


def _check_top_logprobs(field_name: str, count: int, generate: pb.GenerateRequest) -> None:
    """Only the chosen token's log-probability is computed. 0 asks for just that; 1 also asks for the most
    likely token, which is the chosen one only under plain greedy decoding (argmax of the raw logits)."""
    if count < 0:
        raise FieldError(field_name, f"{field_name} must be >= 0, got {count}")
    if count > 1:
        raise FieldError(
            field_name,
            f"{field_name}={count}: deltaserve returns only the chosen token's log-probability ({field_name} 0 or 1)",
        )
    plain_greedy = generate.temperature == 0 and generate.min_new_tokens == 0 and generate.repetition_penalty in (0, 1)
    if count == 1 and not plain_greedy:
        raise FieldError(
            field_name,
            f"{field_name}=1 asks for the most likely token, which deltaserve knows only under plain greedy "
            "decoding (temperature 0, no repetition_penalty or min_tokens); ask for 0 to get the chosen "
            "token's log-probability",
        )


# ---- per-token text for logprobs ---------------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table (GPT-2's)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


class TokenTexts:
    """Each token's text (decoded alone, special tokens kept) and its exact UTF-8 bytes, which a text cut
    in the middle of a multi-byte character cannot show. Cached per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._bytes_of = _byte_decoder() if type(decoder).__name__ == "ByteLevel" else None
        self._special = set(getattr(tokenizer, "added_tokens_decoder", {}) or ())
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            text = self.tokenizer.decode([token_id])
            raw = list(text.encode())
            if self._bytes_of is not None and token_id not in self._special:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                if all(char in self._bytes_of for char in piece):
                    raw = [self._bytes_of[char] for char in piece]
            cached = self._cache[token_id] = (text, raw)
        return cached


# ---- generation results -----------------------------------------------------------------------------
@dataclass
class _Totals:
    """A request's outputs gathered so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    last: RequestOutput | None = None
    request: Request | None = None

    def add(self, output: RequestOutput, request: Request) -> None:
        self.text.append(output.text)
        self.token_ids.extend(output.token_ids)
        self.logprobs.extend(output.logprobs)
        self.last, self.request = output, request

    def usage(self) -> dict[str, int]:
        prompt = len(self.request.prompt_ids)
        completion = self.last.generated_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(output: RequestOutput) -> tuple[str | None, str | None]:
    """OpenAI's finish_reason and vLLM's stop_reason (the stop string that matched)."""
    if output.finish_reason is None:
        return None, None
    return _FINISH_REASON[output.finish_reason], output.stop_sequence


async def _next_within(outputs: AsyncIterator[Any], deadline: float | None) -> Any:
    """The next output, or TimeoutError at `deadline` (loop time). The cancellation lands inside
    GenerationService.run, which cancels the engine request on its way out."""
    async with asyncio.timeout_at(deadline):
        return await anext(outputs)


class _EventStream(StreamingResponse):
    """Server-sent events from `events`, which reads `outputs`. Both generators are closed however the
    response ends (a client that went away included), so the engine request is cancelled at once rather
    than whenever the generators are garbage collected."""

    def __init__(self, events: AsyncIterator[str], outputs: AsyncIterator[Any], headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.outputs = outputs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.outputs.aclose()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# ---- the front door ---------------------------------------------------------------------------------
class OpenAIFrontDoor:
    """The FastAPI app over one server's GenerationService and AdaptersService, and its uvicorn server."""

    def __init__(
        self,
        generation: GenerationService,
        adapters: AdaptersService,
        *,
        model_name: str,
        admin_token: str | None = None,
        max_request_bytes: int = 4 * 1024 * 1024,
        shutdown_grace_seconds: float = 30.0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.generation = generation
        self.tls = (tls_cert, tls_key) if tls_cert else None  # HTTPS with the gRPC server's certificate
        self.adapters = adapters
        self.model_name = model_name
        self.max_request_bytes = max_request_bytes
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self._expected_auth = f"Bearer {admin_token}".encode() if admin_token else None
        self._token_texts = TokenTexts(generation.builder.tokenizer)
        self.created = int(time.time())
        self.port: int | None = None
        self._uvicorn: _Uvicorn | None = None
        self._serving: asyncio.Task | None = None
        self.app = self._build_app()

    # ---- app and routes --------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="deltaserve (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(RequestValidationError)
        async def validation_error(request: HttpRequest, err: RequestValidationError) -> JSONResponse:
            # FastAPI answers 422; OpenAI's API (and its clients) expect 400 for a malformed body.
            first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request body"}
            if first.get("type") == "json_invalid":
                reason = first.get("ctx", {}).get("error", first["msg"])
                return error_response(400, f"the request body is not valid JSON: {reason}", None, "invalid_argument")
            location = [str(part) for part in first.get("loc", ()) if part != "body"]
            param = ".".join(location) or None
            message = f"{param}: {first['msg']}" if param else str(first["msg"])
            return error_response(400, message, param, "invalid_argument")

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: HttpRequest, err: StarletteHTTPException) -> JSONResponse:
            return error_response(err.status_code, str(err.detail))

        app.add_middleware(_BodyLimit, limit=self.max_request_bytes)
        app.add_api_route("/v1/models", self.list_models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.get_model, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/load_lora_adapter", self.load_adapter, methods=["POST"])
        app.add_api_route("/v1/unload_lora_adapter", self.unload_adapter, methods=["POST"])
        return app

    def _model_card(self, model_id: str, parent: str | None) -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": self.created, "owned_by": "deltaserve"}
        # vLLM's fields for LoRA entries. `root` is the id, not a path: the list is open to every caller.
        card.update(root=model_id, parent=parent)
        if parent is None:
            card["max_model_len"] = self.generation.builder.max_seq_len
        return card

    def _served_adapters(self) -> list[AdapterRecord]:
        """Adapters a request can name: loaded, not being unloaded, not a cached mix or stack."""
        return [
            record
            for record in self.adapters.registry.list()
            if not record.components and record.state not in (AdapterState.LOADING, AdapterState.UNLOADING)
        ]

    async def list_models(self) -> JSONResponse:
        cards = [self._model_card(self.model_name, None)]
        cards += [self._model_card(record.adapter_id, self.model_name) for record in self._served_adapters()]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(self, model_id: str) -> JSONResponse:
        if model_id == self.model_name:
            return JSONResponse(self._model_card(model_id, None))
        if any(record.adapter_id == model_id for record in self._served_adapters()):
            return JSONResponse(self._model_card(model_id, self.model_name))
        return error_response(404, f"model {model_id!r} is neither the base model nor a loaded adapter", "model")

    def _adapter_for(self, model: str | None) -> str:
        return "" if model is None or model in (*BASE_ALIASES, self.model_name) else model

    async def completions(self, body: CompletionBody, request: HttpRequest) -> Any:
        return await self._serve(request, lambda: self._completion_plan(body), body.stream, body.stream_options)

    async def chat_completions(self, body: ChatBody, request: HttpRequest) -> Any:
        return await self._serve(request, lambda: self._chat_plan(body), body.stream, body.stream_options)

    def _completion_plan(self, body: CompletionBody) -> _Plan:
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
        fields = _sampling_fields(body, self._adapter_for(body.model), body.max_tokens)
        generate = pb.GenerateRequest(prompt=prompt, logprobs=body.logprobs is not None, **fields)
        if body.logprobs is not None:
            _check_top_logprobs("logprobs", body.logprobs, generate)
        plan = _Plan(generate, body.model or self.model_name, "prompt", "max_tokens")
        plan.logprobs, plan.top_logprobs = body.logprobs is not None, body.logprobs or 0
        return plan

    def _chat_plan(self, body: ChatBody) -> _Plan:
        _check_common(body)
        if not body.messages:
            raise FieldError("messages", "messages must not be empty")
        messages = []
        for i, message in enumerate(body.messages):
            message.check_extra_fields(f"messages[{i}].")
            messages.append(pb.ChatMessage(role=message.role, content=_message_text(message, i)))
        max_tokens_field = "max_tokens"
        max_tokens = body.max_tokens
        if body.max_completion_tokens is not None:
            if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
                raise FieldError("max_tokens", "max_tokens and max_completion_tokens disagree; give one of them")
            max_tokens_field, max_tokens = "max_completion_tokens", body.max_completion_tokens
        fields = _sampling_fields(body, self._adapter_for(body.model), max_tokens)
        generate = pb.GenerateRequest(messages=messages, logprobs=bool(body.logprobs), **fields)
        if body.top_logprobs is not None:
            if body.top_logprobs and not body.logprobs:
                raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
            _check_top_logprobs("top_logprobs", body.top_logprobs, generate)
        plan = _Plan(generate, body.model or self.model_name, "messages", max_tokens_field)
        plan.logprobs, plan.top_logprobs = bool(body.logprobs), body.top_logprobs or 0
        return plan

    # ---- running a request -----------------------------------------------------------------------------
    async def _serve(
        self,
        request: HttpRequest,
        make_plan: Callable[[], _Plan],
        stream: bool,
        stream_options: StreamOptions | None,
    ) -> Any:
        request_id = clean_request_id(request.headers.get("x-request-id"))
        headers = {"x-request-id": request_id}
        plan: _Plan | None = None
        try:
            plan = make_plan()
            deadline = self._deadline(request)
            outputs = self.generation.run(plan.generate, request_id)
            chat = plan.prompt_field == "messages"
            if stream:
                # The first output is awaited here, so that a refused request (unknown adapter, bad
                # values, too long) is answered with its HTTP status rather than inside a 200 stream.
                first = await self._until_disconnect(request, _next_within(outputs, deadline))
                include_usage = stream_options is not None and stream_options.include_usage
                events = self._events(plan, request_id, outputs, first, deadline, chat, include_usage)
                return _EventStream(events, outputs, headers)
            totals = await self._until_disconnect(request, self._collect(outputs, deadline))
            answer = self._chat_answer if chat else self._completion_answer
            return JSONResponse(answer(plan, request_id, totals), headers=headers)
        except _ClientGone:
            return error_response(499, "the client closed the connection; the request was cancelled")
        except Exception as err:
            status, body = self._error(err, plan)
            return JSONResponse({"error": body}, status_code=status, headers=headers)

    def _error(self, err: BaseException, plan: _Plan | None) -> tuple[int, dict[str, Any]]:
        prompt_field = plan.prompt_field if plan is not None else "prompt"
        status, body = _error_body(err, prompt_field, plan.max_tokens_field if plan is not None else "max_tokens")
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

    @staticmethod
    async def _collect(outputs: AsyncIterator[tuple[RequestOutput, Request]], deadline: float | None) -> _Totals:
        totals = _Totals()
        async with contextlib.aclosing(outputs):
            while totals.last is None or not totals.last.finished:
                totals.add(*await _next_within(outputs, deadline))
        return totals

    def _logprobs(self, plan: _Plan, token_ids: list[int], logprobs: list[float], offset: int) -> Any:
        """The logprobs object of a choice (or of one streamed chunk) in the endpoint's own shape."""
        if not plan.logprobs:
            return None
        texts = [self._token_texts(token_id) for token_id in token_ids]
        if plan.prompt_field == "messages":
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

    def _completion_answer(self, plan: _Plan, request_id: str, totals: _Totals) -> dict[str, Any]:
        finish_reason, stop_reason = _finish(totals.last)
        choice = {
            "index": 0,
            "text": "".join(totals.text),
            "logprobs": self._logprobs(plan, totals.token_ids, totals.logprobs, 0),
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
        return {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": [choice],
            "usage": totals.usage(),
        }

    def _chat_answer(self, plan: _Plan, request_id: str, totals: _Totals) -> dict[str, Any]:
        finish_reason, stop_reason = _finish(totals.last)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(totals.text), "refusal": None},
            "logprobs": self._logprobs(plan, totals.token_ids, totals.logprobs, 0),
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": [choice],
            "usage": totals.usage(),
        }

    async def _events(
        self,
        plan: _Plan,
        request_id: str,
        outputs: AsyncIterator[tuple[RequestOutput, Request]],
        first: tuple[RequestOutput, Request],
        deadline: float | None,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """The SSE stream: one chunk per engine output that carries text (or logprobs), the finish, the
        usage chunk if asked for, `[DONE]`. A failure after the first byte becomes an error event."""
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

        totals = _Totals()
        offset = 0
        async with contextlib.aclosing(outputs):
            try:
                if chat:
                    yield chunk(delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None)
                item = first
                while True:
                    output, _ = item
                    totals.add(*item)
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
                    item = await _next_within(outputs, deadline)
                if chat:
                    yield chunk(delta={}, logprobs=None, finish_reason=finish_reason, stop_reason=stop_reason)
                if include_usage:
                    yield _sse({**envelope, "choices": [], "usage": totals.usage()})
            except Exception as err:
                _, body = self._error(err, plan)
                yield _sse({"error": body})
        yield "data: [DONE]\n\n"

    # ---- adapters (guarded by the admin token when the server has one) ---------------------------------
    def _check_admin(self, request: HttpRequest) -> None:
        if self._expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected_auth):
            reason = "missing" if not given else "wrong"
            raise OpenAIHttpError(
                401,
                f"adapter loading and unloading need 'Authorization: Bearer <admin token>' ({reason} token)",
                code="invalid_api_key",
            )

    async def _admin(self, request: HttpRequest, action: Callable[[], Awaitable[dict[str, Any]]]) -> JSONResponse:
        try:
            self._check_admin(request)
            return JSONResponse(await action())
        except Exception as err:
            status, body = _error_body(err, "prompt", "max_tokens")
            response = JSONResponse({"error": body}, status_code=status)
            if status == 401:
                response.headers["www-authenticate"] = "Bearer"
            return response

    async def load_adapter(self, body: LoadAdapterBody, request: HttpRequest) -> JSONResponse:
        async def load() -> dict[str, Any]:
            body.check_extra_fields()
            if body.lora_name in (*BASE_ALIASES, self.model_name):
                raise FieldError("lora_name", f"lora_name {body.lora_name!r} names the base model here; pick another")
            record = await self.adapters.load(body.lora_name, body.lora_path, replace=body.load_inplace)
            card = self._model_card(record.adapter_id, self.model_name)
            return {**card, "kind": record.kind, "rank": record.rank, "state": record.state.value}

        return await self._admin(request, load)

    async def unload_adapter(self, body: UnloadAdapterBody, request: HttpRequest) -> JSONResponse:
        async def unload() -> dict[str, Any]:
            body.check_extra_fields()
            if not body.lora_name:
                raise FieldError("lora_name", "lora_name must not be empty")
            draining = await self.adapters.unload(body.lora_name)
            return {"id": body.lora_name, "object": "model", "deleted": True, "draining_requests": draining}

        return await self._admin(request, unload)

    # ---- serving -------------------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Bind host:port (0 picks a free port) and serve on the running event loop; returns the port."""
        sock = _listen(host, port)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(self.shutdown_grace_seconds) + 1,
            ssl_certfile=self.tls[0] if self.tls else None,
            ssl_keyfile=self.tls[1] if self.tls else None,
        )
        self._uvicorn = _Uvicorn(config)
        self._serving = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._serving.done():
                self._serving.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {host}:{port} stopped while starting")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let open responses finish (the engine ends them within its grace), close."""
        if self._uvicorn is None or self._serving is None:
            return
        self._uvicorn.should_exit = True
        await self._serving


class _BodyLimit:
    """Refuses request bodies over `limit` bytes with 413: by Content-Length up front, or while a chunked
    body is read (a plain ASGI middleware, so that streaming responses and disconnects pass untouched)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = error_response(413, f"the request body has {int(length)} bytes; the server takes {self.limit}")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise StarletteHTTPException(413, f"the request body exceeds the server's {self.limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the deltaserve process handles SIGTERM/SIGINT itself."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


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


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {host}:{port}: {err}") from err
    return sock
