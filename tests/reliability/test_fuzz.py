"""Fuzzing the adapter parsers with hypothesis: configs, safetensors headers and tensors made from real adapter
files of every kind, mutated at random. A load either succeeds or is refused with a documented status naming
the problem: never INTERNAL or UNKNOWN, never a crash, never half-registered, and the server keeps serving."""

from __future__ import annotations

import json
import shutil
import struct
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from deltaserve.client import Client, DeltaserveError
from deltaserve.testing.kinds import make_bottleneck, make_peft_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def seeds(campaign, tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """One real adapter directory per kind, to mutate."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    found = {
        name: make_peft_adapter(tiny_dir, str(root / name), name, seed=i)
        for i, name in enumerate(["dora", "ia3", "prefix", "prompt"])
    }
    found["lora"] = campaign.lora
    found["bottleneck"] = make_bottleneck(tiny_dir, str(root / "bottleneck"), "houlsby", seed=9)
    return {name: Path(path) for name, path in found.items()}


def _weights_file(directory: Path) -> Path:
    return next(p for p in directory.iterdir() if p.suffix == ".safetensors")


def _load(campaign, directory: Path) -> None:
    """Load, then unload on success; a refusal must use a documented code and leave nothing registered."""
    adapter_id = f"fuzz-{uuid.uuid4().hex[:8]}"
    with Client(campaign.target, timeout=60) as client:
        try:
            client.load_adapter(adapter_id, str(directory))
        except DeltaserveError as err:
            assert err.code in REFUSALS, (err.code, err.message)
            assert err.message and "Traceback" not in err.message
            assert adapter_id not in [a.adapter_id for a in client.list_adapters()]
            return
        client.unload_adapter(adapter_id)


def _copy(campaign, seed: Path) -> Path:
    return Path(shutil.copytree(seed, Path(campaign.root) / f"fuzz-{uuid.uuid4().hex}"))


@FUZZ
@given(kind=st.sampled_from(["lora", "dora", "ia3", "prefix", "prompt", "bottleneck"]), data=st.data())
def test_mutated_configs(campaign, seeds, kind, data):
    directory = _copy(campaign, seeds[kind])
    config = json.loads((directory / "adapter_config.json").read_text())
    target = config["config"] if kind == "bottleneck" else config
    keys = sorted(target)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(keys) | st.text(max_size=12))
        if data.draw(st.booleans()):
            target[key] = data.draw(JSON)
        else:
            target.pop(key, None)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    _load(campaign, directory)


@FUZZ
@given(kind=st.sampled_from(["lora", "ia3", "prefix", "bottleneck"]), header=JSON, cut=st.integers(0, 64))
def test_mutated_safetensors_headers(campaign, seeds, kind, header, cut):
    """A header that is any JSON value, and a file cut short: the parser must name it, not crash."""
    directory = _copy(campaign, seeds[kind])
    weights = _weights_file(directory)
    encoded = json.dumps(header).encode()
    weights.write_bytes((struct.pack("<Q", len(encoded)) + encoded + b"\0" * 64)[: 8 + len(encoded) + cut])
    _load(campaign, directory)


@FUZZ
@given(
    kind=st.sampled_from(["lora", "dora", "ia3", "prefix", "prompt", "bottleneck"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.bool]),
    value=st.sampled_from([0.0, 1.0, -1e30, 1e30, float("nan"), float("inf")]),
    reshape=st.booleans(),
    rename=st.text(max_size=30),
)
def test_mutated_tensors(campaign, seeds, kind, dtype, value, reshape, rename):
    """One tensor changed: its dtype, a value, its shape, or its name."""
    from safetensors.torch import load_file

    directory = _copy(campaign, seeds[kind])
    weights = _weights_file(directory)
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensor = tensors.pop(key).clone()
    tensor.view(-1)[0] = value
    tensor = tensor.to(dtype)
    if reshape:
        tensor = tensor.reshape(-1)[:-1] if tensor.numel() > 1 else tensor.reshape(1, 1, 1)
    tensors[rename or key] = tensor.contiguous()
    save_file(tensors, weights)
    _load(campaign, directory)
