"""The request bodies of the OpenAI-compatible door (pydantic): declared fields are validated; any other field
must be known to be harmless, or the request is refused naming it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from deltaserve.server.frontends.core import FieldError
from pydantic import BaseModel, ConfigDict, Field

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]

# Fields that do not change what is generated: accepted and ignored.
_IGNORED_FIELDS = frozenset(
    {"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls"}
)
# Fields deltaserve does not implement, accepted only with the value that means "off".
_NEUTRAL_VALUES: dict[str, Callable[[Any], bool]] = {
    "tools": lambda value: not value,  # completions (chat declares tools)
    "tool_choice": lambda value: value in (None, "none", "auto"),
    "functions": lambda value: not value,
    "function_call": lambda value: value in (None, "none", "auto"),
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
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a JSON key) -> bias
    # vLLM's extensions, which deltaserve's sampler has too
    top_k: Int32 | None = None
    min_tokens: Int32 | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    stop_token_ids: list[Int32] | None = None
    ignore_eos: bool | None = None
    allowed_token_ids: list[Int32] | None = None
    prompt_logprobs: Int32 | None = None
    # scheduling (docs/scheduling.md): vLLM's priority extension (lower values first); OpenAI's end-user id,
    # which names the tenant unless the x-tenant header does
    priority: Int32 | None = None
    user: str | None = None
    # Structured output (docs/structured.md; structured.py): OpenAI's response_format, vLLM's guided fields and
    # structured_outputs ({json, regex, choice, grammar, json_object}). At most one is given.
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None


class CompletionBody(_GenerationBody):
    prompt: str | list[str] | list[Int32] | list[list[Int32]]
    logprobs: Int32 | None = None
    echo: bool | None = None
    best_of: Int32 | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a participant's name: the chat templates deltaserve serves do not use it
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (structured.py)
    tool_call_id: str | None = None  # a tool turn: the call it answers


class ChatBody(_GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = None
    top_logprobs: Int32 | None = None
    tools: list[dict[str, Any]] | None = None  # function tools (structured.py)
    tool_choice: str | dict[str, Any] | None = None


class LoadAdapterBody(_Body):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's flag: replace an adapter of the same name


class UnloadAdapterBody(_Body):
    lora_name: str
