"""The front-door core: one protocol-neutral request and the one path every door generates through.

Each door (native gRPC, TGIS, OpenAI HTTP) translates its wire format into a `GenerationRequest` and calls
`FrontDoorCore.submit`. The core validates the request, resolves its adapter (an id, a stack or a mix),
tokenizes, submits to the engine and hands back a `Generation` that yields the outputs, keeps their running
totals and enforces the request's deadline. Validation speaks canonical field names (`Field`); a door passes
its own `FieldNames` table so that a refusal names the field as that door's caller knows it.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import enum
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deltaserve.adapters import ParsedAdapter, compose
from deltaserve.server.engine.engine import Engine
from deltaserve.server.engine.grammar import GrammarService, GrammarSpec
from deltaserve.server.engine.request import Request, RequestOutput, TokenLogprob
from deltaserve.server.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams, sequence_seed
from deltaserve.server.errors import AdapterNotFoundError, InvalidRequestError, MergeError
from deltaserve.server.residency.mixes import MixSpec, combine, mix_spec
from deltaserve.server.residency.registry import AdapterRecord, AdapterRegistry, AdapterState
from deltaserve.server.residency.sources import AdapterResolver
from jinja2 import TemplateError

# Smaller positive temperatures (or an infinite one) can turn logits / temperature into inf or NaN, which would
# fail the sampling step of every request in the batch, not only this one.
MIN_TEMPERATURE = 1e-4
# Bounds on what one request may ask of the shared engine (docs/security.md). Stop strings are checked against
# the text's tail at every token on the engine thread; penalties outside the range overflow the logits.
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512
REPETITION_PENALTY_RANGE = (0.01, 100.0)
PRESENCE_FREQUENCY_RANGE = (-2.0, 2.0)  # OpenAI's range for presence_penalty and frequency_penalty
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's range for a logit_bias value
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_TOKEN_LISTS = 1024  # entries of stop_token_ids and allowed_token_ids
BASE_ALIASES = ("", "base")  # names of the base model besides its own, where a door takes a model name


class Field(enum.StrEnum):
    """Canonical names of the request fields that validation talks about (the native API's names)."""

    PROMPT = "prompt"
    MESSAGES = "messages"
    MAX_NEW_TOKENS = "max_new_tokens"
    MIN_NEW_TOKENS = "min_new_tokens"
    TEMPERATURE = "temperature"
    TOP_K = "top_k"
    TOP_P = "top_p"
    REPETITION_PENALTY = "repetition_penalty"
    STOP = "stop"
    PROMPT_TOKEN_IDS = "prompt_token_ids"
    MIN_P = "min_p"
    PRESENCE_PENALTY = "presence_penalty"
    FREQUENCY_PENALTY = "frequency_penalty"
    LOGIT_BIAS = "logit_bias"
    STOP_TOKEN_IDS = "stop_token_ids"
    ALLOWED_TOKEN_IDS = "allowed_token_ids"
    TOP_LOGPROBS = "top_logprobs"
    PROMPT_LOGPROBS = "prompt_logprobs"
    N = "n"
    BEST_OF = "best_of"
    ADAPTER_ID = "adapter_id"
    ADAPTER_MIX = "adapter_mix"
    ADAPTER_STACK = "adapter_stack"
    MIX_METHOD = "mix_method"
    TENANT = "tenant"


FieldNames = Mapping[Field, str]  # a door's name for each canonical field it renames; others keep theirs


class FieldError(InvalidRequestError):
    """A bad request field (INVALID_ARGUMENT), with the field named as the caller's door calls it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant turn made: its id, the function's name and its arguments (JSON text)."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str = ""  # a tool turn: the call it answers

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (transformers' shape: arguments as a mapping)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": _loads(c.arguments)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class AdapterRef:
    """What a request applies on top of the base: nothing, one adapter, a stack (in order) or a weighted mix."""

    adapter_id: str = ""
    stack: tuple[str, ...] = ()
    mix: tuple[tuple[str, float], ...] = ()
    mix_method: str = ""
    mix_density: float | None = None  # ties, dare_*, magnitude_prune (server/residency/mixes.py)
    mix_majority_sign_method: str = ""  # ties, dare_ties: "total" (default) or "frequency"

    @property
    def routing_ids(self) -> list[str]:
        """The adapters it uses, the one to route by first (empty for the base)."""
        if self.adapter_id:
            return [self.adapter_id]
        members = [adapter for adapter, _ in self.mix] or list(self.stack)
        return list(dict.fromkeys(member for member in members if member))


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request, whatever door it came through. Exactly one of `prompt`, `messages` and
    `prompt_token_ids`; sampling values as the sampler takes them (unset optional values already replaced by
    their neutral value)."""

    prompt: str = ""
    messages: tuple[ChatTurn, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()  # a prompt already tokenized
    adapter: AdapterRef = AdapterRef()
    max_new_tokens: int | None = None  # None: the server's default, capped at the room the context has left
    fit_max_new_tokens: bool = False  # True: cap max_new_tokens at the room left instead of refusing (TGIS)
    truncate_prompt_tokens: int = 0  # > 0: keep only the prompt's last this many tokens (TGIS)
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0 is greedy decoding
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    allowed_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0  # with logprobs: also this many most likely tokens at each generated position
    prompt_logprobs: int | None = None  # score the prompt: each token's log-probability and this many top ones
    request_id: str = ""  # empty: a fresh one is drawn
    deadline: float | None = None  # event-loop time after which the request is cancelled (None: no limit)
    # multi-tenant scheduling (docs/scheduling.md)
    tenant: str = ""  # whose fair share and limits it counts against; empty: `default_tenant(adapter)`
    priority: int = 0  # higher first under --scheduling priority (the native meaning; doors translate theirs)
    # Structured output (docs/structured.md): the grammar the output must match, and the tools (OpenAI's
    # function definitions) that a chat template able to render them is given.
    grammar: GrammarSpec | None = None
    tools: tuple[Mapping[str, Any], ...] = ()


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
TENANT_PATTERN = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # a tenant's name: a bounded, printable token


def default_tenant(ref: AdapterRef) -> str:
    """The tenant of a request that names none: the adapter it routes by (a mix's or stack's first member),
    "" (the base model's tenant) for none."""
    ids = ref.routing_ids
    return ids[0] if ids else ""


def request_tenant(request: GenerationRequest, names: FieldNames) -> str:
    """The request's tenant: its own (checked against TENANT_PATTERN, else FieldError) or its adapter's."""
    if not request.tenant:
        return default_tenant(request.adapter)
    name = names.get(Field.TENANT, Field.TENANT.value)
    _check(
        bool(TENANT_PATTERN.fullmatch(request.tenant)),
        name,
        f"{name} must be 1-128 characters of letters, digits and . _ : @ / + = -; got {request.tenant[:64]!r}",
    )
    return request.tenant


def clean_request_id(given: str | None) -> str:
    """`given` (a caller's x-request-id, gRPC metadata or HTTP header) when it is a sane token, else a fresh id."""
    if isinstance(given, str) and _REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def adapter_for_model(model: object, model_name: str) -> str:
    """The adapter that an OpenAI-style `model` names: empty (the base) for the base model's own name, "base",
    an empty or absent value, or anything that is not a string (the body's validation refuses that)."""
    if not isinstance(model, str) or model in (*BASE_ALIASES, model_name):
        return ""
    return model


def is_servable(record: AdapterRecord) -> bool:
    """Whether a request may name this adapter now: loaded, and not in the middle of loading or unloading."""
    return record.state not in (AdapterState.LOADING, AdapterState.UNLOADING)


def listed_adapters(registry: AdapterRegistry) -> list[AdapterRecord]:
    """The servable adapters a model list shows: not the cached mixes and stacks that requests build."""
    return [record for record in registry.list() if not record.components and is_servable(record)]


def float32(value: float) -> float:
    """`value` as the native API's float32 fields carry it (inf past float32's range), so that every door hands
    the sampler the same number for the same request."""
    return ctypes.c_float(value).value


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise FieldError(param, message)


def _with_extra(extra_positions: int) -> str:
    return f" plus {extra_positions} prefix/virtual tokens of its adapter" if extra_positions else ""


class FrontDoorCore:
    """Validation, adapter resolution, submission and output collection shared by every door."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        max_seq_len: int,
        default_max_new_tokens: int,
        resolver: AdapterResolver | None = None,
        max_n: int = 16,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.default_max_new_tokens = default_max_new_tokens
        self.max_n = max_n
        self.resolver = resolver  # --adapter-source: adapters named by requests are loaded on first use
        self._grammars: GrammarService | None = None

    # ---- prompt --------------------------------------------------------------------------------------------
    def prompt_ids(
        self,
        prompt: str,
        messages: tuple[ChatTurn, ...],
        names: FieldNames,
        token_ids: tuple[int, ...] = (),
        tools: tuple[Mapping[str, Any], ...] = (),
    ) -> list[int]:
        """Token ids of a text prompt (tokenized as tokenizer(text) does), of chat messages (rendered with the
        model's chat template plus the generation prompt), or the token ids given."""
        prompt_name, messages_name = names.get(Field.PROMPT, "prompt"), names.get(Field.MESSAGES, "messages")
        if sum(map(bool, (prompt, messages, token_ids))) != 1:
            ids_name = names.get(Field.PROMPT_TOKEN_IDS, "prompt_token_ids")
            raise FieldError(
                prompt_name, f"give exactly one of {prompt_name}, {messages_name} and {ids_name} (none or several set)"
            )
        if token_ids:
            self._check_token_ids(token_ids, names.get(Field.PROMPT_TOKEN_IDS, "prompt_token_ids"))
            return list(token_ids)
        if prompt:
            return list(self.tokenizer(prompt)["input_ids"])
        for i, message in enumerate(messages):
            _check(bool(message.role), messages_name, f"{messages_name}[{i}].role is empty")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise FieldError(
                messages_name, f"this model has no chat template; send a {prompt_name} instead of {messages_name}"
            )
        chat = [m.for_template() for m in messages]
        try:
            rendered = self.tokenizer.apply_chat_template(
                chat, tools=[dict(t) for t in tools] or None, tokenize=False, add_generation_prompt=True
            )
        except TemplateError as err:  # e.g. a template's raise_exception("roles must alternate user/assistant")
            raise FieldError(messages_name, f"the model's chat template refuses these messages: {err}") from err
        # The template already holds any special tokens (BOS), so it is not tokenized with them again.
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def prepare(
        self, request: GenerationRequest, names: FieldNames, extra_positions: int = 0
    ) -> tuple[list[int], SamplingParams]:
        """Token ids and sampling parameters, or FieldError. `extra_positions` are the adapter's prefix entries
        and virtual tokens, which take context positions before the prompt."""
        prompt_field = (
            Field.MESSAGES if request.messages else Field.PROMPT_TOKEN_IDS if request.prompt_token_ids else Field.PROMPT
        )
        prompt_name = names.get(prompt_field, prompt_field.value)
        ids = self.prompt_ids(request.prompt, request.messages, names, request.prompt_token_ids, request.tools)
        if 0 < request.truncate_prompt_tokens < len(ids):
            ids = ids[-request.truncate_prompt_tokens :]  # TGIS keeps the last tokens
        _check(bool(ids), prompt_name, "the prompt tokenizes to no tokens")
        used = len(ids) + extra_positions
        _check(
            used < self.max_seq_len,
            prompt_name,
            f"the prompt has {len(ids)} tokens{_with_extra(extra_positions)}; the context holds "
            f"{self.max_seq_len} (prompt plus output)",
        )
        return ids, self._sampling(request, names, len(ids), extra_positions)

    # ---- sampling values -----------------------------------------------------------------------------------
    def _max_new_tokens(self, request: GenerationRequest, names: FieldNames, prompt_len: int, extra: int) -> int:
        room = self.max_seq_len - prompt_len - extra
        if request.max_new_tokens is None:
            return min(self.default_max_new_tokens, room)
        if request.fit_max_new_tokens:
            return max(1, min(request.max_new_tokens, room))
        max_new, name = request.max_new_tokens, names.get(Field.MAX_NEW_TOKENS, "max_new_tokens")
        if request.prompt_logprobs is not None:  # scoring a prompt: 0 generates nothing
            _check(max_new >= 0, name, f"{name} must be >= 0, got {max_new}")
        else:
            _check(max_new > 0, name, f"{name} must be at least 1 (0 only to score the prompt), got {max_new}")
        _check(
            max_new <= room,
            name,
            f"{name} {max_new} does not fit the context: {prompt_len} prompt tokens{_with_extra(extra)} + "
            f"{max_new} > {self.max_seq_len}",
        )
        return max_new

    def _sampling(self, request: GenerationRequest, names: FieldNames, prompt_len: int, extra: int) -> SamplingParams:
        def name(canonical: Field) -> str:
            return names.get(canonical, canonical.value)

        max_new = self._max_new_tokens(request, names, prompt_len, extra)
        min_new, temperature, top_k = request.min_new_tokens, float32(request.temperature), request.top_k
        top_p, penalty = float32(request.top_p), float32(request.repetition_penalty)
        _check(min_new >= 0, name(Field.MIN_NEW_TOKENS), f"{name(Field.MIN_NEW_TOKENS)} must be >= 0, got {min_new}")
        _check(temperature >= 0, name(Field.TEMPERATURE), f"{name(Field.TEMPERATURE)} must be >= 0, got {temperature}")
        # float32 on the wire: 1e-4 arrives a hair below 1e-4, hence the tolerance.
        temperature_ok = temperature == 0 or MIN_TEMPERATURE * (1 - 1e-6) <= temperature < math.inf
        _check(
            temperature_ok,
            name(Field.TEMPERATURE),
            f"{name(Field.TEMPERATURE)} must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {temperature}",
        )
        _check(top_k >= 0, name(Field.TOP_K), f"{name(Field.TOP_K)} must be >= 0, got {top_k}")
        _check(0.0 < top_p <= 1.0, name(Field.TOP_P), f"{name(Field.TOP_P)} must be in (0, 1], got {top_p}")
        low, high = REPETITION_PENALTY_RANGE
        _check(
            low <= penalty <= high,
            name(Field.REPETITION_PENALTY),
            f"{name(Field.REPETITION_PENALTY)} must be a finite number in [{low}, {high}], got {penalty}",
        )
        self._check_stops(request.stop, name(Field.STOP))
        self._check_extras(request, name)
        return SamplingParams(
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=request.seed,
            stop=request.stop,
            repetition_penalty=penalty,
            logprobs=request.logprobs or request.top_logprobs > 0,
            min_p=float32(request.min_p),
            presence_penalty=float32(request.presence_penalty),
            frequency_penalty=float32(request.frequency_penalty),
            logit_bias=tuple((token, float32(bias)) for token, bias in request.logit_bias),
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            allowed_token_ids=request.allowed_token_ids,
            top_logprobs=request.top_logprobs,
            prompt_logprobs=request.prompt_logprobs,
        )

    @property
    def vocab_size(self) -> int:
        """Token ids a request may name: the logits' width."""
        return self.engine.sampler.vocab_size

    def _check_token_ids(self, ids: tuple[int, ...], name: str, limit: int | None = None) -> None:
        if limit is not None:
            _check(len(ids) <= limit, name, f"{name}: at most {limit} token ids, got {len(ids)}")
        bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)), None)
        _check(bad is None, name, f"{name}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def _check_extras(self, request: GenerationRequest, name: Callable[[Field], str]) -> None:
        """The sampler's values past the classic ones: each finite and in range, token ids in the vocabulary."""
        min_p = float32(request.min_p)
        _check(0.0 <= min_p <= 1.0, name(Field.MIN_P), f"{name(Field.MIN_P)} must be in [0, 1], got {min_p}")
        low, high = PRESENCE_FREQUENCY_RANGE
        for canonical in (Field.PRESENCE_PENALTY, Field.FREQUENCY_PENALTY):
            value = float32(getattr(request, canonical.value))
            _check(low <= value <= high, name(canonical), f"{name(canonical)} must be in [{low}, {high}], got {value}")
        bias_name = name(Field.LOGIT_BIAS)
        self._check_token_ids(tuple(t for t, _ in request.logit_bias), bias_name, MAX_LOGIT_BIAS)
        low, high = LOGIT_BIAS_RANGE
        for token, bias in request.logit_bias:
            bias = float32(bias)
            _check(low <= bias <= high, bias_name, f"{bias_name}[{token}] must be in [{low}, {high}], got {bias}")
        self._check_token_ids(request.stop_token_ids, name(Field.STOP_TOKEN_IDS), MAX_TOKEN_LISTS)
        self._check_token_ids(request.allowed_token_ids, name(Field.ALLOWED_TOKEN_IDS), MAX_TOKEN_LISTS)
        top, top_name = request.top_logprobs, name(Field.TOP_LOGPROBS)
        _check(0 <= top <= MAX_TOP_LOGPROBS, top_name, f"{top_name} must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        prompt_top, prompt_name = request.prompt_logprobs, name(Field.PROMPT_LOGPROBS)
        _check(
            prompt_top is None or 0 <= prompt_top <= MAX_TOP_LOGPROBS,
            prompt_name,
            f"{prompt_name} must be in [0, {MAX_TOP_LOGPROBS}], got {prompt_top}",
        )

    @staticmethod
    def _check_stops(stops: tuple[str, ...], name: str) -> None:
        _check(all(stops), name, f"{name} strings must not be empty")
        _check(
            len(stops) <= MAX_STOP_SEQUENCES, name, f"{name}: at most {MAX_STOP_SEQUENCES} strings, got {len(stops)}"
        )
        longest = max(map(len, stops), default=0)
        _check(
            longest <= MAX_STOP_CHARS, name, f"{name} strings hold at most {MAX_STOP_CHARS} characters, got {longest}"
        )

    # ---- adapters ------------------------------------------------------------------------------------------
    async def resolve_sources(self, ref: AdapterRef) -> bool:
        """Load the adapters the request names that are not loaded from the --adapter-source stores (shared
        with concurrent requests for the same id; off the event loop). True when a load was waited for."""
        if self.resolver is None:
            return False
        cold = False
        for adapter_id in ref.routing_ids:
            if self.engine.registry.find(adapter_id) is None:
                cold = await self.resolver.ensure(adapter_id) or cold
            else:
                self.resolver.refresh_if_due(adapter_id)
        return cold

    async def acquire(self, ref: AdapterRef) -> tuple[AdapterRecord | None, bool]:
        """Take a reference on the request's adapter (building and caching a mix or stack on a worker thread),
        None for the base, and whether it waited for a load from --adapter-source. The caller releases the
        reference unless the engine took it with a submitted request."""
        chosen = [name for name, given in (("adapter_id", ref.adapter_id), ("adapter_mix", ref.mix)) if given]
        chosen += ["adapter_stack"] if ref.stack else []
        if len(chosen) > 1:
            raise FieldError(
                chosen[0], f"give one of adapter_id, adapter_mix and adapter_stack, not {' and '.join(chosen)}"
            )
        _check(not ref.mix_method or bool(ref.mix), Field.MIX_METHOD, "mix_method needs adapter_mix")
        cold = await self.resolve_sources(ref)
        if ref.mix:
            spec = mix_spec(ref.mix_method, list(ref.mix), ref.mix_density, ref.mix_majority_sign_method)
            return await self._in_thread(self._acquire_derived, spec.mix_id, spec.components, spec), cold
        if ref.stack:
            names = _stack_members(ref.stack)
            return await self._in_thread(self._acquire_derived, "stack|" + "|".join(names), names, None), cold
        return (self.engine.registry.acquire(ref.adapter_id) if ref.adapter_id else None), cold

    async def _in_thread(self, acquire: Callable[..., AdapterRecord], *args: Any) -> AdapterRecord:
        """`acquire(*args)` on a worker thread. A caller cancelled meanwhile (a deadline, a client gone) does not
        stop the thread, so the reference it takes is released when it ends rather than leaked."""
        task = asyncio.ensure_future(asyncio.to_thread(acquire, *args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, task: asyncio.Future[AdapterRecord]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.engine.registry.release(task.result(), served=False)

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
            return combine(mix, adapters, list(registry.spec.linear_layers))

        registry.derive(derived_id, members, build)
        return registry.acquire(derived_id)

    def require_servable(self, adapter_id: str) -> None:
        """AdapterNotFoundError unless `adapter_id` is empty (the base) or names a servable adapter."""
        if adapter_id and self.engine.registry.find(adapter_id) is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")

    # ---- submission ----------------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, names: FieldNames) -> Generation:
        """Validate, resolve the adapter, tokenize and submit; the returned Generation yields the outputs. The
        caller must `close()` it (a `with` block does) so that leaving early cancels the engine request.
        TimeoutError if the deadline passes while the adapter is brought in (nothing was submitted then)."""
        started = asyncio.get_running_loop().time()
        tenant = request_tenant(request, names)
        async with asyncio.timeout_at(request.deadline):  # bringing an adapter in counts against the deadline
            adapter, cold = await self.acquire(request.adapter)
        try:
            # Tokenizing (a prompt may be megabytes) runs on a worker thread, never on the event loop.
            extra = adapter.extra_positions if adapter else 0
            prompt_ids, params = await asyncio.to_thread(self.prepare, request, names, extra)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
            first_output = asyncio.Event()

            def deliver(output: RequestOutput) -> None:
                queue.put_nowait(output)
                first_output.set()

            def sink(output: RequestOutput) -> None:
                loop.call_soon_threadsafe(deliver, output)

            rid = request.request_id or uuid.uuid4().hex
            engine_request = Request(rid, prompt_ids, params, adapter, sink, tenant=tenant, priority=request.priority)
            engine_request.constraint = await self._constraint(request)
            self.engine.submit(engine_request)
        except BaseException:
            if adapter is not None:
                self.engine.registry.release(adapter, served=False)
            raise
        return Generation(
            self.engine,
            engine_request,
            queue,
            request.deadline,
            cold_started_at=started if cold else None,
            started=first_output,
        )

    # ---- structured output (docs/structured.md) -----------------------------------------------------------
    @property
    def grammars(self) -> GrammarService:
        """The grammar compiler and cache of this tokenizer, shared by every request and adapter."""
        if self._grammars is None:
            eos = tuple(sorted(self.engine.sampler.eos_token_ids))
            self._grammars = GrammarService(self.tokenizer, self.vocab_size, eos)
        return self._grammars

    @property
    def template_renders_tools(self) -> bool:
        """Whether the model's chat template takes `tools` (transformers' apply_chat_template(tools=...))."""
        return "tools" in (getattr(self.tokenizer, "chat_template", None) or "")

    async def _constraint(self, request: GenerationRequest) -> Any:
        """A fresh grammar matcher for one sequence of `request` (None when it has no grammar). The request
        is not submitted until its grammar is compiled; the wait counts against its deadline."""
        if request.grammar is None:
            return None
        async with asyncio.timeout_at(request.deadline):
            return await self.grammars.matcher(request.grammar)

    def check_sequences(self, n: int, best_of: int | None, names: FieldNames) -> int:
        """How many sequences to generate for OpenAI's n and best_of (best_of >= n, both within --max-n)."""
        n_name, best_name = names.get(Field.N, "n"), names.get(Field.BEST_OF, "best_of")
        _check(1 <= n <= self.max_n, n_name, f"{n_name} must be in [1, {self.max_n}] (--max-n), got {n}")
        if best_of is None:
            return n
        _check(
            n <= best_of <= self.max_n,
            best_name,
            f"{best_name} must be in [{n_name}={n}, {self.max_n}] (--max-n), got {best_of}",
        )
        return best_of

    async def submit_sequences(self, request: GenerationRequest, names: FieldNames, count: int) -> list[Generation]:
        """`count` sequences for one prompt (OpenAI's n or best_of). The first is submitted alone; once its
        prompt is computed (its first output arrived) the others follow and take its full blocks from the
        prefix cache, so the prompt is computed once. Sequence i > 0 samples with the seed derived from the
        request's seed and i (or a fresh one when it has none) and does not score the prompt again unless it
        generates nothing. The caller closes every generation returned."""
        first = await self.submit(request, names)
        generations = [first]
        try:
            if count > 1:
                async with asyncio.timeout_at(request.deadline):
                    await first.started.wait()
            for index in range(1, count):
                sibling = dataclasses.replace(
                    request,
                    prompt="",
                    messages=(),
                    prompt_token_ids=tuple(first.prompt_ids),
                    truncate_prompt_tokens=0,
                    seed=None if request.seed is None else sequence_seed(request.seed, index),
                    prompt_logprobs=request.prompt_logprobs if request.max_new_tokens == 0 else None,
                    request_id=f"{first.request.request_id}-{index}",
                )
                generations.append(await self.submit(sibling, {**names, Field.PROMPT_TOKEN_IDS: "prompt"}))
        except BaseException:
            for generation in generations:
                generation.close()
            raise
        return generations


@dataclass(eq=False)
class Generation:
    """A submitted request: its outputs in order (each the new tokens since the previous one) and their running
    totals. Iterating stops after the final output, or at the deadline: the engine request is then cancelled
    and `timed_out` set. Closing it before the end (a cancel, a client gone) cancels the engine request."""

    engine: Engine
    request: Request
    queue: asyncio.Queue[RequestOutput]
    deadline: float | None = None
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    last: RequestOutput | None = None
    timed_out: bool = False
    cold_started_at: float | None = None  # event-loop time of arrival, for a request that waited for a load
    started: asyncio.Event = field(default_factory=asyncio.Event)  # set at the first output (prompt computed)

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def finished(self) -> bool:
        return self.timed_out or (self.last is not None and self.last.finished)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def generated_tokens(self) -> int:
        return self.last.generated_tokens if self.last is not None else 0

    @property
    def cumulative_logprob(self) -> float:
        """The sum of the generated tokens' log-probabilities (best_of ranks by it)."""
        return math.fsum(self.logprobs)

    async def next(self) -> RequestOutput | None:
        """The next output, added to the totals; None once finished. An engine failure is raised."""
        if self.finished:
            return None
        time_limit = asyncio.timeout_at(self.deadline)
        try:
            async with time_limit:
                output = await self.queue.get()
        except TimeoutError:
            if not time_limit.expired():
                raise
            self.timed_out = True
            self.close()
            return None
        if output.error is not None:
            self.close()
            raise output.error
        self.text_parts.append(output.text)
        self.token_ids.extend(output.token_ids)
        self.logprobs.extend(output.logprobs)
        self.top_logprobs.extend(output.top_logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.last = output
        if self.cold_started_at is not None and output.token_ids:  # the first token of a cold start
            seconds = asyncio.get_running_loop().time() - self.cold_started_at
            self.engine.metrics.adapter_cold_start.observe(seconds)
            self.cold_started_at = None
        return output

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while (output := await self.next()) is not None:
            yield output

    async def collect(self) -> Generation:
        """Read to the end; the totals then hold the whole generation."""
        while await self.next() is not None:
            pass
        return self

    def close(self) -> None:
        """Cancel the engine request unless it finished (idempotent)."""
        if self.last is None or not self.last.finished:
            self.request.cancel()
            self.engine.wake()

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def merged_outputs(
    generations: list[Generation], firsts: list[RequestOutput]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) of several generations as they arrive, each one's in order, starting from their first
    outputs `firsts`; the first error (TimeoutError at a deadline) is raised once every reader stopped."""
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def read(index: int, generation: Generation, output: RequestOutput) -> None:
        try:
            while True:
                queue.put_nowait((index, output, None))
                if output.finished:
                    break
                output = await generation.next()
                if output is None:  # the deadline passed
                    raise TimeoutError
        except Exception as err:
            queue.put_nowait((index, None, err))
        finally:
            queue.put_nowait((index, None, None))

    readers = [
        asyncio.ensure_future(read(i, g, first)) for i, (g, first) in enumerate(zip(generations, firsts, strict=True))
    ]
    running, failure = len(readers), None
    try:
        while running:
            index, output, error = await queue.get()
            if output is not None:
                yield index, output
            elif error is not None:
                failure = failure or error
            else:
                running -= 1
    finally:
        for reader in readers:
            reader.cancel()
    if failure is not None:
        raise failure


def _stack_members(names: tuple[str, ...]) -> tuple[str, ...]:
    _check(all(names), Field.ADAPTER_STACK, "adapter_stack names an empty adapter_id")
    _check(len(set(names)) == len(names), Field.ADAPTER_STACK, "adapter_stack names an adapter twice")
    return names
