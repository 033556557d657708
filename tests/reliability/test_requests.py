"""Hostile requests: one request's values can fail that request, never its neighbours in the batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from deltaserve.client import Client, DeltaserveError
from safetensors.torch import load_file, save_file

from tests.kinds import make_bottleneck


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
