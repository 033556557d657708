"""Plain result types returned by the deltaserve client.

Callers get frozen dataclasses with ordinary Python values instead of protobuf messages, so results are
easy to print, compare and pass around without importing the generated modules, and proto enums arrive
as short lower-case strings ("eos", "device") instead of integers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Protocol, Self

from deltaserve.client.v1 import deltaserve_pb2 as pb


class _ProtoEnum(Protocol):
    """What enum_label needs from a generated enum wrapper such as pb.FinishReason."""

    def Name(self, number: int) -> str: ...


def enum_label(enum_type: _ProtoEnum, value: int, prefix: str) -> str:
    """The lower-case name of a proto enum value without its prefix; "" for the *_UNSPECIFIED zero value.

    A value this client does not know (a newer server) comes back as its number, so nothing is lost.
    """
    if value == 0:
        return ""
    try:
        name = enum_type.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _from_message(cls: type, msg: Any, **converted: Any) -> Any:
    """Build dataclass `cls` from a message with fields of the same names; repeated fields become lists.

    `converted` supplies the fields that need more than a copy (enums).
    """
    values = {}
    for field in fields(cls):
        if field.name in converted:
            values[field.name] = converted[field.name]
            continue
        value = getattr(msg, field.name)
        values[field.name] = list(value) if isinstance(value, Iterable) and not isinstance(value, str) else value
    return cls(**values)


@dataclass(frozen=True)
class _GenerationOutput:
    """Fields shared by a whole generation result and one streamed chunk of it."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    adapter_id: str
    request_id: str
    stop_sequence: str
    top_logprobs: list[list[tuple[int, float]]]  # per token, (id, logprob) most likely first (top_logprobs)
    prompt_logprobs: list[PromptLogprob]  # the scored prompt (prompt_logprobs)
    index: int  # the sequence (with n > 1)

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse) -> Self:
        """Build from a GenerateResponse; finish_reason becomes e.g. "eos", or "" while unfinished."""
        return _from_message(cls, msg, **cls._converted(msg))

    @classmethod
    def _converted(cls, msg: pb.GenerateResponse) -> dict[str, Any]:
        return {
            "finish_reason": enum_label(pb.FinishReason, msg.finish_reason, "FINISH_REASON_"),
            "top_logprobs": [list(zip(entry.token_ids, entry.logprobs, strict=True)) for entry in msg.top_logprobs],
            "prompt_logprobs": [PromptLogprob.from_proto(entry) for entry in msg.prompt_logprobs],
        }


@dataclass(frozen=True)
class PromptLogprob:
    """One scored prompt token: its log-probability (None for the first), rank and the most likely tokens."""

    token_id: int
    logprob: float | None
    rank: int
    top: list[tuple[int, float]]

    @classmethod
    def from_proto(cls, msg: pb.PromptLogprob) -> Self:
        logprob = msg.logprob if msg.HasField("logprob") else None
        return cls(msg.token_id, logprob, msg.rank, list(zip(msg.top.token_ids, msg.top.logprobs, strict=True)))


@dataclass(frozen=True)
class GenerateResult(_GenerationOutput):
    """Everything one finished request produced (its sequence 0 with n > 1, every sequence in `sequences`).

    finish_reason is one of "length", "eos", "stop_sequence", "cancelled", "aborted";
    logprobs is empty unless the request asked for them.
    """

    sequences: list[GenerateResult] = dataclasses.field(default_factory=list)

    @classmethod
    def _converted(cls, msg: pb.GenerateResponse) -> dict[str, Any]:
        return {**super()._converted(msg), "sequences": [cls.from_proto(sequence) for sequence in msg.sequences]}


@dataclass(frozen=True)
class StreamChunk(_GenerationOutput):
    """One streamed message: text, token_ids and logprobs are the delta since the previous chunk.

    generated_tokens is the running total; finish_reason is "" until the last chunk.
    """


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter known to the server; state is e.g. "loading", "host", "device", "unloading"."""

    adapter_id: str
    kind: str
    rank: int
    size_bytes: int
    state: str
    path: str
    target_modules: list[str]
    requests_served: int
    active_requests: int
    pinned: bool
    last_used_unix: float
    virtual_tokens: int  # prefix entries + virtual tokens put before every prompt
    mergeable: bool
    content_hash: str = ""  # "sha256:...": names with one hash share one slot and one host copy
    version: str = ""  # the --adapter-source version served ("" for LoadAdapter paths)
    source: str = ""  # the --adapter-source it came from

    @classmethod
    def from_proto(cls, msg: pb.AdapterInfo) -> Self:
        """Build from the AdapterInfo message, naming the state enum by its lower-case label."""
        return _from_message(cls, msg, state=enum_label(pb.AdapterState, msg.state, "ADAPTER_STATE_"))


@dataclass(frozen=True)
class ModelInfo:
    """What the server runs: the base model, its limits and the adapter kinds it accepts."""

    model_name: str
    architecture: str
    dtype: str
    device: str
    quantization: str
    max_seq_len: int
    max_batch_size: int
    vocab_size: int
    eos_token_ids: list[int]
    max_adapters: int
    max_lora_rank: int
    adapter_kinds: list[str]
    version: str
    default_max_new_tokens: int
    merged_adapter_id: str

    @classmethod
    def from_proto(cls, msg: pb.ModelInfoResponse) -> Self:
        """Build from a ModelInfoResponse, turning repeated fields into lists."""
        return _from_message(cls, msg)


@dataclass(frozen=True)
class TokenizeResult:
    """Token ids of a text or chat, with the vocabulary entry of each id."""

    token_ids: list[int]
    tokens: list[str]

    @classmethod
    def from_proto(cls, msg: pb.TokenizeResponse) -> Self:
        """Build from a TokenizeResponse."""
        return _from_message(cls, msg)
