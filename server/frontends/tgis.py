"""The TGIS-compatible gRPC front door: IBM TGIS's `fmaas.GenerationService` (protos/fmaas/generation.proto,
with vllm-tgis-adapter's `adapter_id`) on the same port as deltaserve.v1.

A thin translation layer. Each TGIS prompt becomes one native `GenerateRequest` and runs through
`GenerationService.run`: the same validation, adapter acquisition, engine, batches and error statuses as the
native API. What this module adds is only what TGIS defines and the native API does not: prompt truncation,
a time limit, the stop string kept in the text, TGIS's stop reasons and its response shape. Field by field
mapping, and what is refused: docs/tgis.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from deltaserve.client.fmaas import generation_pb2 as tgis
from deltaserve.client.fmaas import generation_pb2_grpc as tgis_grpc
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.server.engine.request import FinishReason, Request, RequestOutput
from deltaserve.server.engine.sampling import SamplingParams
from deltaserve.server.errors import AdapterNotFoundError, InvalidRequestError
from deltaserve.server.frontends.grpc_api import (
    GenerationService,
    RequestBuilder,
    _stream_errors,
    _unary_errors,
    request_id,
)
from deltaserve.server.residency.registry import AdapterState

# TGIS keeps the matched stop sequence at the end of the text unless the request says otherwise
# (vllm-tgis-adapter's --default-include-stop-seqs defaults to true as well).
DEFAULT_INCLUDE_STOP_SEQUENCE = True

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

    native: pb.GenerateRequest  # the sampling and stopping fields; prompt and max_new_tokens are per prompt
    max_new_tokens: int  # what the request asks for (the server's default if it leaves it 0)
    sampling: bool  # SAMPLE with a temperature > 0: each prompt gets a seed (drawn if not given), reported back
    include_stop_sequence: bool
    time_limit: float | None  # seconds
    truncate_input_tokens: int
    options: tgis.ResponseOptions


def plan(params: tgis.Parameters, default_max_new_tokens: int) -> Plan:
    """Translate TGIS parameters onto a native request, refusing (InvalidRequestError) what is invalid or not
    served here. The native RequestBuilder still validates the values it shares with deltaserve.v1."""
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
    native = pb.GenerateRequest(
        min_new_tokens=stopping.min_new_tokens,
        temperature=temperature,
        stop=list(stopping.stop_sequences),
        logprobs=params.response.token_logprobs,
    )
    if sampling:
        native.top_k = sampling_params.top_k
        native.top_p = sampling_params.top_p or 1.0  # TGIS: 0 disables
        if sampling_params.HasField("seed"):
            native.seed = sampling_params.seed
    if params.decoding.repetition_penalty:  # TGIS: 0 means none
        native.repetition_penalty = params.decoding.repetition_penalty
    include_stop = (
        stopping.include_stop_sequence if stopping.HasField("include_stop_sequence") else DEFAULT_INCLUDE_STOP_SEQUENCE
    )
    return Plan(
        native=native,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        include_stop_sequence=include_stop,
        time_limit=stopping.time_limit_millis / 1000 if stopping.time_limit_millis else None,
        truncate_input_tokens=params.truncate_input_tokens,
        options=params.response,
    )


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
        raise InvalidRequestError("token_ranks is not supported by this server (token_logprobs is)")
    if options.top_n_tokens:
        raise InvalidRequestError("top_n_tokens is not supported by this server; leave it 0")
    if options.input_tokens and options.token_logprobs:
        raise InvalidRequestError(
            "logprobs of input tokens are not supported by this server (the prompt is not scored); "
            "token_logprobs works with generated_tokens only"
        )
    typical_p = params.sampling.typical_p
    if params.method == tgis.SAMPLE and typical_p not in (0.0, 1.0):  # TGIS applies it only when sampling
        if not 0.0 < typical_p < 1.0:
            raise InvalidRequestError(f"typical_p must be in (0, 1] (0 disables), got {typical_p}")
        raise InvalidRequestError("typical_p (typical decoding) is not supported by this server; leave it 0")
    if params.decoding.HasField("length_penalty"):
        raise InvalidRequestError("length_penalty is not supported by this server")
    guided = params.decoding.WhichOneof("guided")
    if guided is not None and not (guided == "format" and params.decoding.format == tgis.DecodingParameters.TEXT):
        raise InvalidRequestError(f"guided decoding ({guided}) is not supported by this server")


@dataclass
class _Prompt:
    """One prompt's generation: what `run` was given and what it produced so far."""

    text: str
    plan: Plan
    native: pb.GenerateRequest
    prompt_ids: list[int] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)
    timed_out: bool = False

    def build(self, builder: RequestBuilder, extra_positions: int) -> tuple[list[int], SamplingParams]:
        """Tokenize, truncate (TGIS keeps the last tokens) and cap max_new_tokens at the room the context has
        left, as TGIS does (the request then ends with TOKEN_LIMIT), then the native checks."""
        ids = builder.prompt_ids(self.text, (), "text")
        truncate = self.plan.truncate_input_tokens
        if 0 < truncate < len(ids):
            ids = ids[-truncate:]
        room = builder.max_seq_len - len(ids) - extra_positions
        self.native.max_new_tokens = max(1, min(self.plan.max_new_tokens, room))
        self.prompt_ids = ids
        return builder.build_from_ids(ids, self.native, extra_positions)

    @property
    def generated_tokens(self) -> int:
        return self.outputs[-1].generated_tokens if self.outputs else 0

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
    """`fmaas.GenerationService` over the native GenerationService (same engine, registry and validation)."""

    def __init__(self, generation: GenerationService) -> None:
        self.generation = generation
        self.builder = generation.builder
        self.tokenizer = generation.builder.tokenizer

    # ---- generation --------------------------------------------------------------------------------------
    def _prompt(self, text: str, adapter: str, prompt_plan: Plan, where: str) -> _Prompt:
        if not text:
            raise InvalidRequestError(f"{where}.text is empty")
        native = pb.GenerateRequest()
        native.CopyFrom(prompt_plan.native)
        native.adapter_id = adapter
        if prompt_plan.sampling and not native.HasField("seed"):
            native.seed = secrets.randbits(63)  # drawn here rather than by the engine, so it can be reported
        return _Prompt(text, prompt_plan, native)

    async def _outputs(
        self, prompt: _Prompt, rid: str, deadline: float | None
    ) -> AsyncIterator[tuple[RequestOutput, Request]]:
        """The engine outputs of one prompt until it finishes or the deadline passes (then the request is
        cancelled, and `prompt.timed_out` set)."""
        outputs = self.generation.run(prompt.native, rid, lambda extra: prompt.build(self.builder, extra))
        async with contextlib.aclosing(outputs):
            while True:
                time_limit = asyncio.timeout_at(deadline)
                try:
                    async with time_limit:
                        output, engine_request = await anext(outputs)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not time_limit.expired():
                        raise
                    prompt.timed_out = True
                    return
                prompt.outputs.append(output)
                yield output, engine_request

    async def _generate_one(self, prompt: _Prompt, rid: str, deadline: float | None) -> tgis.GenerationResponse:
        async for _ in self._outputs(prompt, rid, deadline):
            pass
        outputs = prompt.outputs
        last = outputs[-1] if outputs else None
        response = self._input_details(prompt)
        response.text += "".join(output.text for output in outputs) + self._kept_stop(prompt, last)
        response.generated_token_count = prompt.generated_tokens
        response.stop_reason = prompt.stop_reason(last)
        response.stop_sequence = (last.stop_sequence or "") if last is not None else ""
        if prompt.plan.options.generated_tokens:
            response.tokens.extend(self._token_infos(outputs, prompt.plan.options.token_logprobs))
        return response

    @_unary_errors
    async def Generate(self, request, context):
        adapter = adapter_id(request)
        prompt_plan = plan(request.params, self.builder.default_max_new_tokens)
        prompts = [
            self._prompt(item.text, adapter, prompt_plan, f"requests[{i}]") for i, item in enumerate(request.requests)
        ]
        rid = request_id(context)
        deadline = self._deadline(prompt_plan)
        rids = [rid] if len(prompts) == 1 else [f"{rid}-{i}" for i in range(len(prompts))]
        try:
            async with asyncio.TaskGroup() as group:  # a failure cancels the batch's other prompts
                tasks = [
                    group.create_task(self._generate_one(p, r, deadline)) for p, r in zip(prompts, rids, strict=True)
                ]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return tgis.BatchedGenerationResponse(responses=[task.result() for task in tasks])

    @_stream_errors
    async def GenerateStream(self, request, context):
        prompt_plan = plan(request.params, self.builder.default_max_new_tokens)
        prompt = self._prompt(request.request.text, adapter_id(request), prompt_plan, "request")
        first = True
        async for output, _ in self._outputs(prompt, request_id(context), self._deadline(prompt_plan)):
            if first:  # the input details, once the prompt is tokenized and admitted
                first = False
                yield self._input_details(prompt)
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
            response.tokens.extend(self._token_infos([output], prompt.plan.options.token_logprobs))
        return response

    def _input_details(self, prompt: _Prompt) -> tgis.GenerationResponse:
        options = prompt.plan.options
        response = tgis.GenerationResponse(input_token_count=len(prompt.prompt_ids))
        if options.input_text:
            response.text = prompt.text
        if options.input_tokens:
            response.input_tokens.extend(
                tgis.TokenInfo(text=text) for text in self.tokenizer.convert_ids_to_tokens(prompt.prompt_ids)
            )
        if prompt.plan.sampling:
            response.seed = prompt.native.seed
        return response

    def _token_infos(self, outputs: list[RequestOutput], logprobs: bool) -> list[tgis.TokenInfo]:
        ids = [token for output in outputs for token in output.token_ids]
        infos = [tgis.TokenInfo(text=text) for text in self.tokenizer.convert_ids_to_tokens(ids)]
        if logprobs:
            for info, logprob in zip(infos, [lp for output in outputs for lp in output.logprobs], strict=True):
                info.logprob = logprob
        return infos

    @staticmethod
    def _kept_stop(prompt: _Prompt, output: RequestOutput | None) -> str:
        """The matched stop sequence, which TGIS keeps at the end of the text (the engine cuts it off)."""
        if output is None or output.finish_reason is not FinishReason.STOP_SEQUENCE:
            return ""
        return (output.stop_sequence or "") if prompt.plan.include_stop_sequence else ""

    @staticmethod
    def _deadline(prompt_plan: Plan) -> float | None:
        if prompt_plan.time_limit is None:
            return None
        return asyncio.get_running_loop().time() + prompt_plan.time_limit

    # ---- tokenize and model info -------------------------------------------------------------------------
    @_unary_errors
    async def Tokenize(self, request, context):
        adapter = adapter_id(request)
        if adapter and not any(
            r.adapter_id == adapter and r.state not in (AdapterState.LOADING, AdapterState.UNLOADING)
            for r in self.generation.engine.registry.list()
        ):
            raise AdapterNotFoundError(f"adapter {adapter!r} is not loaded")
        return tgis.BatchedTokenizeResponse(responses=[self._tokenize(item.text, request) for item in request.requests])

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
            max_sequence_length=self.builder.max_seq_len,
            max_new_tokens=self.builder.max_seq_len - 1,  # at least one prompt token
        )
