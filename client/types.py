"""Plain result types returned by the deltaserve client.

Callers get frozen dataclasses with ordinary Python values instead of protobuf messages, so results are
easy to print, compare and pass around without importing the generated modules, and proto enums arrive
as short lower-case strings ("eos", "device") instead of integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Self

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

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse) -> Self:
        """Build from a GenerateResponse; finish_reason becomes e.g. "eos", or "" while unfinished."""
        return cls(
            text=msg.text,
            token_ids=list(msg.token_ids),
            logprobs=list(msg.logprobs),
            finish_reason=enum_label(pb.FinishReason, msg.finish_reason, "FINISH_REASON_"),
            prompt_tokens=msg.prompt_tokens,
            generated_tokens=msg.generated_tokens,
            adapter_id=msg.adapter_id,
            request_id=msg.request_id,
            stop_sequence=msg.stop_sequence,
        )


@dataclass(frozen=True)
class GenerateResult(_GenerationOutput):
    """Everything one finished request produced.

    finish_reason is one of "length", "eos", "stop_sequence", "cancelled", "aborted";
    logprobs is empty unless the request asked for them.
    """


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

    @classmethod
    def from_proto(cls, msg: pb.AdapterInfo) -> Self:
        """Build from the AdapterInfo message, naming the state enum by its lower-case label."""
        return cls(
            adapter_id=msg.adapter_id,
            kind=msg.kind,
            rank=msg.rank,
            size_bytes=msg.size_bytes,
            state=enum_label(pb.AdapterState, msg.state, "ADAPTER_STATE_"),
            path=msg.path,
            target_modules=list(msg.target_modules),
            requests_served=msg.requests_served,
            active_requests=msg.active_requests,
        )


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

    @classmethod
    def from_proto(cls, msg: pb.ModelInfoResponse) -> Self:
        """Build from a ModelInfoResponse, turning repeated fields into lists."""
        return cls(
            model_name=msg.model_name,
            architecture=msg.architecture,
            dtype=msg.dtype,
            device=msg.device,
            quantization=msg.quantization,
            max_seq_len=msg.max_seq_len,
            max_batch_size=msg.max_batch_size,
            vocab_size=msg.vocab_size,
            eos_token_ids=list(msg.eos_token_ids),
            max_adapters=msg.max_adapters,
            max_lora_rank=msg.max_lora_rank,
            adapter_kinds=list(msg.adapter_kinds),
            version=msg.version,
            default_max_new_tokens=msg.default_max_new_tokens,
        )


@dataclass(frozen=True)
class TokenizeResult:
    """Token ids of a text or chat, with the vocabulary entry of each id."""

    token_ids: list[int]
    tokens: list[str]

    @classmethod
    def from_proto(cls, msg: pb.TokenizeResponse) -> Self:
        """Build from a TokenizeResponse."""
        return cls(token_ids=list(msg.token_ids), tokens=list(msg.tokens))
