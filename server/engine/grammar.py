"""Grammar-constrained decoding: a request's JSON schema, JSON object, regex, choice of strings or EBNF grammar,
compiled by xgrammar into a token-level matcher that the sampler masks with (engine/sampling.py's
`TokenConstraint`).

Compiled grammars are cached per (kind, source) in one `GrammarService` per tokenizer, so every request and
every adapter (they share the base tokenizer) reuses them; a request gets a fresh matcher over the cached
grammar (each sequence of n > 1 its own). Compilation runs on the service's own bounded worker pool (never on
the event loop or the engine thread; xgrammar releases the GIL while compiling), after size checks on the
source, and under a time limit: a compile that overruns fails its request with `GrammarError`, and its key is
cached as failed so that a repeat fails at once (a running compile cannot be interrupted: the worker finishes
it and the result is discarded).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from deltaserve.server.errors import InvalidRequestError

# Bounds on what one request may ask the compiler for (docs/structured.md). The compiler's cost grows with
# the nesting depth (200 levels take ~2 s on one core), enum members and counted repetitions.
MAX_SOURCE_BYTES = 64 * 1024  # a schema's JSON text, a regex, an EBNF grammar, all choices together
MAX_SCHEMA_DEPTH = 64  # nested JSON objects/arrays in the schema document (~2 per level of properties)
MAX_ENUM_MEMBERS = 1024  # members of one enum, or strings of one choice
MAX_REGEX_CHARS = 4096
MAX_REPEAT_BOUND = 1024  # {m,n} in a regex, and minLength/maxLength/minItems/maxItems in a schema
COMPILE_TIMEOUT_S = 10.0
COMPILE_WORKERS = 2
CACHE_ENTRIES = 512


class GrammarError(InvalidRequestError):
    """A grammar that is refused (too large, malformed, or too slow to compile): INVALID_ARGUMENT, naming the
    request field that carried it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class GrammarKind(enum.StrEnum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"  # any JSON object
    REGEX = "regex"
    CHOICE = "choice"  # exactly one of the given strings
    GRAMMAR = "grammar"  # EBNF (xgrammar's / GBNF dialect), root rule `root`


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. `param` is the field that carried it, as the caller's door names
    it (refusals name it)."""

    kind: GrammarKind
    source: str = ""  # the schema's JSON text, the regex or the EBNF grammar
    choices: tuple[str, ...] = ()
    param: str = ""

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        return (self.kind.value, self.source, self.choices)


def check_limits(spec: GrammarSpec) -> None:
    """GrammarError unless the source is within the size bounds (checked before anything is compiled)."""
    param, size = spec.param, len(spec.source.encode()) + sum(len(c.encode()) for c in spec.choices)
    if size > MAX_SOURCE_BYTES:
        raise GrammarError(param, f"{param} is {size} bytes; at most {MAX_SOURCE_BYTES} are compiled")
    if spec.kind is GrammarKind.JSON_SCHEMA:
        try:
            schema = json.loads(spec.source)
        except ValueError as err:
            raise GrammarError(param, f"{param} is not valid JSON: {err}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError(param, f"{param} must be a JSON schema object")
        _check_schema(schema, param)
    elif spec.kind is GrammarKind.REGEX:
        if len(spec.source) > MAX_REGEX_CHARS:
            raise GrammarError(param, f"{param} has {len(spec.source)} characters; at most {MAX_REGEX_CHARS}")
        pairs = re.findall(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}", spec.source)
        bounds = [int(number) for pair in pairs for number in pair if number]
        if any(b > MAX_REPEAT_BOUND for b in bounds):
            raise GrammarError(param, f"{param}: a counted repetition above {MAX_REPEAT_BOUND} is refused")
    elif spec.kind is GrammarKind.CHOICE:
        if not spec.choices:
            raise GrammarError(param, f"{param} must list at least one string")
        if len(spec.choices) > MAX_ENUM_MEMBERS:
            raise GrammarError(param, f"{param} has {len(spec.choices)} strings; at most {MAX_ENUM_MEMBERS}")
    elif spec.kind is GrammarKind.GRAMMAR and not spec.source.strip():
        raise GrammarError(param, f"{param} is empty")


_BOUNDED_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def _check_schema(schema: Any, param: str) -> None:
    """Depth, enum sizes and repetition bounds of a schema document, walked without recursion."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(param, f"{param} nests deeper than {MAX_SCHEMA_DEPTH} levels of JSON")
        if isinstance(node, dict):
            members = node.get("enum")
            if isinstance(members, list) and len(members) > MAX_ENUM_MEMBERS:
                raise GrammarError(param, f"{param}: an enum has {len(members)} members; at most {MAX_ENUM_MEMBERS}")
            for keyword in _BOUNDED_KEYWORDS:
                value = node.get(keyword)
                if isinstance(value, int) and value > MAX_REPEAT_BOUND:
                    raise GrammarError(param, f"{param}: {keyword}={value} is above {MAX_REPEAT_BOUND}")
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)


@dataclass
class _Entry:
    future: concurrent.futures.Future
    started: float
    failure: GrammarError | None = None  # a timeout: later requests for the same source fail at once


class GrammarService:
    """Compiles and caches grammars for one tokenizer; hands each request a fresh matcher."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: tuple[int, ...],
        *,
        workers: int = COMPILE_WORKERS,
        timeout_s: float = COMPILE_TIMEOUT_S,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, tuple(stop_token_ids)
        self.timeout_s, self.cache_entries = timeout_s, cache_entries
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="deltaserve-grammar")
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()

    def _get_compiler(self) -> Any:
        """xgrammar's compiler over this tokenizer (built once, on a worker: reading the vocabulary takes ~0.2 s)."""
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.stop_token_ids)
                )
                # One thread per compile: the pool bounds how many run at once.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def _compile(self, spec: GrammarSpec) -> Any:
        compiler = self._get_compiler()
        try:
            if spec.kind is GrammarKind.JSON_SCHEMA:
                return compiler.compile_json_schema(spec.source, any_whitespace=False, strict_mode=True)
            if spec.kind is GrammarKind.JSON_OBJECT:
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind is GrammarKind.REGEX:
                return compiler.compile_regex(spec.source)
            if spec.kind is GrammarKind.CHOICE:
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choices))
            return compiler.compile_grammar(spec.source)
        except Exception as err:  # xgrammar raises RuntimeError/ValueError subclasses on a bad source
            raise GrammarError(spec.param, f"{spec.param} cannot be compiled: {_first_line(err)}") from None

    async def compiled(self, spec: GrammarSpec) -> Any:
        """The compiled grammar of `spec` (cached; a compile under way for the same key is shared)."""
        check_limits(spec)
        entry = self._cache.get(spec.key)
        if entry is None:  # a refused source stays cached as refused: compiling it again fails the same way
            entry = _Entry(self._pool.submit(self._compile, spec), time.monotonic())
            self._cache[spec.key] = entry
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        self._cache.move_to_end(spec.key)
        if entry.failure is not None:
            raise entry.failure
        if entry.future.done():  # cached: the time limit was that of its compile
            return entry.future.result()
        left = self.timeout_s - (time.monotonic() - entry.started)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(entry.future)), max(left, 0.0))
        except TimeoutError:
            entry.failure = GrammarError(
                spec.param, f"{spec.param} took longer than {self.timeout_s:g} s to compile; simplify it"
            )
            raise entry.failure from None

    async def matcher(self, spec: GrammarSpec) -> Any:
        """A fresh matcher (xgrammar's GrammarMatcher: the sampler's TokenConstraint) over the cached grammar."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(await self.compiled(spec))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
