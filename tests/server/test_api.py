"""The gRPC surface of a real server: streaming, cancellation, deadlines, every bad input's status code,
health and reflection. After each failure the server must keep serving."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request

import grpc
import pytest
from deltaserve.client import Client, DeltaserveError
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.client.v1 import deltaserve_pb2_grpc as pb_grpc
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread, free_port, make_lora, make_tiny_llama
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

MAX_SEQ_LEN = 128


@pytest.fixture(scope="module")
def server(tiny_dir, lora_dirs):
    config = ServerConfig.of(
        metrics_port=free_port(),
        model=tiny_dir,
        max_batch_size=4,
        max_seq_len=MAX_SEQ_LEN,
        max_adapters=3,
        max_lora_rank=16,
    )
    with ServerThread(config) as running:
        Client(running.target).load_adapter("qv8", lora_dirs["qv8"])
        yield running


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationStub(channel)


@pytest.fixture
def adapters_stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.AdaptersStub(channel)


def _code(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    return info.value.code(), info.value.details()


def _assert_still_serving(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with Client(target, timeout=60) as client:
        assert client.generate(PROMPTS[0], max_new_tokens=3).generated_tokens == 3
        assert client.generate(PROMPTS[0], adapter_id="qv8", max_new_tokens=3).generated_tokens == 3


# ---- streaming --------------------------------------------------------------------------------------
def test_stream_equals_unary(server):
    with Client(server.target, timeout=60) as client:
        for adapter in ("", "qv8"):
            unary = client.generate(PROMPTS[1], adapter_id=adapter, max_new_tokens=20, logprobs=True)
            chunks = list(client.generate_stream(PROMPTS[1], adapter_id=adapter, max_new_tokens=20, logprobs=True))
            assert [t for c in chunks for t in c.token_ids] == unary.token_ids
            assert "".join(c.text for c in chunks) == unary.text
            assert [lp for c in chunks for lp in c.logprobs] == unary.logprobs
            assert all(c.finish_reason == "" for c in chunks[:-1])
            assert chunks[-1].finish_reason == unary.finish_reason
            assert chunks[-1].generated_tokens == unary.generated_tokens == len(unary.token_ids)
            assert len(chunks) > 1


def test_cancel_mid_stream_frees_the_row(tiny_dir):
    """With one row, a cancelled stream must leave the batch, or the next request would wait forever."""
    with ServerThread(ServerConfig.of(model=tiny_dir, max_batch_size=1, max_seq_len=512)) as running:
        with Client(running.target, timeout=60) as client:
            stream = client.generate_stream(PROMPTS[0], max_new_tokens=400, min_new_tokens=400)
            received = [next(stream) for _ in range(3)]
            stream.close()
            assert all(chunk.finish_reason == "" for chunk in received)
            follow_up = client.generate(PROMPTS[1], max_new_tokens=5)
            assert follow_up.generated_tokens == 5
        _wait_until(lambda: running.server.engine.num_running == 0)


def test_deadline_cancels_the_request(tiny_dir):
    with ServerThread(ServerConfig.of(model=tiny_dir, max_batch_size=1, max_seq_len=512)) as running:
        with Client(running.target) as client:
            with pytest.raises(DeltaserveError) as info:
                client.generate(PROMPTS[0], max_new_tokens=500, min_new_tokens=500, timeout=0.3)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert client.generate(PROMPTS[1], max_new_tokens=4, timeout=60).generated_tokens == 4
        _wait_until(lambda: running.server.engine.num_running == 0)
        metrics = running.server.metrics.registry
        assert metrics.get_sample_value("deltaserve_requests_total", {"adapter": "base", "status": "cancelled"}) == 1


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# ---- bad generation requests ------------------------------------------------------------------------
def _req(**fields) -> pb.GenerateRequest:
    fields.setdefault("max_new_tokens", 4)
    return pb.GenerateRequest(**fields)


BAD_REQUESTS = {
    "unknown adapter": (_req(prompt="hi", adapter_id="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "empty prompt": (_req(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of prompt, messages"),
    "prompt and messages": (
        _req(prompt="hi", messages=[pb.ChatMessage(role="user", content="hi")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exactly one of prompt, messages",
    ),
    "negative temperature": (
        _req(prompt="hi", temperature=-0.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    "top_p zero": (_req(prompt="hi", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    "top_p above one": (_req(prompt="hi", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    "max_new_tokens zero": (
        _req(prompt="hi", max_new_tokens=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    "max_new_tokens negative": (
        _req(prompt="hi", max_new_tokens=-3),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    "max_new_tokens beyond context": (
        _req(prompt="hi", max_new_tokens=MAX_SEQ_LEN),
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not fit the context",
    ),
    "prompt longer than context": (
        _req(prompt="word " * (MAX_SEQ_LEN + 10)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the context holds",
    ),
    "negative top_k": (_req(prompt="hi", top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "zero repetition penalty": (
        _req(prompt="hi", repetition_penalty=0.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "repetition_penalty",
    ),
    "empty stop string": (_req(prompt="hi", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    "message without role": (
        _req(messages=[pb.ChatMessage(role="", content="hi")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "role",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_generate_request(server, stub, case):
    request, expected_code, fragment = BAD_REQUESTS[case]
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        code, details = _code(call, request)
        assert code == expected_code, details
        assert fragment in details


def test_bad_requests_do_not_disturb_running_ones(server, stub):
    """A long stream keeps going, unharmed, while bad requests are refused next to it."""
    with Client(server.target, timeout=60) as client:
        reference = client.generate(PROMPTS[2], adapter_id="qv8", max_new_tokens=40)
        stream = client.generate_stream(PROMPTS[2], adapter_id="qv8", max_new_tokens=40)
        first = next(stream)
        for request, _, _ in BAD_REQUESTS.values():
            with pytest.raises(grpc.RpcError):
                stub.Generate(request, timeout=60)
        rest = list(stream)
    assert [t for c in [first, *rest] for t in c.token_ids] == reference.token_ids
    _assert_still_serving(server.target)


# ---- adapters ---------------------------------------------------------------------------------------
def _load(adapters_stub, adapter_id: str, path: str):
    return _code(adapters_stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id=adapter_id, path=path))


def test_load_errors(server, adapters_stub, lora_dirs, tmp_path, smol_dir):
    good = lora_dirs["pattern"]
    code, details = _load(adapters_stub, "x", str(tmp_path / "missing"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in details

    code, details = _load(adapters_stub, "qv8", good)
    assert code == grpc.StatusCode.ALREADY_EXISTS and "qv8" in details

    loha = shutil.copytree(good, tmp_path / "loha")
    config = json.loads((loha / "adapter_config.json").read_text())
    (loha / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    code, details = _load(adapters_stub, "loha", str(loha))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "LOHA" in details and "lora" in details

    other_base = make_tiny_llama(str(tmp_path / "other"), smol_dir, hidden_size=32, intermediate_size=64)
    misfit = make_lora(other_base, str(tmp_path / "misfit"), seed=3, r=4, target_modules=["q_proj"])
    code, details = _load(adapters_stub, "misfit", misfit)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "q_proj" in details and "do not fit" in details

    truncated = shutil.copytree(good, tmp_path / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    code, details = _load(adapters_stub, "truncated", str(truncated))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "adapter_model.safetensors" in details

    pickled = shutil.copytree(good, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    code, details = _load(adapters_stub, "pickled", str(pickled))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pickle" in details

    code, details = _load(adapters_stub, "", good)
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    listed = {a.adapter_id for a in Client(server.target).list_adapters()}
    assert listed == {"qv8"}, "a failed load must leave nothing half-registered"
    _assert_still_serving(server.target)


def test_non_finite_weights_refused(server, adapters_stub, lora_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(lora_dirs["qv8"], tmp_path / "nan")
    tensors = load_file(broken / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    code, details = _load(adapters_stub, "nan", str(broken))
    assert (
        code == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in details and name.split(".lora")[0][-6:] in details
    )


def test_unknown_unload(server, adapters_stub):
    code, details = _code(adapters_stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id="never"))
    assert code == grpc.StatusCode.NOT_FOUND and "never" in details


def test_unload_reload_serves_new_weights(server, lora_dirs):
    with Client(server.target, timeout=60) as client:
        client.load_adapter("swap", lora_dirs["pattern"])
        first = client.generate(PROMPTS[3], adapter_id="swap", max_new_tokens=8)
        assert client.unload_adapter("swap") == 0
        with pytest.raises(DeltaserveError) as info:
            client.generate(PROMPTS[3], adapter_id="swap", max_new_tokens=8)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        client.load_adapter("swap", lora_dirs["all16_rs"])
        second = client.generate(PROMPTS[3], adapter_id="swap", max_new_tokens=8)
        expected = client.generate(PROMPTS[3], adapter_id="qv8", max_new_tokens=8)
        client.unload_adapter("swap")
    assert first.token_ids != second.token_ids
    assert expected.token_ids != second.token_ids


def test_unload_while_in_flight_finishes_with_the_adapter(server, lora_dirs):
    with Client(server.target, timeout=60) as client:
        client.load_adapter("busy", lora_dirs["all16_rs"])
        reference = client.generate(PROMPTS[0], adapter_id="busy", max_new_tokens=60, min_new_tokens=60)
        stream = client.generate_stream(PROMPTS[0], adapter_id="busy", max_new_tokens=60, min_new_tokens=60)
        first = next(stream)
        assert client.unload_adapter("busy") == 1
        states = {a.adapter_id: a.state for a in client.list_adapters()}
        assert states["busy"] == "unloading"
        rest = list(stream)
        assert [t for c in [first, *rest] for t in c.token_ids] == reference.token_ids
        _wait_until(lambda: "busy" not in {a.adapter_id for a in client.list_adapters()})


def test_list_adapters_reports_kind_rank_size(server, lora_dirs):
    info = {a.adapter_id: a for a in Client(server.target).list_adapters()}["qv8"]
    assert info.kind == "lora" and info.rank == 8 and info.state == "device"
    assert info.target_modules == ["q_proj", "v_proj"]
    # 2 layers x (q: 8x64 + 64x8, v: 8x64 + 32x8) fp32 values
    assert info.size_bytes == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8) * 4
    assert info.requests_served > 0


# ---- info, tokenize, health, reflection ------------------------------------------------------------
def test_model_info_and_tokenize(server, tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    with Client(server.target) as client:
        info = client.model_info()
        assert info.max_seq_len == MAX_SEQ_LEN and info.vocab_size == 49152 and info.dtype == "float32"
        assert info.eos_token_ids == [2] and "lora" in info.adapter_kinds
        assert client.tokenize("Hello world").token_ids == tokenizer("Hello world")["input_ids"]
        chat = [{"role": "user", "content": "Hi there"}]
        rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert client.tokenize(messages=chat).token_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        by_messages = client.generate(messages=chat, max_new_tokens=6)
        by_prompt = client.generate(rendered, max_new_tokens=6)
        assert by_messages.token_ids == by_prompt.token_ids


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "deltaserve.v1.Generation", "deltaserve.v1.Adapters"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {
        "deltaserve.v1.Generation",
        "deltaserve.v1.Adapters",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_concurrent_clients_are_all_answered(server):
    results: list[int] = []

    def one(i: int) -> None:
        results.append(Client(server.target, timeout=60).generate(PROMPTS[i % 4], max_new_tokens=3).generated_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [3] * 12


def test_metrics_endpoint_counts_requests(server):
    def scrape() -> str:
        url = f"http://127.0.0.1:{server.server.config.doors.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def generated_for(adapter: str) -> float:
        lines = [
            line
            for line in scrape().splitlines()
            if line.startswith(f'deltaserve_generated_tokens_total{{adapter="{adapter}"}}')
        ]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = generated_for("qv8")
    with Client(server.target, timeout=60) as client:
        for _ in range(3):
            client.generate(PROMPTS[0], adapter_id="qv8", max_new_tokens=5, min_new_tokens=5)
    assert generated_for("qv8") == before + 15
    assert "deltaserve_time_to_first_token_seconds_bucket" in scrape()
