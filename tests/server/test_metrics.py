"""Metrics on a real server: exact per-adapter counts, the label cap, adapter-load and resource gauges,
request ids and the per-request log line."""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path

import grpc
import pytest
from deltaserve.client import Client, DeltaserveError
from deltaserve.client.v1 import deltaserve_pb2 as pb
from deltaserve.client.v1 import deltaserve_pb2_grpc as pb_grpc
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread

# The version is written once, in pyproject.toml; the server reports it through the installed package's metadata.
PROJECT_VERSION = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def server(tiny_dir, lora_dirs):
    config = ServerConfig.of(
        model=tiny_dir, max_batch_size=4, max_seq_len=128, max_adapters=3, max_lora_rank=16, metrics_max_adapters=2
    )
    with ServerThread(config) as running:
        with Client(running.target, timeout=60) as client:
            for name in ("qv8", "pattern", "all16_rs"):
                client.load_adapter(name, lora_dirs[name])
        yield running


def _value(server, name: str, **labels) -> float:
    return server.server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_counts_are_exact_per_adapter(server, tiny_dir):
    from transformers import AutoTokenizer

    prompt_len = len(AutoTokenizer.from_pretrained(tiny_dir)(PROMPTS[0])["input_ids"])
    n, tokens = 3, 5
    before = {
        name: _value(server, name, adapter="qv8")
        for name in ("deltaserve_generated_tokens_total", "deltaserve_prompt_tokens_total")
    }
    before_requests = _value(server, "deltaserve_requests_total", adapter="qv8", status="length")
    with Client(server.target, timeout=60) as client:
        for _ in range(n):
            client.generate(PROMPTS[0], adapter_id="qv8", max_new_tokens=tokens, min_new_tokens=tokens)
    assert _value(server, "deltaserve_requests_total", adapter="qv8", status="length") == before_requests + n
    assert (
        _value(server, "deltaserve_generated_tokens_total", adapter="qv8")
        == before["deltaserve_generated_tokens_total"] + n * tokens
    )
    assert (
        _value(server, "deltaserve_prompt_tokens_total", adapter="qv8")
        == before["deltaserve_prompt_tokens_total"] + n * prompt_len
    )
    assert _value(server, "deltaserve_time_to_first_token_seconds_count", adapter="qv8") >= n
    assert _value(server, "deltaserve_time_per_output_token_seconds_count", adapter="qv8") >= n


def test_adapter_label_is_capped(server):
    """metrics_max_adapters=2: the first two adapter ids seen get labels, later ones count as 'other'."""
    with Client(server.target, timeout=60) as client:
        for adapter in ("qv8", "pattern", "all16_rs", ""):
            client.generate(PROMPTS[1], adapter_id=adapter, max_new_tokens=2, min_new_tokens=2)
    labels = {
        sample.labels["adapter"]
        for metric in server.server.metrics.registry.collect()
        if metric.name == "deltaserve_generated_tokens"
        for sample in metric.samples
    }
    assert labels == {"qv8", "pattern", "other", "base"}
    assert _value(server, "deltaserve_generated_tokens_total", adapter="other") >= 2


def test_load_and_resource_metrics(server, lora_dirs, tmp_path):
    assert _value(server, "deltaserve_adapter_loads_total", kind="lora", result="ok") == 3
    with Client(server.target, timeout=60) as client, pytest.raises(DeltaserveError):
        client.load_adapter("broken", str(tmp_path / "missing"))
    assert _value(server, "deltaserve_adapter_loads_total", kind="unknown", result="invalid") == 1
    assert _value(server, "deltaserve_adapter_load_duration_seconds_count") == 4
    assert _value(server, "deltaserve_adapters_resident", tier="device") == 3
    runner = server.server.runner
    assert _value(server, "deltaserve_kv_cache_bytes") == runner.kv_cache_bytes > 0
    assert _value(server, "deltaserve_model_memory_bytes") > 0
    assert _value(server, "deltaserve_adapter_memory_bytes") > 0
    assert _value(server, "deltaserve_kv_cache_usage_ratio") == 0.0  # idle
    assert (
        _value(
            server,
            "deltaserve_info",
            model="model",
            version=PROJECT_VERSION,
            dtype="float32",
            device="cpu",
            quantization="none",
        )
        == 1
    )


def test_request_id_from_metadata_and_request_log(server, caplog):
    caplog.set_level(logging.INFO, logger="deltaserve.requests")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt=PROMPTS[2], adapter_id="qv8", max_new_tokens=3)
        response = stub.Generate(request, metadata=[("x-request-id", "trace-42")], timeout=60)
        assert response.request_id == "trace-42"
        generated = stub.Generate(request, timeout=60).request_id
        assert generated and generated != "trace-42"
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "deltaserve.requests"]
    line = next(r for r in records if r["request_id"] == "trace-42")
    assert line["adapter"] == "qv8" and line["generated_tokens"] == 3 and line["status"] in ("length", "eos")
    assert line["duration_ms"] >= line["ttft_ms"] >= line["queue_ms"] >= 0
    assert PROMPTS[2] not in caplog.text  # no prompt text in the logs
