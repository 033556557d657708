"""A dead engine is visible: in-flight and new requests get UNAVAILABLE at once (never hang until their
deadline), health turns NOT_SERVING, and `serve` ends with status 1 so that a supervisor restarts it.

The fault is injected into the real runner: its decode raises, and so does the row clean-up the step's error
handler calls, which is the path that used to end the engine thread silently."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.app import Server
from deltaserve.server.config import ServerConfig
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _broken(*args, **kwargs):
    raise RuntimeError("injected device failure")


def test_a_dead_engine_fails_fast_reports_not_serving_and_exits_non_zero(tiny_dir):
    config = ServerConfig.of(model=tiny_dir, max_batch_size=4, max_seq_len=128, host="127.0.0.1", port=0)
    server = Server.create(config)
    loop = asyncio.new_event_loop()
    outcome: dict[str, int] = {}
    stop = asyncio.Event()  # never set: only the engine's death ends this server
    thread = threading.Thread(
        target=lambda: outcome.setdefault("status", loop.run_until_complete(server.serve_until(stop)))
    )
    thread.start()
    deadline = time.monotonic() + 60
    while server.port is None and time.monotonic() < deadline:
        time.sleep(0.05)
    target = f"127.0.0.1:{server.port}"
    with Client(target, timeout=30) as client:
        assert client.generate("Healthy", max_new_tokens=2).generated_tokens == 2
        server.runner.decode = _broken
        server.runner.zero_blocks = _broken
        started = time.monotonic()
        with pytest.raises(DeltaserveError) as info:
            client.generate("Dies", max_new_tokens=8)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "injected" not in info.value.message
        with pytest.raises(DeltaserveError) as later:
            client.generate("After", max_new_tokens=2, timeout=20)
        assert later.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 10  # failed at once, not at the deadline
    thread.join(timeout=60)
    assert outcome.get("status") == 1
    assert server.engine.failure is not None and not server.engine.alive


def test_health_reports_not_serving_while_the_dead_server_drains(tiny_dir):
    config = ServerConfig.of(
        model=tiny_dir, max_batch_size=4, max_seq_len=128, host="127.0.0.1", port=0, shutdown_grace_seconds=5
    )
    server = Server.create(config)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_until_complete, args=(server.start(),), daemon=True).start()
    deadline = time.monotonic() + 60
    while server.grpc_server is None and time.monotonic() < deadline:
        time.sleep(0.05)
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    try:
        target = f"127.0.0.1:{server.port}"
        server.runner.decode = _broken
        server.runner.zero_blocks = _broken
        with Client(target, timeout=30) as client, pytest.raises(DeltaserveError):
            client.generate("Dies", max_new_tokens=4)
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            status = None
            while time.monotonic() < deadline:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
