"""Adapter state that must heal or go away: a failed read-back clears once the files are fixed, mixes and
stacks die with their members, and nothing is left referenced."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import ServerThread


def test_a_failed_read_back_heals_once_the_files_are_fixed(tiny_dir, lora_dirs, tmp_path):
    """An adapter dropped to disk (one device slot in use, no host cache) whose weights are then corrupted:
    its requests fail without naming any server path; once the file is good again, the next request works."""
    paths = {name: shutil.copytree(lora_dirs[name], tmp_path / name) for name in ("qv8", "pattern", "head")}
    config = ServerConfig.of(
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


def test_a_failed_slot_copy_leaves_nothing_behind(campaign, lora_dirs, monkeypatch):
    """Device memory runs out while an adapter's weights are copied into its slot (injected into the real
    DeviceSlots): RESOURCE_EXHAUSTED, the id is not registered, the slot is free, and the same load works
    once memory is back."""
    import torch

    slots = campaign.server.server.registry.slots
    write = slots.write

    def out_of_memory(slot, adapter):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    path = str(shutil.copytree(lora_dirs["head"], Path(campaign.root) / "oom"))
    with Client(campaign.target, timeout=60) as client:
        monkeypatch.setattr(slots, "write", out_of_memory)
        with campaign.beside(), pytest.raises(DeltaserveError) as info:
            client.load_adapter("oom", path)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "injected" not in info.value.message
        assert "oom" not in [a.adapter_id for a in client.list_adapters()]
        monkeypatch.setattr(slots, "write", write)
        assert client.load_adapter("oom", path).state == "device"
        client.unload_adapter("oom")
    campaign.assert_clean()
