"""The shared front-door core under every door: one bad value is refused by the native gRPC, TGIS and OpenAI
doors alike, each naming the field as its own caller knows it, and one bearer-token check guards the admin
calls of every door. A real server on loopback with the tiny model; the doors are called with their own wire
formats (raw stubs and raw HTTP), not through deltaserve's client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from deltaserve.client import Client
from deltaserve.client.fmaas import generation_pb2 as tgis
from deltaserve.client.fmaas import generation_pb2_grpc as tgis_grpc
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.client.v1 import deltaserve_pb2_grpc as pb_grpc
from deltaserve.server.config import ServerConfig
from deltaserve.server.errors import UnauthenticatedError
from deltaserve.server.frontends.auth import HTTP_ADMIN_NEEDS, BearerToken
from deltaserve.server.frontends.core import AdapterRef, adapter_for_model, float32
from deltaserve.server.frontends.openai.errors import error_json
from deltaserve.testing.helpers import PROMPTS, ServerThread

MAX_SEQ_LEN = 64
TOKEN = "core-test-token"
TOO_LONG = "word " * 200  # more tokens than the context holds


@pytest.fixture(scope="module")
def server(tiny_dir):
    config = ServerConfig.of(model=tiny_dir, http_port=0, admin_token=TOKEN, max_batch_size=2, max_seq_len=MAX_SEQ_LEN)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as opened:
        yield opened


def _native(channel: grpc.Channel, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(**fields), timeout=60)
    return info.value


def _tgis(channel: grpc.Channel, text: str = PROMPTS[0], **params) -> grpc.RpcError:
    request = tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text=text)], params=params)
    with pytest.raises(grpc.RpcError) as info:
        tgis_grpc.GenerationServiceStub(channel).Generate(request, timeout=60)
    return info.value


def _post(server, path: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one raw HTTP POST to the server's OpenAI door."""
    url = f"http://127.0.0.1:{server.server.http_port}/v1/{path}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers.items()), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read())


def _openai_error(server, path: str, body: dict) -> dict:
    status, _, reply = _post(server, path, {"model": "base", **body})
    assert status == 400, reply
    assert reply["error"]["code"] == "invalid_argument" and reply["error"]["type"] == "invalid_request_error"
    return reply["error"]


# ---- one validation, each door's names ----------------------------------------------------------------------
def test_top_p_out_of_range_is_refused_by_every_door(channel, server):
    native = _native(channel, prompt=PROMPTS[0], top_p=1.5)
    assert native.code() == grpc.StatusCode.INVALID_ARGUMENT and native.details().startswith("top_p must be in (0, 1]")
    sampling = tgis.SamplingParameters(temperature=0.7, top_p=1.5)
    from_tgis = _tgis(channel, method=tgis.SAMPLE, sampling=sampling)
    assert from_tgis.code() == grpc.StatusCode.INVALID_ARGUMENT and from_tgis.details().startswith("top_p must be")
    error = _openai_error(server, "completions", {"prompt": PROMPTS[0], "top_p": 1.5})
    assert error["param"] == "top_p" and error["message"].startswith("top_p must be in (0, 1]")


def test_too_many_new_tokens_is_named_as_each_door_calls_the_field(channel, server):
    native = _native(channel, prompt=PROMPTS[0], max_new_tokens=1000)
    assert native.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert native.details().startswith("max_new_tokens 1000 does not fit the context")
    completion = _openai_error(server, "completions", {"prompt": PROMPTS[0], "max_tokens": 1000})
    assert completion["param"] == "max_tokens" and completion["message"].startswith("max_tokens 1000 does not fit")
    chat = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_completion_tokens": 1000}
    error = _openai_error(server, "chat/completions", chat)
    assert error["param"] == "max_completion_tokens" and error["message"].startswith("max_completion_tokens 1000")
    assert "max_new_tokens" not in completion["message"] + error["message"]


def test_negative_min_new_tokens_is_named_as_each_door_calls_the_field(channel, server):
    native = _native(channel, prompt=PROMPTS[0], min_new_tokens=-1)
    assert (
        native.code() == grpc.StatusCode.INVALID_ARGUMENT and native.details() == "min_new_tokens must be >= 0, got -1"
    )
    error = _openai_error(server, "completions", {"prompt": PROMPTS[0], "min_tokens": -1})
    assert error["param"] == "min_tokens" and error["message"] == "min_tokens must be >= 0, got -1"


def test_an_empty_stop_string_is_named_as_each_door_calls_the_field(channel, server):
    native = _native(channel, prompt=PROMPTS[0], stop=[""])
    assert native.code() == grpc.StatusCode.INVALID_ARGUMENT and native.details().startswith("stop ")
    from_tgis = _tgis(channel, stopping=tgis.StoppingCriteria(stop_sequences=[""]))
    assert from_tgis.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop_sequences" in from_tgis.details()
    error = _openai_error(server, "completions", {"prompt": PROMPTS[0], "stop": [""]})
    assert error["param"] == "stop"


def test_a_prompt_longer_than_the_context_is_refused_by_every_door(channel, server):
    native = _native(channel, prompt=TOO_LONG)
    assert native.code() == grpc.StatusCode.INVALID_ARGUMENT and native.details().startswith("the prompt has")
    from_tgis = _tgis(channel, text=TOO_LONG)
    assert from_tgis.code() == grpc.StatusCode.INVALID_ARGUMENT and from_tgis.details().startswith("the prompt has")
    completion = _openai_error(server, "completions", {"prompt": TOO_LONG})
    chat = _openai_error(server, "chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]})
    assert (completion["param"], chat["param"]) == ("prompt", "messages")
    assert completion["message"].startswith("the prompt has") and chat["message"].startswith("the prompt has")


def test_truncation_lets_tgis_serve_the_same_long_prompt(channel):
    """TGIS's truncate_input_tokens keeps the last tokens; the core applies it before the context check."""
    request = tgis.BatchedGenerationRequest(
        requests=[tgis.GenerationRequest(text=TOO_LONG)],
        params=tgis.Parameters(truncate_input_tokens=8, stopping=tgis.StoppingCriteria(max_new_tokens=3)),
    )
    reply = tgis_grpc.GenerationServiceStub(channel).Generate(request, timeout=60).responses[0]
    assert (reply.input_token_count, reply.generated_token_count) == (8, 3)


# ---- one bearer-token check ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("given", "reason"), [(None, "missing"), (f"Bearer {TOKEN}x", "wrong"), (TOKEN, "wrong")])
def test_every_door_refuses_a_missing_or_wrong_token(channel, server, given, reason):
    metadata = [("authorization", given)] if given else None
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.AdaptersStub(channel).ListAdapters(pb.ListAdaptersRequest(), metadata=metadata, timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in info.value.details() and info.value.details().endswith(f"({reason} token)")
    headers = {"authorization": given} if given else {}
    for path, body in [
        ("load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}),
        ("unload_lora_adapter", {"lora_name": "x"}),
    ]:
        status, reply_headers, reply = _post(server, path, body, headers)
        assert status == 401 and reply_headers["www-authenticate"] == "Bearer", reply
        assert reply["error"]["type"] == "authentication_error" and reply["error"]["code"] == "invalid_api_key"
        assert reply["error"]["message"].endswith(f"({reason} token)")


def test_the_right_token_passes_every_door(channel, server):
    metadata = [("authorization", f"Bearer {TOKEN}")]
    assert pb_grpc.AdaptersStub(channel).ListAdapters(pb.ListAdaptersRequest(), metadata=metadata, timeout=60)
    status, _, reply = _post(server, "unload_lora_adapter", {"lora_name": "x"}, {"authorization": f"Bearer {TOKEN}"})
    assert status == 404 and "x" in reply["error"]["message"]  # past the check: the adapter is not loaded
    # Generation stays open on both doors.
    assert pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=2), timeout=60)
    assert _post(server, "completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_the_http_refusal_the_ray_ingress_sends():
    """The Ray HTTP ingress answers its admin routes with `error_json` of the BearerToken refusal: 401 with a
    reason and the challenge header (it used to send neither)."""
    with pytest.raises(UnauthenticatedError) as info:
        BearerToken(TOKEN).check(None, HTTP_ADMIN_NEEDS)
    response = error_json(info.value)
    body = json.loads(response.body)["error"]
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert body["message"].endswith("(missing token)") and body["code"] == "invalid_api_key"
    BearerToken(None).check(None, HTTP_ADMIN_NEEDS)  # no token configured: open
    BearerToken(TOKEN).check(f"Bearer {TOKEN}".encode(), HTTP_ADMIN_NEEDS)  # metadata may be bytes


# ---- adapter references -------------------------------------------------------------------------------------
def test_an_acquisition_abandoned_by_its_caller_releases_its_reference(server, lora_dirs):
    """A deadline or a client gone cancels the caller while the worker thread still builds a mix or stack;
    the reference that thread then takes must not leak (the adapter could never be unloaded)."""
    metadata = [("authorization", f"Bearer {TOKEN}")]
    with Client(server.target, metadata=metadata) as client:
        client.load_adapter("held", lora_dirs["qv8"])
    core, registry = server.server.core, server.server.registry

    def slow_acquire() -> object:
        time.sleep(0.3)
        return registry.acquire("held")

    async def abandon() -> None:
        task = asyncio.ensure_future(core._in_thread(slow_acquire))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.6)  # the thread ends meanwhile

    asyncio.run_coroutine_threadsafe(abandon(), server._loop).result(timeout=30)
    assert next(r for r in registry.list() if r.adapter_id == "held").active_requests == 0


# ---- small pieces of the core ---------------------------------------------------------------------------------
def test_model_names_map_to_adapters_the_same_way_for_every_http_door():
    assert [adapter_for_model(m, "SmolLM2") for m in (None, "", "base", "SmolLM2", 3, "qv8")] == [""] * 5 + ["qv8"]


def test_routing_ids_name_the_adapter_to_route_by_first():
    assert AdapterRef("a").routing_ids == ["a"]
    assert AdapterRef(stack=("p", "q", "p")).routing_ids == ["p", "q"]
    assert AdapterRef(mix=(("m", 0.5), ("n", 0.5))).routing_ids == ["m", "n"]
    assert AdapterRef().routing_ids == []


def test_sampling_values_are_float32_whichever_door_they_came_through():
    assert float32(0.7) == pytest.approx(0.7, rel=1e-7) and float32(0.7) != 0.7
    assert float32(1e300) == float("inf")
