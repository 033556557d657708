"""Hostile requests: one request's values can fail that request, never its neighbours in the batch."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from deltaserve.client import Client, DeltaserveError
from deltaserve.testing.kinds import make_bottleneck
from safetensors.torch import load_file, save_file


def test_an_overflowing_adapter_fails_only_its_own_requests(campaign, tiny_dir):
    """Bottleneck biases of 3e38 are finite (so the adapter loads), but added twice per layer they overflow: the
    adapter's greedy and sampled requests fail with FAILED_PRECONDITION; the victim beside them is untouched."""
    directory = Path(make_bottleneck(tiny_dir, str(Path(campaign.root) / "overflowing"), "houlsby", seed=8))
    weights = directory / "adapter.safetensors"
    tensors = {
        k: torch.full_like(v, 3e38) if k.endswith("adapter_up.bias") else v for k, v in load_file(weights).items()
    }
    save_file(tensors, weights)

    def attack(sampled: bool) -> grpc.StatusCode | None:
        options = dict(temperature=0.9, seed=1) if sampled else {}
        with Client(campaign.target, timeout=120) as client:
            try:
                client.generate("Overflow", adapter_id="overflowing", max_new_tokens=4, **options)
            except DeltaserveError as err:
                assert "not finite" in err.message and "overflowing" in err.message, err.message
                return err.code
        return None

    with Client(campaign.target, timeout=60) as client:
        client.load_adapter("overflowing", str(directory))
        try:
            with campaign.beside(), ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(attack, [True, False, True, False]))
        finally:
            client.unload_adapter("overflowing")
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * 4
    campaign.assert_clean()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (dict(repetition_penalty=1e-40, temperature=0.9), "repetition_penalty must be a finite number in"),
        (dict(stop=[f"stop{i}" for i in range(17)]), "at most 16 strings"),
        (dict(stop=["x" * 513]), "at most 512 characters"),
    ],
    ids=["tiny_penalty", "many_stops", "long_stop"],
)
def test_values_that_would_stall_or_break_a_batch_are_refused_up_front(campaign, options, fragment):
    with campaign.beside(), Client(campaign.target, timeout=60) as client, pytest.raises(DeltaserveError) as info:
        client.generate("Hostile", max_new_tokens=4, **options)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.message
    campaign.assert_clean()


def test_a_huge_prompt_is_tokenized_off_the_event_loop(campaign):
    """Megabytes of prompt take seconds to tokenize; health and the victim must not wait for it."""
    prompt = "many words " * 330_000  # 3.6 MB, under the 4 MiB message cap
    with campaign.beside(), Client(campaign.target, timeout=120) as client, pytest.raises(DeltaserveError) as info:
        client.generate(prompt, max_new_tokens=2)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "tokens" in info.value.message
    campaign.assert_clean()


def test_a_tgis_batch_is_capped(campaign):
    from deltaserve.client.fmaas import generation_pb2 as tgis_pb
    from deltaserve.client.fmaas import generation_pb2_grpc as tgis_grpc

    batch = tgis_pb.BatchedGenerationRequest(requests=[tgis_pb.GenerationRequest(text="x")] * 129)
    with campaign.beside(), grpc.insecure_channel(campaign.target) as channel, pytest.raises(grpc.RpcError) as info:
        tgis_grpc.GenerationServiceStub(channel).Generate(batch, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 128" in info.value.details()
    campaign.assert_clean()


def test_the_waiting_queue_is_bounded(tiny_dir):
    """One row busy, two requests waiting: the next is refused at once with RESOURCE_EXHAUSTED, and every
    accepted request still completes."""
    from deltaserve.server.config import ServerConfig
    from deltaserve.testing.helpers import ServerThread

    config = ServerConfig.of(model=tiny_dir, max_batch_size=1, max_seq_len=512, max_waiting_requests=2)
    with ServerThread(config) as running, Client(running.target, timeout=120) as client:
        registry = running.server.metrics.registry
        with ThreadPoolExecutor(3) as pool:
            accepted = [pool.submit(client.generate, "Queued", max_new_tokens=500, min_new_tokens=500)]
            _wait_for(lambda: registry.get_sample_value("deltaserve_requests_running") == 1)
            accepted += [pool.submit(client.generate, "Queued", max_new_tokens=4) for _ in range(2)]
            _wait_for(lambda: registry.get_sample_value("deltaserve_requests_waiting") == 2)
            with pytest.raises(DeltaserveError) as info:
                client.generate("One too many", max_new_tokens=4)
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in info.value.message
            assert [future.result().generated_tokens for future in accepted] == [500, 4, 4]


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
