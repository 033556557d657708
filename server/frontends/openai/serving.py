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

from deltaserve.server.engine.request import FinishReason, RequestOutput, TokenLogprob
from deltaserve.server.engine.sampling import MAX_TOP_LOGPROBS
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
    merged_outputs,
)
from deltaserve.server.frontends.grpc_api import AdaptersService
from deltaserve.server.frontends.openai import structured
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

MAX_PROMPTS = 256  # prompts in one completions request (lm-evaluation-harness sends batches of them)

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
    return {
        Field.MAX_NEW_TOKENS: max_tokens_field,
        Field.MIN_NEW_TOKENS: "min_tokens",
        Field.PROMPT_TOKEN_IDS: "prompt",
        Field.TENANT: TENANT_HEADER,
    }


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
    """What the door needs besides the core's requests to answer in OpenAI's shape."""

    requests: tuple[GenerationRequest, ...]  # one per prompt (completions may send several)
    names: FieldNames
    model: str  # echoed in the response
    chat: bool
    logprobs: bool = False
    top_logprobs: int = 0  # the most likely tokens listed at each position besides the chosen one
    n: int = 1  # choices per prompt
    sequences: int = 1  # sequences generated per prompt: best_of, else n (the best n by log-probability win)
    echo: bool = False  # completions: the prompt precedes the text (and its tokens the logprobs)
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field: returned as each choice's prompt_logprobs
    tools: structured.ToolPlan | None = None  # chat: the tools the reply may call (parsed into tool_calls)


def _check_common(body: _GenerationBody) -> None:
    body.check_extra_fields()


def _core_request(body: _GenerationBody, adapter_id: str, max_tokens: int | None, **given: Any) -> GenerationRequest:
    """The sampling fields of a body on the core's request (OpenAI's default temperature is 1: sampling)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias = body.logit_bias or {}
    return GenerationRequest(
        adapter=AdapterRef(adapter_id=adapter_id),
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        stop=tuple(stop),
        top_k=max(body.top_k or 0, 0),  # vLLM: -1 also disables top-k
        min_new_tokens=body.min_tokens or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=None if body.seed is None else body.seed % 2**64,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=tuple((_bias_token(token), float(value)) for token, value in bias.items()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos),
        allowed_token_ids=tuple(body.allowed_token_ids or ()),
        tenant=user_tenant(body.user),
        priority=-(body.priority or 0),  # vLLM's priority: lower values first; the core's: higher first
        grammar=structured.guided_grammar(body),
        **given,
    )


def _bias_token(key: str) -> int:
    """A logit_bias key: OpenAI sends token ids as JSON object keys, so as decimal strings."""
    try:
        return int(key)
    except ValueError:
        raise FieldError("logit_bias", f"logit_bias keys are token ids, got {key!r}") from None


def _check_count(field_name: str, count: int) -> None:
    if not 0 <= count <= MAX_TOP_LOGPROBS:
        raise FieldError(field_name, f"{field_name} must be in [0, {MAX_TOP_LOGPROBS}], got {count}")


def _usage(prompts: list[Generation], generations: list[Generation]) -> dict[str, int]:
    """Each prompt's tokens once (its n sequences share it), every sequence's generated tokens."""
    prompt = sum(len(generation.prompt_ids) for generation in prompts)
    completion = sum(generation.generated_tokens for generation in generations)
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

    def __init__(self, events: AsyncIterator[str], generations: list[Generation], headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.generations = generations

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            for generation in self.generations:
                generation.close()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def _message_text(message: ChatMessage, index: int) -> str:
    """A chat message's text: a string, or text content parts joined with newlines (as vLLM joins them)."""
    if message.content is None and (message.tool_calls or message.role == "tool"):
        return ""
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
        cards += [
            {**self.model_card(record.adapter_id, self.model_name), "content_hash": record.content_hash}
            for record in self.served_adapters()
        ]
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
        if body.suffix:
            raise FieldError("suffix", "suffix (fill-in-the-middle) is not supported: the served models have no FIM")
        prompts = self._completion_prompts(body.prompt)
        adapter = adapter_for_model(body.model, self.model_name)
        top = body.logprobs or 0
        if body.logprobs is not None:
            _check_count("logprobs", body.logprobs)
        scored = (
            body.prompt_logprobs
            if body.prompt_logprobs is not None
            else top
            if body.echo and body.logprobs is not None
            else None
        )
        if body.prompt_logprobs is not None:
            _check_count("prompt_logprobs", body.prompt_logprobs)
        if body.echo and body.max_tokens == 0 and scored is None:
            scored = 0  # the prompt alone: nothing to generate, so the engine only runs the prompt
        requests = tuple(
            _core_request(
                body,
                adapter,
                body.max_tokens,
                **prompt,
                logprobs=body.logprobs is not None,
                top_logprobs=top,
                prompt_logprobs=scored,
            )
            for prompt in prompts
        )
        n, sequences = self._sequences(body, body.best_of)
        if body.best_of not in (None, n) and body.stream:
            raise FieldError("best_of", "best_of cannot be used with stream: the best sequences are known at the end")
        return _Plan(
            requests,
            _names("max_tokens"),
            body.model or self.model_name,
            False,
            logprobs=body.logprobs is not None,
            top_logprobs=top,
            n=n,
            sequences=sequences,
            echo=bool(body.echo),
            prompt_logprobs=body.prompt_logprobs,
        )

    def _completion_prompts(self, prompt: Any) -> list[dict[str, Any]]:
        """The body's prompts as core request fields: a string, a list of strings, a list of token ids, or a
        list of token-id lists (one choice set per prompt, as OpenAI and vLLM answer)."""
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif prompt and all(isinstance(item, int) for item in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise FieldError("prompt", "prompt must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise FieldError("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        fields = []
        for index, item in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            if isinstance(item, str):
                if not item:
                    raise FieldError(where, f"{where} must not be empty")
                fields.append({"prompt": item})
            elif isinstance(item, list) and item and all(isinstance(token, int) for token in item):
                fields.append({"prompt_token_ids": tuple(item)})
            else:
                raise FieldError(where, f"{where} must be a non-empty string or list of token ids")
        return fields

    def _sequences(self, body: _GenerationBody, best_of: int | None) -> tuple[int, int]:
        """OpenAI's n (choices) and the sequences generated for them (best_of, or n)."""
        n = 1 if body.n is None else body.n
        return n, self.core.check_sequences(n, best_of, {})

    def chat_plan(self, body: ChatBody) -> _Plan:
        _check_common(body)
        if not body.messages:
            raise FieldError("messages", "messages must not be empty")
        messages = []
        for i, message in enumerate(body.messages):
            message.check_extra_fields(f"messages[{i}].")
            calls = structured.message_calls(message.tool_calls, i)
            messages.append(ChatTurn(message.role, _message_text(message, i), calls, message.tool_call_id or ""))
        tools = structured.tool_plan(body.tools, body.tool_choice)
        native = self.core.template_renders_tools
        messages = structured.render_turns(messages, tools, native)
        tool_fields: dict[str, Any] = {}
        if tools is not None:
            tool_fields["tools"] = tools.tools if native else ()
            grammar = structured.tool_grammar(tools)
            if grammar is not None:
                tool_fields["grammar"] = grammar
        max_tokens_field, max_tokens = "max_tokens", body.max_tokens
        if body.max_completion_tokens is not None:
            if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
                raise FieldError("max_tokens", "max_tokens and max_completion_tokens disagree; give one of them")
            max_tokens_field, max_tokens = "max_completion_tokens", body.max_completion_tokens
        adapter = adapter_for_model(body.model, self.model_name)
        top = body.top_logprobs or 0
        if body.top_logprobs is not None:
            if body.top_logprobs and not body.logprobs:
                raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
            _check_count("top_logprobs", body.top_logprobs)
        if body.prompt_logprobs is not None:
            _check_count("prompt_logprobs", body.prompt_logprobs)
        request = _core_request(
            body,
            adapter,
            max_tokens,
            messages=tuple(messages),
            logprobs=bool(body.logprobs),
            top_logprobs=top if body.logprobs else 0,
            prompt_logprobs=body.prompt_logprobs,
        )
        if tool_fields.get("grammar") is not None and request.grammar is not None:
            raise FieldError(
                "tool_choice", f"tool_choice {body.tool_choice!r} and {request.grammar.param} both constrain"
            )
        request = dataclasses.replace(request, **tool_fields)
        n, sequences = self._sequences(body, None)
        model = body.model or self.model_name
        return _Plan(
            (request,),
            _names(max_tokens_field),
            model,
            True,
            logprobs=bool(body.logprobs),
            top_logprobs=top,
            n=n,
            sequences=sequences,
            prompt_logprobs=body.prompt_logprobs,
            tools=tools,
        )

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
        groups: list[list[Generation]] = []
        try:
            plan = make_plan()
            tenant = request.headers.get(TENANT_HEADER)  # checked by the core like any tenant name
            groups = await self._until_disconnect(
                request, self._submit(plan, request_id, self._deadline(request), tenant)
            )
            generations = [generation for group in groups for generation in group]
            if stream:
                # The first outputs are awaited here, so that a request the engine fails at once is answered
                # with its HTTP status rather than inside a 200 stream.
                firsts = await self._until_disconnect(request, asyncio.gather(*map(_next, generations)))
                include_usage = stream_options is not None and stream_options.include_usage
                events = self._events(plan, request_id, groups, list(firsts), include_usage)
                response, groups = _EventStream(events, generations, headers), []  # the stream closes them
                return response
            await self._until_disconnect(request, asyncio.gather(*(g.collect() for g in generations)))
            if any(generation.timed_out for generation in generations):
                raise TimeoutError
            return JSONResponse(self._answer(plan, request_id, groups), headers=headers)
        except _ClientGone:
            return error_response(499, "the client closed the connection; the request was cancelled")
        except Exception as err:
            status, body = self.error(err, plan)
            retry_after = getattr(err, "retry_after", None)  # a CapacityError's hint
            if retry_after:
                headers["retry-after"] = str(math.ceil(retry_after))
            return JSONResponse({"error": body}, status_code=status, headers=headers)
        finally:
            for group in groups:
                for generation in group:
                    generation.close()

    async def _submit(
        self, plan: _Plan, request_id: str, deadline: float | None, tenant: str | None = None
    ) -> list[list[Generation]]:
        """Every prompt's sequences, submitted together; if one prompt is refused, the others are cancelled."""
        ranked = plan.sequences > plan.n  # best_of ranks the sequences by their log-probability
        requests = [
            dataclasses.replace(
                core_request,
                request_id=request_id if len(plan.requests) == 1 else f"{request_id}-{index}",
                deadline=deadline,
                logprobs=core_request.logprobs or ranked,
                tenant=core_request.tenant if tenant is None else tenant,
            )
            for index, core_request in enumerate(plan.requests)
        ]
        submitted = [self.core.submit_sequences(r, plan.names, plan.sequences) for r in requests]
        results = await asyncio.gather(*submitted, return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for result in results:
                for generation in [] if isinstance(result, BaseException) else result:
                    generation.close()
            raise failure
        return list(results)

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

    def _token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self._token_texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    def _logprobs(
        self,
        plan: _Plan,
        token_ids: list[int],
        logprobs: list[float],
        top: list[list[tuple[int, float]]],
        offset: int,
        prompt: list[TokenLogprob] | None = None,
    ) -> Any:
        """The logprobs object of a choice (or of one streamed chunk) in the endpoint's own shape; `prompt`: the
        scored prompt tokens that an echo puts first."""
        if not plan.logprobs:
            return None
        tops = top if plan.top_logprobs else [[] for _ in token_ids]
        if plan.chat:
            content = []
            for token_id, logprob, most_likely in zip(token_ids, logprobs, tops, strict=True):
                entry = self._token_entry(token_id, logprob)
                entry["top_logprobs"] = [self._token_entry(t, value) for t, value in most_likely]
                content.append(entry)
            return {"content": content, "refusal": None}
        positions = [(p.token_id, p.logprob, p.top) for p in prompt or []]
        positions += list(zip(token_ids, logprobs, tops, strict=True))
        texts, offsets, top_entries = [], [], []
        for token_id, logprob, most_likely in positions:
            text = self._token_texts(token_id)[0]
            texts.append(text)
            offsets.append(offset)
            offset += len(text)
            if logprob is None:  # the prompt's first token: nothing predicts it
                top_entries.append(None)
                continue
            # vLLM's legacy shape: the most likely tokens by text, and the chosen one among them
            entries = {self._token_texts(t)[0]: value for t, value in most_likely[: plan.top_logprobs]}
            entries.setdefault(text, logprob)
            top_entries.append(entries)
        return {
            "tokens": texts,
            "token_logprobs": [logprob for _, logprob, _ in positions],
            "top_logprobs": top_entries,
            "text_offset": offsets,
        }

    def _prompt_logprobs(self, scored: list[TokenLogprob] | None) -> list[Any] | None:
        """vLLM's prompt_logprobs: per prompt token None (the first) or {id: {logprob, rank, decoded_token}}."""
        if scored is None:
            return None
        entries: list[Any] = []
        for position in scored:
            if position.logprob is None:
                entries.append(None)
                continue
            ranks = {token: rank for rank, (token, _) in enumerate(position.top, start=1)}
            entry = {
                str(t): {"logprob": value, "rank": ranks[t], "decoded_token": self._token_texts(t)[0]}
                for t, value in position.top
            }
            entry.setdefault(
                str(position.token_id),
                {
                    "logprob": position.logprob,
                    "rank": position.rank,
                    "decoded_token": self._token_texts(position.token_id)[0],
                },
            )
            entries.append(entry)
        return entries

    def _chosen(self, plan: _Plan, group: list[Generation]) -> list[Generation]:
        """A prompt's n choices: with best_of, the n sequences of highest cumulative log-probability."""
        if plan.sequences == plan.n:
            return group
        return sorted(group, key=lambda generation: generation.cumulative_logprob, reverse=True)[: plan.n]

    def _prompt_text(self, plan: _Plan, index: int, generation: Generation) -> str:
        given = plan.requests[index].prompt
        return given if given else self.core.tokenizer.decode(generation.prompt_ids)

    def _choice(self, plan: _Plan, index: int, prompt_index: int, generation: Generation, scored) -> dict[str, Any]:
        finish_reason, stop_reason = _finish(generation.last)
        prompt = scored if plan.echo else None
        logprobs = self._logprobs(plan, generation.token_ids, generation.logprobs, generation.top_logprobs, 0, prompt)
        if plan.chat:
            message: dict[str, Any] = {"role": "assistant", "content": generation.text, "refusal": None}
            if plan.tools is not None:
                text, calls = structured.parse_reply(generation.text, plan.tools)
                if calls:
                    message.update(content=text, tool_calls=calls)
                    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            content = {"message": message}
        else:
            echo = self._prompt_text(plan, prompt_index, generation) if plan.echo else ""
            content = {"text": echo + generation.text}
        choice = {"index": index, **content, "logprobs": logprobs, "finish_reason": finish_reason}
        choice["stop_reason"] = stop_reason
        if plan.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(scored)
        return choice

    def _answer(self, plan: _Plan, request_id: str, groups: list[list[Generation]]) -> dict[str, Any]:
        """The answer object: per prompt its n choices, indexed prompt by prompt."""
        choices = []
        for prompt_index, group in enumerate(groups):
            scored = group[0].prompt_logprobs  # the prompt is scored once, by its first sequence
            for generation in self._chosen(plan, group):
                choices.append(self._choice(plan, len(choices), prompt_index, generation, scored))
        return {
            "id": f"{'chatcmpl' if plan.chat else 'cmpl'}-{request_id}",
            "object": "chat.completion" if plan.chat else "text_completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": choices,
            "usage": _usage([group[0] for group in groups], [g for group in groups for g in group]),
        }

    async def _events(
        self,
        plan: _Plan,
        request_id: str,
        groups: list[list[Generation]],
        firsts: list[RequestOutput],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """The SSE stream: chunks of every choice as their outputs arrive (each names its choice index), the
        finishes, the usage chunk if asked for, `[DONE]`. A failure after the first byte becomes an error event."""
        chat = plan.chat
        envelope = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": plan.model,
        }
        if include_usage:
            envelope["usage"] = None
        generations = [generation for group in groups for generation in group]
        prompt_of = [index for index, group in enumerate(groups) for _ in group]

        def chunk(index: int, **choice: Any) -> str:
            return _sse({**envelope, "choices": [{"index": index, **choice}]})

        offsets = [0] * len(generations)
        held = [""] * len(generations)  # chat with tools: a reply is parsed whole, so its text is held to the end
        echoed = [not plan.echo or chat] * len(generations)
        try:
            if chat:
                for index in range(len(generations)):
                    yield chunk(index, delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None)
            async for index, output in merged_outputs(generations, firsts):
                finish_reason, stop_reason = _finish(output)
                text, scored = output.text, None
                if not echoed[index]:  # a choice's first chunk: the prompt, then what was generated
                    echoed[index] = True
                    text = self._prompt_text(plan, prompt_of[index], generations[index]) + text
                    scored = groups[prompt_of[index]][0].prompt_logprobs
                top = output.top_logprobs
                logprobs = self._logprobs(plan, output.token_ids, output.logprobs, top, offsets[index], scored)
                advanced = [p.token_id for p in scored or []] + output.token_ids
                offsets[index] += sum(len(self._token_texts(token_id)[0]) for token_id in advanced)
                if not chat:
                    if text or (logprobs and advanced) or finish_reason:
                        yield chunk(
                            index, text=text, logprobs=logprobs, finish_reason=finish_reason, stop_reason=stop_reason
                        )
                    continue
                if plan.tools is not None:
                    held[index] += output.text
                    if not output.finished:
                        continue
                    text, calls = structured.parse_reply(held[index], plan.tools)
                    if calls:
                        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
                        deltas = [{**call, "index": i} for i, call in enumerate(calls)]
                        yield chunk(index, delta={"tool_calls": deltas}, logprobs=None, finish_reason=None)
                    elif text:
                        yield chunk(index, delta={"content": text}, logprobs=None, finish_reason=None)
                elif output.text or (logprobs and output.token_ids):
                    yield chunk(index, delta={"content": output.text}, logprobs=logprobs, finish_reason=None)
                if output.finished:
                    yield chunk(index, delta={}, logprobs=None, finish_reason=finish_reason, stop_reason=stop_reason)
            if include_usage:
                usage = _usage([group[0] for group in groups], generations)
                yield _sse({**envelope, "choices": [], "usage": usage})
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
