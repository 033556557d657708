"""Adapter state that must heal or go away: a failed read-back clears once the files are fixed, mixes and
stacks die with their members, and nothing is left referenced."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.app import ServerConfig

from tests.helpers import ServerThread


def test_a_failed_read_back_heals_once_the_files_are_fixed(tiny_dir, lora_dirs, tmp_path):
    """An adapter dropped to disk (one device slot in use, no host cache) whose weights are then corrupted:
    its requests fail without naming any server path; once the file is good again, the next request works."""
    paths = {name: shutil.copytree(lora_dirs[name], tmp_path / name) for name in ("qv8", "pattern", "head")}
    config = ServerConfig(
        model=tiny_dir, max_batch_size=4, max_seq_len=128, max_adapters=2, max_cpu_adapters=0, max_lora_rank=16
    )
    with ServerThread(config) as server, Client(server.target, timeout=60) as client:
        for name, path in paths.items():
            client.load_adapter(name, str(path))
        state = {info.adapter_id: info.state for info in client.list_adapters()}
        assert state["qv8"] == "disk", state  # evicted, then its host copy dropped
        weights = Path(paths["qv8"]) / "adapter_model.safetensors"
        good = weights.read_bytes()
        weights.write_bytes(good[:100])
        with pytest.raises(DeltaserveError) as info:
            client.generate("Broken", adapter_id="qv8", max_new_tokens=2)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "qv8" in info.value.message
        assert str(tmp_path) not in info.value.message
        weights.write_bytes(good)
        for _ in range(3):
            assert client.generate("Healed", adapter_id="qv8", max_new_tokens=2).generated_tokens == 2
        assert all(info.active_requests == 0 for info in client.list_adapters())


def test_mixes_and_stacks_die_with_their_members(campaign, lora_dirs):
    with Client(campaign.target, timeout=60) as client:
        client.load_adapter("mix_a", str(shutil.copytree(lora_dirs["qv8"], Path(campaign.root) / "mix_a")))
        client.load_adapter("mix_b", str(shutil.copytree(lora_dirs["pattern"], Path(campaign.root) / "mix_b")))
        with campaign.beside():
            client.generate("Mixed", adapter_mix={"mix_a": 0.5, "mix_b": 0.5}, max_new_tokens=2)
            client.generate("Stacked", adapter_stack=["mix_a", "mix_b"], max_new_tokens=2)
        derived = [
            info.adapter_id for info in client.list_adapters() if "mix_a" in info.adapter_id and "|" in info.adapter_id
        ]
        assert len(derived) == 2, derived
        client.unload_adapter("mix_a")
        listed = [info.adapter_id for info in client.list_adapters() if info.state != "unloading"]
        assert not any("mix_a" in adapter_id for adapter_id in listed), listed
        for call in (
            lambda: client.generate("Mixed", adapter_mix={"mix_a": 0.5, "mix_b": 0.5}, max_new_tokens=2),
            lambda: client.generate("Stacked", adapter_stack=["mix_a", "mix_b"], max_new_tokens=2),
        ):
            with pytest.raises(DeltaserveError) as info:
                call()
            assert info.value.code == grpc.StatusCode.NOT_FOUND and "mix_a" in info.value.message
        client.unload_adapter("mix_b")
    campaign.assert_clean()
