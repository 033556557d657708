"""The fault campaign's shared pieces: one server on the tiny model, a victim request that runs beside every
attack, and a health probe that must keep answering quickly throughout."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pytest
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.references import greedy_reference, load_reference_model, tokenizer_for

VICTIM_TOKENS = 12
# A health check answers from the event loop: anything slower means the loop (or the GIL) was held.
HEALTH_BOUND_SECONDS = 2.0


@dataclass
class Campaign:
    server: ServerThread
    root: str  # the server's --adapter-root
    victim_tokens: list[int]
    lora: str  # a real PEFT LoRA inside the root
    slow_health: list[float] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.server.target

    def victim(self) -> list[int]:
        with Client(self.target, timeout=120) as client:
            return client.generate(PROMPTS[0], max_new_tokens=VICTIM_TOKENS).token_ids

    @contextmanager
    def beside(self) -> Iterator[None]:
        """Run the body as the attack while a victim generates and health is probed; then check both."""
        outcome: dict[str, list[int]] = {}
        stop = threading.Event()
        victim = threading.Thread(target=lambda: outcome.setdefault("tokens", self.victim()))
        probe = threading.Thread(target=self._probe_health, args=(stop,))
        victim.start()
        probe.start()
        try:
            yield
        finally:
            victim.join(timeout=120)
            stop.set()
            probe.join(timeout=30)
        assert outcome.get("tokens") == self.victim_tokens, "the victim's tokens changed beside the attack"
        assert self.slow_health == [], f"health answered slower than {HEALTH_BOUND_SECONDS}s: {self.slow_health}"

    def _probe_health(self, stop: threading.Event) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
                elapsed = time.monotonic() - started
                if elapsed > HEALTH_BOUND_SECONDS or response.status != health_pb2.HealthCheckResponse.SERVING:
                    self.slow_health.append(round(elapsed, 3))
                stop.wait(0.05)

    def assert_clean(self) -> None:
        """Nothing left referenced, loading or half-registered after a case."""
        with Client(self.target, timeout=60) as client:
            adapters = client.list_adapters()
        assert all(info.active_requests == 0 for info in adapters), adapters
        assert all(info.state in ("device", "host", "disk") for info in adapters), adapters
        # The engine updates its gauges at the end of the step in which the last request finished, which may
        # be just after that request's client returned.
        registry = self.server.server.metrics.registry
        deadline = time.monotonic() + 10
        while registry.get_sample_value("deltaserve_requests_running") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert registry.get_sample_value("deltaserve_requests_running") == 0
        assert registry.get_sample_value("deltaserve_requests_waiting") == 0
        adapters = self.server.server.registry
        assert adapters.occupied_slots() == adapters.resident("device")  # no slot reserved by a failed copy


@pytest.fixture(scope="package")
def campaign(tmp_path_factory, tiny_dir, lora_dirs) -> Iterator[Campaign]:
    root = tmp_path_factory.mktemp("root")
    lora = shutil.copytree(lora_dirs["qv8"], root / "qv8")
    tokenizer = tokenizer_for(tiny_dir)
    expected = greedy_reference(
        load_reference_model(tiny_dir), tokenizer, tokenizer(PROMPTS[0])["input_ids"], VICTIM_TOKENS
    ).token_ids
    config = ServerConfig.of(
        model=tiny_dir, max_batch_size=8, max_seq_len=256, max_adapters=4, max_lora_rank=16, adapter_root=[str(root)]
    )
    with ServerThread(config) as server:
        yield Campaign(server, str(root), expected, str(lora))
