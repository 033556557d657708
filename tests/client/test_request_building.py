"""Pure-Python checks of the client's request builders, result conversion and error mapping (no server)."""

import json

import grpc
import grpc.aio
import pytest
from deltaserve.client import AdapterInfo, DeltaserveError, GenerateResult, StreamChunk
from deltaserve.client.cli import _generate_inputs, build_parser, format_size
from deltaserve.client.client import build_generate_request, build_tokenize_request
from deltaserve.client.errors import from_rpc_error, translate_rpc_errors
from deltaserve.client.v1 import deltaserve_pb2 as pb

OPTIONAL_FIELDS = ("max_new_tokens", "top_p", "seed", "repetition_penalty")


def test_unset_optionals_are_absent() -> None:
    request = build_generate_request("hi")
    assert request.prompt == "hi"
    assert not any(request.HasField(name) for name in OPTIONAL_FIELDS)


def test_given_optionals_are_present_even_when_zero() -> None:
    # seed=0 must reach the server as "seed 0", not as "draw a fresh seed".
    request = build_generate_request("hi", max_new_tokens=1, top_p=1.0, seed=0, repetition_penalty=1.0)
    assert all(request.HasField(name) for name in OPTIONAL_FIELDS)
    assert (request.max_new_tokens, request.top_p, request.seed, request.repetition_penalty) == (
        1,
        1.0,
        0,
        1.0,
    )


def test_plain_fields_and_stop_strings() -> None:
    request = build_generate_request(
        "hi", adapter_id="a", min_new_tokens=2, temperature=0.5, top_k=40, stop="\n", logprobs=True
    )
    assert (request.adapter_id, request.min_new_tokens, request.top_k, request.logprobs) == ("a", 2, 40, True)
    assert request.temperature == pytest.approx(0.5)
    assert list(request.stop) == ["\n"]
    assert list(build_generate_request("hi", stop=["a", "b"]).stop) == ["a", "b"]


def test_messages_accept_dicts_and_tuples() -> None:
    request = build_generate_request(messages=[{"role": "system", "content": "be brief"}, ("user", "hi")])
    assert request.prompt == ""
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "hi")]


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "hi", "messages": [("user", "hi")]}])
def test_exactly_one_of_prompt_and_messages(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_generate_request(**kwargs)


def test_malformed_message_is_rejected() -> None:
    with pytest.raises(ValueError, match="role"):
        build_generate_request(messages=[{"content": "no role"}])


def test_tokenize_request() -> None:
    assert build_tokenize_request("x") == pb.TokenizeRequest(text="x")
    by_chat = build_tokenize_request(messages=[("user", "x")])
    assert by_chat.text == "" and by_chat.messages[0].content == "x"
    with pytest.raises(ValueError):
        build_tokenize_request()


def test_cli_chat_flag_builds_a_user_message() -> None:
    args = build_parser().parse_args(["generate", "hi", "--chat", "--top-p", "0.9", "--stop", "x", "--stop", "y"])
    prompt, options = _generate_inputs(args)
    request = build_generate_request(prompt, **options)
    assert request.prompt == "" and [(m.role, m.content) for m in request.messages] == [("user", "hi")]
    assert request.HasField("top_p") and not request.HasField("seed")
    assert list(request.stop) == ["x", "y"]


def test_cli_connection_options_after_the_subcommand() -> None:
    args = build_parser().parse_args(["--timeout", "3", "adapters", "list", "--target", "h:1"])
    assert (args.timeout, args.target) == (3.0, "h:1")


def test_results_name_enums_in_lower_case() -> None:
    done = pb.GenerateResponse(text="a", token_ids=[1], finish_reason=pb.FINISH_REASON_STOP_SEQUENCE)
    assert GenerateResult.from_proto(done).finish_reason == "stop_sequence"
    assert StreamChunk.from_proto(pb.GenerateResponse(text="a")).finish_reason == ""
    assert StreamChunk.from_proto(pb.GenerateResponse(finish_reason=99)).finish_reason == "99"
    info = AdapterInfo.from_proto(pb.AdapterInfo(adapter_id="x", state=pb.ADAPTER_STATE_UNLOADING))
    assert info.state == "unloading"


def test_aio_rpc_error_converts() -> None:
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "adapter 'x' is not loaded"
    )
    converted = from_rpc_error(err)
    assert converted.code is grpc.StatusCode.NOT_FOUND
    assert converted.message == "adapter 'x' is not loaded"
    assert str(converted) == "NOT_FOUND: adapter 'x' is not loaded"


def test_translate_chains_the_original_error() -> None:
    original = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
    with pytest.raises(DeltaserveError) as caught, translate_rpc_errors():
        raise original
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.__cause__ is original


def test_bare_rpc_error_is_unknown() -> None:
    converted = from_rpc_error(grpc.RpcError("boom"))
    assert converted.code is grpc.StatusCode.UNKNOWN and converted.message == "boom"


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1023, 1536, 3 * 1024**3)] == ["0 B", "1023 B", "1.5 KiB", "3.0 GiB"]


def test_constraints_fill_the_oneof() -> None:
    schema = {"type": "object"}
    assert json.loads(build_generate_request("p", json_schema=schema).json_schema) == schema
    assert build_generate_request("p", json_object=True).WhichOneof("constraint") == "json_object"
    assert build_generate_request("p", regex="a+").regex == "a+"
    assert list(build_generate_request("p", choice=["x", "y"]).choice.choices) == ["x", "y"]
    assert build_generate_request("p", grammar='root ::= "a"').WhichOneof("constraint") == "grammar"
    assert build_generate_request("p").WhichOneof("constraint") is None
    with pytest.raises(ValueError, match="at most one constraint"):
        build_generate_request("p", regex="a", choice=["a"])
