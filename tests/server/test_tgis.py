"""The TGIS-compatible service (fmaas.GenerationService) of a real server, called with vllm-tgis-adapter's own
generated stubs from a separate client process (tests/server/tgis_client.py). Every expected output is taken
from the same server's native deltaserve.v1 API, never written down here."""

from __future__ import annotations

import base64
import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from deltaserve.client import Client
from deltaserve.client.fmaas import generation_pb2 as tgis_pb
from deltaserve.client.fmaas import generation_pb2_grpc as tgis_grpc
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

MAX_SEQ_LEN = 128
CLIENT_SCRIPT = pathlib.Path(__file__).with_name("tgis_client.py")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm_tgis_adapter") is None,
    reason="vllm-tgis-adapter is not installed (`make install` adds it with --no-deps; its stubs are the client)",
)


@pytest.fixture(scope="module")
def server(tiny_dir, lora_dirs):
    config = ServerConfig.of(
        model=tiny_dir, max_batch_size=4, max_seq_len=MAX_SEQ_LEN, max_adapters=3, max_lora_rank=16
    )
    with ServerThread(config) as running:
        Client(running.target).load_adapter("qv8", lora_dirs["qv8"])
        yield running


@pytest.fixture(scope="module")
def native(server):
    with Client(server.target, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


class TgisClient:
    """Talks to tgis_client.py: one JSON call per line, one JSON reply per line."""

    def __init__(self, target: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CLIENT_SCRIPT), target], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def call(self, method: str, request: dict | None = None) -> dict:
        self.process.stdin.write(json.dumps({"method": method, "request": request or {}}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the TGIS client process exited ({self.process.poll()})"
        return json.loads(line)

    def ok(self, method: str, request: dict | None = None) -> dict | list[dict]:
        reply = self.call(method, request)
        assert reply["ok"], reply
        return reply["responses"] if method == "GenerateStream" else reply["response"]

    def error(self, method: str, request: dict) -> tuple[str, str]:
        reply = self.call(method, request)
        assert not reply["ok"], reply
        return reply["code"], reply["details"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def tgis(server):
    client = TgisClient(server.target)
    yield client
    client.close()


def _generate(tgis: TgisClient, texts: list[str], params: dict, **fields) -> list[dict]:
    request = {"requests": [{"text": text} for text in texts], "params": params, **fields}
    return tgis.ok("Generate", request)["responses"]


def _same_logprobs(got: list[float], expected: list[float]) -> bool:
    """Equal up to float32 rounding: a prompt batched with others (a TGIS batch) sums its fp32 logits in another
    order than the same prompt alone, which moves the last bits; the chosen tokens are compared exactly."""
    return len(got) == len(expected) and np.allclose(np.float32(got), np.float32(expected), rtol=0, atol=1e-4)


_REASON = {"length": "MAX_TOKENS", "eos": "EOS_TOKEN", "stop_sequence": "STOP_SEQUENCE"}


# ---- the contract ------------------------------------------------------------------------------------------
def test_proto_is_wire_identical_to_vllm_tgis_adapter(tgis):
    """Every message, field name and number, enum value and method of our generation.proto equals the
    published one (only the file name differs)."""
    theirs = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(tgis.call("descriptor")["descriptor"]))
    ours = descriptor_pb2.FileDescriptorProto.FromString(tgis_pb.DESCRIPTOR.serialized_pb)

    def normalized(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
        file.name = ""
        file.ClearField("options")
        pending = list(file.message_type)
        while pending:
            message = pending.pop()
            for field in message.field:
                field.ClearField("json_name")
            pending.extend(message.nested_type)
        return file

    assert normalized(theirs) == normalized(ours)


# ---- generation equals the native API -------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["qv8", ""])
def test_generate_equals_native(tgis, native, tokenizer, adapter):
    params = {"stopping": {"max_new_tokens": 12}, "response": {"generated_tokens": True, "token_logprobs": True}}
    fields = {"adapter_id": adapter} if adapter else {}
    responses = _generate(tgis, PROMPTS[:3], params, **fields)
    assert len(responses) == 3
    for prompt, response in zip(PROMPTS[:3], responses, strict=True):
        expected = native.generate(prompt, adapter_id=adapter, max_new_tokens=12, logprobs=True)
        assert response["text"] == expected.text
        assert response["generated_token_count"] == expected.generated_tokens
        assert response["input_token_count"] == expected.prompt_tokens
        assert response["stop_reason"] == _REASON[expected.finish_reason]
        assert [t["text"] for t in response["tokens"]] == tokenizer.convert_ids_to_tokens(expected.token_ids)
        assert _same_logprobs([t["logprob"] for t in response["tokens"]], expected.logprobs)
        assert response["seed"] == "0"  # greedy: no seed


def test_adapter_changes_the_output(tgis):
    """So that the adapter comparisons above cannot pass with the adapter ignored."""
    params = {"stopping": {"max_new_tokens": 12}}
    with_adapter = _generate(tgis, PROMPTS[:2], params, adapter_id="qv8")
    base = _generate(tgis, PROMPTS[:2], params)
    assert [r["text"] for r in with_adapter] != [r["text"] for r in base]


def test_prefix_id_is_adapter_id(tgis, native):
    expected = native.generate(PROMPTS[1], adapter_id="qv8", max_new_tokens=10).text
    params = {"stopping": {"max_new_tokens": 10}}
    assert _generate(tgis, [PROMPTS[1]], params, prefix_id="qv8")[0]["text"] == expected
    assert _generate(tgis, [PROMPTS[1]], params, prefix_id="qv8", adapter_id="qv8")[0]["text"] == expected
    code, details = tgis.error(
        "Generate", {"prefix_id": "qv8", "adapter_id": "other", "requests": [{"text": PROMPTS[1]}]}
    )
    assert code == "INVALID_ARGUMENT"
    assert "prefix_id" in details and "'other'" in details


def test_model_id_is_accepted_and_ignored(tgis, native):
    expected = native.generate(PROMPTS[0], max_new_tokens=6).text
    response = _generate(tgis, [PROMPTS[0]], {"stopping": {"max_new_tokens": 6}}, model_id="any-name")
    assert response[0]["text"] == expected


def test_stream_concatenates_to_generate(tgis, native, tokenizer):
    params = {
        "stopping": {"max_new_tokens": 15},
        "response": {"generated_tokens": True, "token_logprobs": True, "input_text": True},
    }
    chunks = tgis.ok("GenerateStream", {"adapter_id": "qv8", "request": {"text": PROMPTS[2]}, "params": params})
    expected = native.generate(PROMPTS[2], adapter_id="qv8", max_new_tokens=15, logprobs=True)
    first, rest = chunks[0], chunks[1:]
    assert first["input_token_count"] == expected.prompt_tokens
    assert first["text"] == PROMPTS[2]  # input_text: the prompt comes first
    assert first["generated_token_count"] == 0 and not first["tokens"]
    assert "".join(c["text"] for c in chunks) == PROMPTS[2] + expected.text
    assert [t["text"] for c in rest for t in c["tokens"]] == tokenizer.convert_ids_to_tokens(expected.token_ids)
    assert _same_logprobs([t["logprob"] for c in rest for t in c["tokens"]], expected.logprobs)
    assert [c["generated_token_count"] for c in rest] == list(range(1, expected.generated_tokens + 1))
    assert all(c["stop_reason"] == "NOT_FINISHED" for c in chunks[:-1])
    assert chunks[-1]["stop_reason"] == _REASON[expected.finish_reason]
    unary = _generate(tgis, [PROMPTS[2]], params, adapter_id="qv8")[0]
    assert unary["text"] == "".join(c["text"] for c in chunks)


# ---- stopping criteria ------------------------------------------------------------------------------------
def test_stop_sequences(tgis, native):
    free = native.generate(PROMPTS[3], adapter_id="qv8", max_new_tokens=20, min_new_tokens=20).text
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # text the model will produce, from the native run
    expected = native.generate(PROMPTS[3], adapter_id="qv8", max_new_tokens=20, min_new_tokens=20, stop=[stop])
    assert expected.finish_reason == "stop_sequence"
    stopping = {"max_new_tokens": 20, "min_new_tokens": 20, "stop_sequences": ["never-appears", stop]}
    kept = _generate(tgis, [PROMPTS[3]], {"stopping": stopping}, adapter_id="qv8")[0]
    assert kept["stop_reason"] == "STOP_SEQUENCE" and kept["stop_sequence"] == stop
    assert kept["text"] == expected.text + stop  # TGIS keeps the stop sequence by default
    cut = _generate(tgis, [PROMPTS[3]], {"stopping": {**stopping, "include_stop_sequence": False}}, adapter_id="qv8")
    assert cut[0]["text"] == expected.text
    chunks = tgis.ok(
        "GenerateStream", {"adapter_id": "qv8", "request": {"text": PROMPTS[3]}, "params": {"stopping": stopping}}
    )
    assert "".join(c["text"] for c in chunks) == expected.text + stop
    assert chunks[-1]["stop_reason"] == "STOP_SEQUENCE" and chunks[-1]["stop_sequence"] == stop


def test_max_new_tokens_and_the_context_limit(tgis, native):
    five = _generate(tgis, [PROMPTS[0]], {"stopping": {"max_new_tokens": 5, "min_new_tokens": 5}})[0]
    assert five["stop_reason"] == "MAX_TOKENS" and five["generated_token_count"] == 5
    assert five["text"] == native.generate(PROMPTS[0], max_new_tokens=5, min_new_tokens=5).text
    # More than the context holds: TGIS caps it at the room left and reports TOKEN_LIMIT.
    room = MAX_SEQ_LEN - len(native.tokenize(PROMPTS[0]).token_ids)
    capped = _generate(tgis, [PROMPTS[0]], {"stopping": {"max_new_tokens": 500, "min_new_tokens": room}})[0]
    assert capped["stop_reason"] == "TOKEN_LIMIT" and capped["generated_token_count"] == room
    assert capped["text"] == native.generate(PROMPTS[0], max_new_tokens=room, min_new_tokens=room).text


def test_time_limit(tgis, native, server):
    params = {"stopping": {"max_new_tokens": 100, "min_new_tokens": 100, "time_limit_millis": 20}}
    response = _generate(tgis, [PROMPTS[1]], params)[0]
    assert response["stop_reason"] == "TIME_LIMIT"
    assert 0 <= response["generated_token_count"] < 100
    full = native.generate(PROMPTS[1], max_new_tokens=100, min_new_tokens=100).text
    assert full.startswith(response["text"])
    chunks = tgis.ok("GenerateStream", {"request": {"text": PROMPTS[1]}, "params": params})
    assert chunks[-1]["stop_reason"] == "TIME_LIMIT"
    assert full.startswith("".join(c["text"] for c in chunks))
    assert native.generate(PROMPTS[0], max_new_tokens=3).generated_tokens == 3  # the rows were freed


# ---- sampling -------------------------------------------------------------------------------------------------
def test_sampling_with_a_seed_equals_native(tgis, native):
    sampling = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 1234}
    params = {"method": "SAMPLE", "sampling": sampling, "stopping": {"max_new_tokens": 12}}
    response = _generate(tgis, [PROMPTS[0]], params, adapter_id="qv8")[0]
    expected = native.generate(
        PROMPTS[0], adapter_id="qv8", max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=1234
    )
    assert response["text"] == expected.text
    assert response["seed"] == "1234"


def test_sampling_without_a_seed_reports_the_seed_it_used(tgis, native):
    params = {"method": "SAMPLE", "sampling": {"temperature": 1.0}, "stopping": {"max_new_tokens": 12}}
    first, second = _generate(tgis, [PROMPTS[0], PROMPTS[0]], params)
    assert first["seed"] != second["seed"]  # one seed drawn per prompt
    for response in (first, second):
        replay = native.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=int(response["seed"]))
        assert response["text"] == replay.text


def test_repetition_penalty_and_greedy_temperature_zero(tgis, native):
    params = {"decoding": {"repetition_penalty": 1.3}, "stopping": {"max_new_tokens": 12}}
    expected = native.generate(PROMPTS[2], max_new_tokens=12, repetition_penalty=1.3).text
    assert _generate(tgis, [PROMPTS[2]], params)[0]["text"] == expected
    sample_at_zero = {"method": "SAMPLE", "sampling": {"temperature": 0.0}, "stopping": {"max_new_tokens": 12}}
    response = _generate(tgis, [PROMPTS[2]], sample_at_zero)[0]
    assert response["text"] == native.generate(PROMPTS[2], max_new_tokens=12).text
    assert response["seed"] == "0"


# ---- response options, truncation, tokenize, model info --------------------------------------------------------
def test_input_text_and_input_tokens(tgis, native):
    params = {"stopping": {"max_new_tokens": 6}, "response": {"input_text": True, "input_tokens": True}}
    response = _generate(tgis, [PROMPTS[3]], params)[0]
    assert response["text"] == PROMPTS[3] + native.generate(PROMPTS[3], max_new_tokens=6).text
    assert [t["text"] for t in response["input_tokens"]] == native.tokenize(PROMPTS[3]).tokens
    assert not response["tokens"]  # generated_tokens was not asked for


def test_truncate_input_tokens_keeps_the_last_tokens(tgis, native):
    tokens = native.tokenize(PROMPTS[1]).tokens
    params = {"truncate_input_tokens": 3, "stopping": {"max_new_tokens": 4}, "response": {"input_tokens": True}}
    response = _generate(tgis, [PROMPTS[1]], params)[0]
    assert response["input_token_count"] == 3
    assert [t["text"] for t in response["input_tokens"]] == tokens[-3:]
    counted = tgis.ok(
        "Tokenize", {"requests": [{"text": PROMPTS[1]}], "return_tokens": True, "truncate_input_tokens": 3}
    )
    assert counted["responses"][0]["token_count"] == 3 and counted["responses"][0]["tokens"] == tokens[-3:]


def test_tokenize_equals_native(tgis, native):
    request = {"requests": [{"text": p} for p in PROMPTS], "return_tokens": True, "return_offsets": True}
    responses = tgis.ok("Tokenize", {**request, "adapter_id": "qv8"})["responses"]
    for prompt, response in zip(PROMPTS, responses, strict=True):
        expected = native.tokenize(prompt)
        assert response["token_count"] == len(expected.token_ids)
        assert response["tokens"] == expected.tokens
        assert "".join(prompt[o["start"] : o["end"]] for o in response["offsets"]) == prompt
    bare = tgis.ok("Tokenize", {"requests": [{"text": PROMPTS[0]}]})["responses"][0]
    assert bare["token_count"] == len(native.tokenize(PROMPTS[0]).token_ids) and not bare["tokens"]


def test_model_info(tgis, native):
    info = tgis.ok("ModelInfo", {"model_id": "whatever"})
    assert info["model_kind"] == "DECODER_ONLY"
    assert info["max_sequence_length"] == native.model_info().max_seq_len == MAX_SEQ_LEN
    assert info["max_new_tokens"] == MAX_SEQ_LEN - 1


# ---- errors ----------------------------------------------------------------------------------------------------
def test_unknown_adapter_is_not_found(tgis, server):
    for method, request in [
        ("Generate", {"adapter_id": "missing", "requests": [{"text": PROMPTS[0]}]}),
        ("Generate", {"prefix_id": "missing", "requests": [{"text": PROMPTS[0]}]}),
        ("GenerateStream", {"adapter_id": "missing", "request": {"text": PROMPTS[0]}}),
        ("Tokenize", {"adapter_id": "missing", "requests": [{"text": PROMPTS[0]}]}),
    ]:
        code, details = tgis.error(method, request)
        assert code == "NOT_FOUND" and "'missing'" in details, (method, details)
    _assert_still_serving(tgis, server)


BAD_PARAMS = [
    ({"method": "SAMPLE", "sampling": {"typical_p": 0.5}}, "typical_p"),
    ({"method": "SAMPLE", "sampling": {"typical_p": 1.5}}, "typical_p"),
    ({"method": "SAMPLE", "sampling": {"top_p": 1.5}}, "top_p"),
    ({"method": "SAMPLE", "sampling": {"temperature": -1.0}}, "temperature"),
    ({"decoding": {"repetition_penalty": -1.0}}, "repetition_penalty"),
    ({"decoding": {"length_penalty": {"start_index": 2, "decay_factor": 1.5}}}, "length_penalty"),
    ({"decoding": {"json_schema": "{not json"}}, "decoding.json_schema"),
    ({"decoding": {"regex": "a{1,99999}"}}, "decoding.regex"),
    ({"decoding": {"choice": {"choices": []}}}, "decoding.choice"),
    ({"response": {"generated_tokens": True, "token_ranks": True}}, "token_ranks"),
    ({"response": {"generated_tokens": True, "top_n_tokens": 21}}, "top_n_tokens"),
    ({"response": {"token_logprobs": True}}, "generated_tokens"),
    ({"stopping": {"max_new_tokens": 5, "min_new_tokens": 6}}, "min_new_tokens"),
    ({"stopping": {"stop_sequences": [""]}}, "stop_sequences"),
]


@pytest.mark.parametrize(("params", "named"), BAD_PARAMS, ids=[named for _, named in BAD_PARAMS])
def test_bad_params_are_invalid_argument(tgis, params, named):
    for method, request in [
        ("Generate", {"adapter_id": "qv8", "requests": [{"text": PROMPTS[0]}], "params": params}),
        ("GenerateStream", {"adapter_id": "qv8", "request": {"text": PROMPTS[0]}, "params": params}),
    ]:
        code, details = tgis.error(method, request)
        assert code == "INVALID_ARGUMENT" and named in details, (method, details)


@pytest.mark.parametrize(
    ("decoding", "check"),
    [
        ({"regex": "[ab]{3}"}, lambda text: len(text) == 3 and set(text) <= set("ab")),
        ({"choice": {"choices": ["yes", "no"]}}, lambda text: text in ("yes", "no")),
        ({"json_schema": '{"enum": [1, 2, 3]}'}, lambda text: text in ("1", "2", "3")),
        ({"format": "JSON"}, lambda text: text.startswith("{")),
    ],
    ids=["regex", "choice", "json_schema", "format"],
)
def test_guided_decoding(tgis, decoding, check):
    params = {"decoding": decoding, "stopping": {"max_new_tokens": 16}}
    response = tgis.ok("Generate", {"adapter_id": "qv8", "requests": [{"text": PROMPTS[0]}], "params": params})
    text = response["responses"][0]["text"]
    assert check(text), text


def test_bad_inputs_are_invalid_argument(tgis, server):
    code, details = tgis.error("Generate", {"requests": [{"text": PROMPTS[0]}, {"text": ""}]})
    assert code == "INVALID_ARGUMENT" and "requests[1].text" in details
    code, details = tgis.error("Generate", {"requests": [{"text": "word " * MAX_SEQ_LEN}]})
    assert code == "INVALID_ARGUMENT" and "context" in details
    code, _ = tgis.error("GenerateStream", {"request": {"text": ""}})
    assert code == "INVALID_ARGUMENT"
    _assert_still_serving(tgis, server)


def _assert_still_serving(tgis: TgisClient, server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fmaas.GenerationService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    response = _generate(tgis, [PROMPTS[0]], {"stopping": {"max_new_tokens": 3}}, adapter_id="qv8")[0]
    assert response["generated_token_count"] == 3


def test_cancelled_stream_leaves_the_batch(server):
    """A TGIS client that hangs up mid-stream cancels its engine request (this repository's stubs: the call must
    be cancelled from this process)."""
    metrics = server.server.metrics.registry
    labels = {"adapter": "base", "status": "cancelled"}
    cancelled_before = metrics.get_sample_value("deltaserve_requests_total", labels) or 0
    with grpc.insecure_channel(server.target) as channel:
        stub = tgis_grpc.GenerationServiceStub(channel)
        request = tgis_pb.SingleGenerationRequest(
            request=tgis_pb.GenerationRequest(text=PROMPTS[0]),
            params=tgis_pb.Parameters(stopping=tgis_pb.StoppingCriteria(max_new_tokens=110, min_new_tokens=110)),
        )
        call = stub.GenerateStream(request, timeout=60)
        received = [next(call) for _ in range(4)]
        call.cancel()
    assert all(message.stop_reason == tgis_pb.NOT_FINISHED for message in received)
    deadline = time.monotonic() + 10
    while server.server.engine.num_running:
        assert time.monotonic() < deadline, "the cancelled request is still running"
        time.sleep(0.02)
    assert metrics.get_sample_value("deltaserve_requests_total", labels) == cancelled_before + 1  # not finished


def test_health_and_reflection_name_the_service(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="fmaas.GenerationService"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        asks = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="fmaas.GenerationService"),
        ]
        listed, described = list(reflection.ServerReflectionInfo(iter(asks), timeout=10))
    assert "fmaas.GenerationService" in {s.name for s in listed.list_services_response.service}
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(f)
        for f in described.file_descriptor_response.file_descriptor_proto
    ]
    assert any(f.package == "fmaas" and f.service[0].name == "GenerationService" for f in files)


# ---- the admin token guards the Adapters service only --------------------------------------------------------
def test_admin_token_leaves_tgis_open(tiny_dir):
    config = ServerConfig.of(model=tiny_dir, max_batch_size=2, max_seq_len=MAX_SEQ_LEN, admin_token="s3cret")
    with ServerThread(config) as running, grpc.insecure_channel(running.target) as channel:
        stub = tgis_grpc.GenerationServiceStub(channel)  # this repository's stubs: same wire format
        request = tgis_pb.BatchedGenerationRequest(
            requests=[tgis_pb.GenerationRequest(text=PROMPTS[0])],
            params=tgis_pb.Parameters(stopping=tgis_pb.StoppingCriteria(max_new_tokens=4)),
        )
        assert stub.Generate(request, timeout=60).responses[0].generated_token_count == 4
        with Client(running.target, timeout=60) as client:
            assert (
                stub.Generate(request, timeout=60).responses[0].text
                == client.generate(PROMPTS[0], max_new_tokens=4).text
            )
