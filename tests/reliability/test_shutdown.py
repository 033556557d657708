"""Shutdown and stuck work: the drain is observable (NOT_SERVING, new work refused, in-flight work finished),
and loads that hang (a stalled file system, injected into the real registry's loader) neither starve the
other calls nor keep the server from stopping."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_the_drain_answers_not_serving_and_finishes_in_flight_work(tiny_dir):
    config = ServerConfig.of(model=tiny_dir, max_batch_size=4, max_seq_len=256, shutdown_grace_seconds=30)
    running = ServerThread(config).__enter__()
    target = running.target
    with Client(target, timeout=120) as client:
        stream = client.generate_stream("Drain me", max_new_tokens=200, min_new_tokens=200)
        first = next(stream)  # in flight
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(), running._loop)
        deadline = time.monotonic() + 10
        while _health(target) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING  # the listener is still open
        with pytest.raises(DeltaserveError) as refused:
            client.generate("New work", max_new_tokens=2)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
    assert sum(len(chunk.token_ids) for chunk in [first, *rest]) == 200  # the in-flight stream finished
    stopping.result(timeout=60)
    running._loop.call_soon_threadsafe(running._loop.stop)


def test_hung_loads_starve_nothing_and_do_not_block_shutdown(tiny_dir, lora_dirs):
    from deltaserve.server.frontends.grpc_api import MAX_CONCURRENT_LOADS

    config = ServerConfig.of(model=tiny_dir, max_batch_size=4, max_seq_len=128, shutdown_grace_seconds=2)
    release = threading.Event()
    running = ServerThread(config).__enter__()
    registry = running.server.registry
    real_loader = registry._loader

    def hung_loader(path, spec):
        release.wait(600)  # a read that does not return
        return real_loader(path, spec)

    registry._loader = hung_loader
    try:
        with Client(running.target, timeout=60) as client:
            for i in range(MAX_CONCURRENT_LOADS):
                with pytest.raises(DeltaserveError) as late:
                    client.load_adapter(f"hung{i}", lora_dirs["qv8"], timeout=0.5)
                assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(DeltaserveError) as full:
                client.load_adapter("one_more", lora_dirs["qv8"], timeout=10)
            assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in progress" in full.value.message
            started = time.monotonic()
            client.list_adapters(timeout=5)
            assert client.generate("Still served", max_new_tokens=3, timeout=30).generated_tokens == 3
            client.tokenize("Still served", timeout=5)
            assert time.monotonic() - started < 10
        started = time.monotonic()
        asyncio.run_coroutine_threadsafe(running.server.stop(), running._loop).result(timeout=60)
        assert time.monotonic() - started < 15  # the grace (2 s) and the listener's close, not the hung loads
    finally:
        release.set()
        running._loop.call_soon_threadsafe(running._loop.stop)
