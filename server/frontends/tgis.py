"""The TGIS-compatible gRPC front door: IBM TGIS's `fmaas.GenerationService` (protos/fmaas/generation.proto,
with vllm-tgis-adapter's `adapter_id`) on the same port as deltaserve.v1.

A thin translation layer. Each TGIS prompt becomes one protocol-neutral `GenerationRequest` and runs through
`FrontDoorCore.submit`: the same validation, adapter acquisition, engine, batches and error statuses as the
native API. What this module adds is only what TGIS defines and the native API does not: prompt truncation,
a time limit, the stop string kept in the text, TGIS's stop reasons and its response shape. Field by field
mapping, and what is refused: docs/tgis.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass
from typing import Any

from deltaserve.client.fmaas import generation_pb2 as tgis
from deltaserve.client.fmaas import generation_pb2_grpc as tgis_grpc
from deltaserve.server.engine.grammar import GrammarKind, GrammarSpec
from deltaserve.server.engine.request import FinishReason, RequestOutput, TokenLogprob
from deltaserve.server.engine.sampling import MAX_TOP_LOGPROBS
from deltaserve.server.errors import InvalidRequestError
from deltaserve.server.frontends.core import (
    AdapterRef,
    Field,
    FieldError,
    FieldNames,
    FrontDoorCore,
    Generation,
    GenerationRequest,
)
from deltaserve.server.frontends.grpc_api import _stream_errors, _unary_errors, request_id

# TGIS's names for the canonical fields its parameters carry; the others are named alike.
TGIS_NAMES: FieldNames = {Field.PROMPT: "text", Field.STOP: "stop_sequences"}

# TGIS keeps the matched stop sequence at the end of the text unless the request says otherwise
# (vllm-tgis-adapter's --default-include-stop-seqs defaults to true as well).
DEFAULT_INCLUDE_STOP_SEQUENCE = True
MAX_BATCH = 128  # prompts in one Generate or Tokenize call: a bigger batch would crowd out other tenants

_STOP_REASON = {
    FinishReason.EOS: tgis.EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: tgis.STOP_SEQUENCE,
    FinishReason.CANCELLED: tgis.CANCELLED,
    FinishReason.ABORTED: tgis.CANCELLED,  # the server shut down before the request finished
}


def adapter_id(request: tgis.BatchedGenerationRequest | tgis.SingleGenerationRequest) -> str:
    """The adapter a TGIS request names: `adapter_id`, or its older name `prefix_id`; empty means the base."""
    given = {name: getattr(request, name) for name in ("adapter_id", "prefix_id") if request.HasField(name)}
    if len(set(given.values())) > 1:
        raise InvalidRequestError(
            f"adapter_id {given['adapter_id']!r} and prefix_id {given['prefix_id']!r} differ; give one "
            "(prefix_id is the older name of adapter_id)"
        )
    return next(iter(given.values()), "")


@dataclass(frozen=True)
class Plan:
    """TGIS `Parameters`, checked and translated; shared by every prompt of a batched request."""

    template: GenerationRequest  # the sampling and stopping fields; prompt, adapter and seed are set per prompt
    max_new_tokens: int  # what the request asks for (the server's default if it leaves it 0)
    sampling: bool  # SAMPLE with a temperature > 0: each prompt gets a seed (drawn if not given), reported back
    include_stop_sequence: bool
    time_limit: float | None  # seconds
    options: tgis.ResponseOptions


def plan(params: tgis.Parameters, default_max_new_tokens: int) -> Plan:
    """Translate TGIS parameters onto a native request, refusing (InvalidRequestError) what is invalid or not
    served here. The core still validates the values it shares with deltaserve.v1."""
    if params.method not in (tgis.GREEDY, tgis.SAMPLE):
        raise InvalidRequestError(f"params.method {params.method} is neither GREEDY (0) nor SAMPLE (1)")
    _refuse_unserved(params)
    sampling_params = params.sampling
    temperature = 0.0
    if params.method == tgis.SAMPLE:
        temperature = sampling_params.temperature if sampling_params.HasField("temperature") else 1.0
    sampling = temperature != 0.0
    stopping = params.stopping
    max_new_tokens = stopping.max_new_tokens or default_max_new_tokens
    if stopping.min_new_tokens > max_new_tokens:
        raise InvalidRequestError(
            f"min_new_tokens ({stopping.min_new_tokens}) must be <= max_new_tokens ({max_new_tokens})"
        )
    if not all(stopping.stop_sequences):
        raise InvalidRequestError("stop_sequences must not contain an empty string")
    seed = sampling_params.seed if sampling and sampling_params.HasField("seed") else None
    template = GenerationRequest(
        # As TGIS does, max_new_tokens is capped at the room the context has left (the request then ends with
        # TOKEN_LIMIT), after the prompt is truncated to its last truncate_input_tokens tokens.
        max_new_tokens=max_new_tokens,
        fit_max_new_tokens=True,
        truncate_prompt_tokens=params.truncate_input_tokens,
        min_new_tokens=stopping.min_new_tokens,
        temperature=temperature,
        top_k=sampling_params.top_k if sampling else 0,
        top_p=(sampling_params.top_p or 1.0) if sampling else 1.0,  # TGIS: 0 disables
        seed=seed,
        repetition_penalty=params.decoding.repetition_penalty or 1.0,  # TGIS: 0 means none
        stop=tuple(stopping.stop_sequences),
        grammar=_guided(params.decoding),
        **_logprob_fields(params.response),
    )
    include_stop = (
        stopping.include_stop_sequence if stopping.HasField("include_stop_sequence") else DEFAULT_INCLUDE_STOP_SEQUENCE
    )
    return Plan(
        template=template,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        include_stop_sequence=include_stop,
        time_limit=stopping.time_limit_millis / 1000 if stopping.time_limit_millis else None,
        options=params.response,
    )


def _logprob_fields(options: tgis.ResponseOptions) -> dict[str, Any]:
    """What the listed tokens need computed: generated ones their log-probability and top n, input ones the
    scored prompt."""
    scores = options.token_logprobs or options.top_n_tokens > 0
    fields: dict[str, Any] = {}
    if options.generated_tokens and scores:
        fields.update(logprobs=True, top_logprobs=options.top_n_tokens)
    if options.input_tokens and scores:
        fields["prompt_logprobs"] = options.top_n_tokens
    return fields


def _refuse_unserved(params: tgis.Parameters) -> None:
    """TGIS parameters this server cannot honour are refused by name rather than silently ignored."""
    options = params.response
    if (options.token_logprobs or options.token_ranks or options.top_n_tokens) and not (
        options.generated_tokens or options.input_tokens
    ):
        raise InvalidRequestError(
            "token_logprobs, token_ranks and top_n_tokens need generated_tokens and/or input_tokens"
        )
    if options.token_ranks:
        raise InvalidRequestError("token_ranks is not supported by this server (token_logprobs and top_n_tokens are)")
    if options.top_n_tokens > MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"top_n_tokens must be in [0, {MAX_TOP_LOGPROBS}], got {options.top_n_tokens}")
    typical_p = params.sampling.typical_p
    if params.method == tgis.SAMPLE and typical_p not in (0.0, 1.0):  # TGIS applies it only when sampling
        if not 0.0 < typical_p < 1.0:
            raise InvalidRequestError(f"typical_p must be in (0, 1] (0 disables), got {typical_p}")
        raise InvalidRequestError("typical_p (typical decoding) is not supported by this server; leave it 0")
    if params.decoding.HasField("length_penalty"):
        raise InvalidRequestError("length_penalty is not supported by this server")


def _guided(decoding: tgis.DecodingParameters) -> GrammarSpec | None:
    """DecodingParameters' guided oneof as the core's grammar (docs/structured.md); format TEXT is none."""
    guided = decoding.WhichOneof("guided")
    param = f"decoding.{guided}"
    if guided is None or (guided == "format" and decoding.format == tgis.DecodingParameters.TEXT):
        return None
    if guided == "format":
        return GrammarSpec(GrammarKind.JSON_OBJECT, param=param)
    if guided == "choice":
        return GrammarSpec(GrammarKind.CHOICE, choices=tuple(decoding.choice.choices), param=param)
    kind = {"json_schema": GrammarKind.JSON_SCHEMA, "regex": GrammarKind.REGEX, "grammar": GrammarKind.GRAMMAR}[guided]
    return GrammarSpec(kind, getattr(decoding, guided), param=param)


@dataclass
class _Prompt:
    """One prompt's generation: what it asked for and, once submitted, its Generation."""

    text: str
    plan: Plan
    request: GenerationRequest
    generation: Generation | None = None
    expired_before_submission: bool = False  # the time limit passed while its adapter was brought in

    @property
    def prompt_ids(self) -> list[int]:
        return self.generation.prompt_ids if self.generation is not None else []

    @property
    def timed_out(self) -> bool:
        return self.expired_before_submission or (self.generation is not None and self.generation.timed_out)

    @property
    def last(self) -> RequestOutput | None:
        return self.generation.last if self.generation is not None else None

    @property
    def generated_tokens(self) -> int:
        return self.generation.generated_tokens if self.generation is not None else 0

    def stop_reason(self, output: RequestOutput | None) -> int:
        if self.timed_out:
            return tgis.TIME_LIMIT
        if output is None or output.finish_reason is None:
            return tgis.NOT_FINISHED
        if output.finish_reason is FinishReason.LENGTH:
            # Fewer tokens than asked for: the context filled up first.
            return tgis.MAX_TOKENS if output.generated_tokens >= self.plan.max_new_tokens else tgis.TOKEN_LIMIT
        return _STOP_REASON[output.finish_reason]


class TgisGenerationService(tgis_grpc.GenerationServiceServicer):
    """`fmaas.GenerationService` over the front-door core (same engine, registry and validation as deltaserve.v1)."""

    def __init__(self, core: FrontDoorCore) -> None:
        self.core = core
        self.tokenizer = core.tokenizer

    # ---- generation --------------------------------------------------------------------------------------
    @staticmethod
    def _prompt(text: str, adapter: str, prompt_plan: Plan, where: str, rid: str) -> _Prompt:
        if not text:
            raise InvalidRequestError(f"{where}.text is empty")
        seed = prompt_plan.template.seed
        if prompt_plan.sampling and seed is None:
            seed = secrets.randbits(63)  # drawn here rather than by the engine, so it can be reported
        deadline = (
            None if prompt_plan.time_limit is None else asyncio.get_running_loop().time() + prompt_plan.time_limit
        )
        request = dataclasses.replace(
            prompt_plan.template,
            prompt=text,
            adapter=AdapterRef(adapter_id=adapter),
            seed=seed,
            request_id=rid,
            deadline=deadline,
        )
        return _Prompt(text, prompt_plan, request)

    async def _submit(self, prompt: _Prompt) -> Generation | None:
        """Submit the prompt; None if its time limit passed before it could be (it then ends with TIME_LIMIT)."""
        try:
            prompt.generation = await self.core.submit(prompt.request, TGIS_NAMES)
        except TimeoutError:
            prompt.expired_before_submission = True
        return prompt.generation

    async def _generate_one(self, prompt: _Prompt) -> tgis.GenerationResponse:
        generation = await self._submit(prompt)
        if generation is not None:
            with generation:
                await generation.collect()
        last = prompt.last
        response = self._input_details(prompt, generation.prompt_logprobs if generation is not None else None)
        response.text += (generation.text if generation is not None else "") + self._kept_stop(prompt, last)
        response.generated_token_count = prompt.generated_tokens
        response.stop_reason = prompt.stop_reason(last)
        response.stop_sequence = (last.stop_sequence or "") if last is not None else ""
        if prompt.plan.options.generated_tokens and generation is not None:
            response.tokens.extend(
                self._token_infos(
                    prompt.plan.options, generation.token_ids, generation.logprobs, generation.top_logprobs
                )
            )
        return response

    @_unary_errors
    async def Generate(self, request, context):
        adapter = adapter_id(request)
        prompt_plan = plan(request.params, self.core.default_max_new_tokens)
        _check_batch(len(request.requests))
        rid = request_id(context)
        rids = [rid] if len(request.requests) == 1 else [f"{rid}-{i}" for i in range(len(request.requests))]
        prompts = [
            self._prompt(item.text, adapter, prompt_plan, f"requests[{i}]", rids[i])
            for i, item in enumerate(request.requests)
        ]
        try:
            async with asyncio.TaskGroup() as group:  # a failure cancels the batch's other prompts
                tasks = [group.create_task(self._generate_one(p)) for p in prompts]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return tgis.BatchedGenerationResponse(responses=[task.result() for task in tasks])

    @_stream_errors
    async def GenerateStream(self, request, context):
        prompt_plan = plan(request.params, self.core.default_max_new_tokens)
        prompt = self._prompt(request.request.text, adapter_id(request), prompt_plan, "request", request_id(context))
        first = True
        generation = await self._submit(prompt)
        if generation is not None:
            with generation:
                async for output in generation:
                    if first:  # the input details, once the prompt is tokenized and admitted
                        first = False
                        yield self._input_details(prompt, output.prompt_logprobs)
                    if output.token_ids or output.finished:
                        yield self._stream_message(prompt, output)
        if prompt.timed_out:
            if first:
                yield self._input_details(prompt)
            yield tgis.GenerationResponse(generated_token_count=prompt.generated_tokens, stop_reason=tgis.TIME_LIMIT)

    def _stream_message(self, prompt: _Prompt, output: RequestOutput) -> tgis.GenerationResponse:
        response = tgis.GenerationResponse(
            text=output.text + self._kept_stop(prompt, output),
            generated_token_count=output.generated_tokens,
            stop_reason=prompt.stop_reason(output),
            stop_sequence=output.stop_sequence or "",
        )
        if prompt.plan.options.generated_tokens:
            response.tokens.extend(
                self._token_infos(prompt.plan.options, output.token_ids, output.logprobs, output.top_logprobs)
            )
        return response

    def _input_details(self, prompt: _Prompt, scored: list[TokenLogprob] | None = None) -> tgis.GenerationResponse:
        options = prompt.plan.options
        response = tgis.GenerationResponse(input_token_count=len(prompt.prompt_ids))
        if options.input_text:
            response.text = prompt.text
        if options.input_tokens:
            infos = [tgis.TokenInfo(text=text) for text in self.tokenizer.convert_ids_to_tokens(prompt.prompt_ids)]
            for info, position in zip(infos, scored or (), strict=False):
                if options.token_logprobs and position.logprob is not None:
                    info.logprob = position.logprob  # TGIS leaves the first input token's logprob unset (NaN)
                info.top_tokens.extend(self._top_tokens(position.top))
            if options.token_logprobs and scored:
                infos[0].logprob = float("nan")
            response.input_tokens.extend(infos)
        if prompt.plan.sampling:
            response.seed = prompt.request.seed
        return response

    def _top_tokens(self, top: list[tuple[int, float]]) -> list[tgis.TokenInfo.TopToken]:
        texts = self.tokenizer.convert_ids_to_tokens([token for token, _ in top])
        return [tgis.TokenInfo.TopToken(text=text, logprob=value) for text, (_, value) in zip(texts, top, strict=True)]

    def _token_infos(
        self,
        options: tgis.ResponseOptions,
        token_ids: list[int],
        logprobs: list[float],
        top: list[list[tuple[int, float]]],
    ) -> list[tgis.TokenInfo]:
        infos = [tgis.TokenInfo(text=text) for text in self.tokenizer.convert_ids_to_tokens(token_ids)]
        if options.token_logprobs:
            for info, logprob in zip(infos, logprobs, strict=True):
                info.logprob = logprob
        if options.top_n_tokens:
            for info, entries in zip(infos, top, strict=True):
                info.top_tokens.extend(self._top_tokens(entries))
        return infos

    @staticmethod
    def _kept_stop(prompt: _Prompt, output: RequestOutput | None) -> str:
        """The matched stop sequence, which TGIS keeps at the end of the text (the engine cuts it off)."""
        if output is None or output.finish_reason is not FinishReason.STOP_SEQUENCE:
            return ""
        return (output.stop_sequence or "") if prompt.plan.include_stop_sequence else ""

    # ---- tokenize and model info -------------------------------------------------------------------------
    @_unary_errors
    async def Tokenize(self, request, context):
        self.core.require_servable(adapter_id(request))
        _check_batch(len(request.requests))
        responses = await asyncio.to_thread(lambda: [self._tokenize(item.text, request) for item in request.requests])
        return tgis.BatchedTokenizeResponse(responses=responses)

    def _tokenize(self, text: str, request: tgis.BatchedTokenizeRequest) -> tgis.TokenizeResponse:
        # Tokenized exactly as a Generate prompt is (tokenizer(text), special tokens included).
        try:
            encoded = self.tokenizer(text, return_offsets_mapping=request.return_offsets)
        except NotImplementedError as err:  # a slow (Python) tokenizer has no offsets
            raise InvalidRequestError(f"return_offsets is not available with this model's tokenizer: {err}") from err
        ids = list(encoded["input_ids"])
        keep = len(ids)
        if 0 < request.truncate_input_tokens < keep:
            keep = request.truncate_input_tokens
        response = tgis.TokenizeResponse(token_count=keep)
        if request.return_tokens:
            response.tokens.extend(self.tokenizer.convert_ids_to_tokens(ids[len(ids) - keep :]))
        if request.return_offsets:
            spans = encoded["offset_mapping"][len(ids) - keep :]
            response.offsets.extend(tgis.TokenizeResponse.Offset(start=start, end=end) for start, end in spans)
        return response

    @_unary_errors
    async def ModelInfo(self, request, context):
        # model_id is not checked: one model is served, as in a single-model TGIS deployment.
        return tgis.ModelInfoResponse(
            model_kind=tgis.ModelInfoResponse.DECODER_ONLY,
            max_sequence_length=self.core.max_seq_len,
            max_new_tokens=self.core.max_seq_len - 1,  # at least one prompt token
        )


def _check_batch(size: int) -> None:
    if size > MAX_BATCH:
        raise FieldError("requests", f"requests: at most {MAX_BATCH} prompts in one call, got {size}")
