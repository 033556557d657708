"""Hostile adapter files and paths: nothing outside --adapter-root is ever opened, no file can stall the
server, and no value a file holds can reach another tenant's row. Each case runs beside a victim request."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import grpc
import pytest
import torch
from deltaserve.client import Client, DeltaserveError
from deltaserve.testing.kinds import make_bottleneck
from safetensors.torch import load_file, save_file


def _refused(campaign, path: str, adapter_id: str = "hostile") -> tuple[grpc.StatusCode, str]:
    with Client(campaign.target, timeout=60) as client:
        try:
            client.load_adapter(adapter_id, path)
        except DeltaserveError as err:
            return err.code, err.message
        client.unload_adapter(adapter_id)  # leave the next case a clean server
    pytest.fail(f"{path} was loaded")


def _copy(campaign, name: str) -> Path:
    return Path(shutil.copytree(campaign.lora, Path(campaign.root) / name))


def test_a_file_linked_to_outside_the_root_is_refused(campaign, tmp_path):
    """The directory is inside the root, but its weights are a link to a file elsewhere."""
    directory = _copy(campaign, "linked_file")
    outside = tmp_path / "weights.safetensors"
    shutil.move(directory / "adapter_model.safetensors", outside)
    (directory / "adapter_model.safetensors").symlink_to(outside)
    with campaign.beside():
        code, message = _refused(campaign, str(directory))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "symbolic link" in message
    assert str(outside) not in message and str(tmp_path) not in message
    campaign.assert_clean()


def test_a_fifo_outside_the_root_is_never_opened(campaign, tmp_path):
    """A link to a FIFO outside: opening it would block for as long as nobody writes to it."""
    directory = Path(campaign.root) / "fifo_link"
    directory.mkdir()
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    (directory / "adapter_config.json").symlink_to(fifo)
    with campaign.beside():
        code, message = _refused(campaign, str(directory))
        code_outside, _ = _refused(campaign, str(tmp_path))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "symbolic link" in message
    assert code_outside == grpc.StatusCode.PERMISSION_DENIED
    campaign.assert_clean()


def test_a_fifo_inside_the_root_does_not_stall_anyone(campaign):
    directory = Path(campaign.root) / "fifo_inside"
    directory.mkdir()
    os.mkfifo(directory / "adapter_config.json")
    with campaign.beside():
        code, message = _refused(campaign, str(directory))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a regular file" in message
    campaign.assert_clean()


def test_a_rename_race_never_escapes_the_root(campaign, tmp_path):
    """A link inside the root is swapped atomically, over and over, between an adapter inside the root and one
    outside it, while that path is loaded: a check-then-open reader is fooled whenever the swap falls between
    its check and its open. Here no load may ever read the outside adapter."""
    outside = Path(shutil.copytree(campaign.lora, tmp_path / "outside"))
    config = json.loads((outside / "adapter_config.json").read_text())
    (outside / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))  # tells them apart
    inside = _copy(campaign, "race_real")
    flip, staged = Path(campaign.root) / "race", Path(campaign.root) / "race.next"
    flip.symlink_to(inside, target_is_directory=True)
    stop = threading.Event()

    def flipper() -> None:
        while not stop.is_set():
            for target in (outside, inside):
                staged.symlink_to(target, target_is_directory=True)
                os.replace(staged, flip)  # atomic: `flip` always exists, pointing one way or the other

    outcomes = {"loaded": 0, "denied": 0, "escaped": 0, "other": []}
    racer = threading.Thread(target=flipper, daemon=True)
    racer.start()
    try:
        with Client(campaign.target, timeout=60) as client:
            for attempt in range(150):
                try:
                    info = client.load_adapter(f"race{attempt}", str(flip))
                    outcomes["loaded"] += 1
                    client.unload_adapter(info.adapter_id)
                except DeltaserveError as err:
                    if "LOHA" in err.message:
                        outcomes["escaped"] += 1
                    elif err.code == grpc.StatusCode.PERMISSION_DENIED:
                        outcomes["denied"] += 1
                    else:
                        outcomes["other"].append(err.code.name)
    finally:
        stop.set()
        racer.join(timeout=10)
    assert outcomes["escaped"] == 0 and outcomes["other"] == [], outcomes
    assert outcomes["denied"] == 150, outcomes  # a link below a root is never followed, whichever way it points
    campaign.assert_clean()


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("[" * 100_000 + "]" * 100_000, grpc.StatusCode.INVALID_ARGUMENT, "nests JSON too deeply"),
        ('{"peft_type": "LORA", "pad": "' + "x" * (2 << 20) + '"}', grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes"),
        ("\xff\xfe", grpc.StatusCode.INVALID_ARGUMENT, "adapter_config.json"),
    ],
    ids=["deep", "huge", "binary"],
)
def test_malformed_configs_are_named_not_internal(campaign, text, code, fragment):
    directory = _copy(campaign, f"config_{code.name}_{len(text)}")
    (directory / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with campaign.beside():
        got, message = _refused(campaign, str(directory))
    assert got == code and fragment in message, (got, message)
    assert campaign.root not in message.replace(str(directory), "")  # only the caller's own path is named
    campaign.assert_clean()


@pytest.mark.parametrize("alpha", [float("nan"), 1e45], ids=["nan", "overflow"])
def test_a_scaling_that_is_not_finite_is_refused(campaign, alpha):
    """Finite factors, but lora_alpha makes the scaled B non-finite: checked as the device computes."""
    directory = _copy(campaign, f"alpha_{alpha}")
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    with campaign.beside():
        code, message = _refused(campaign, str(directory))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not finite" in message and "lora_b_scaled" in message
    campaign.assert_clean()


def test_a_bottleneck_scaling_that_is_not_finite_is_refused(campaign, tiny_dir):
    directory = Path(make_bottleneck(tiny_dir, str(Path(campaign.root) / "nan_scaling"), "houlsby", seed=5))
    config = json.loads((directory / "adapter_config.json").read_text())
    config["config"]["scaling"] = float("nan")
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with campaign.beside():
        code, message = _refused(campaign, str(directory))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not finite" in message
    campaign.assert_clean()


def test_a_huge_finite_bottleneck_never_reaches_a_base_row(campaign, tiny_dir):
    """Weights of 1e38 are finite, so the adapter loads; its down projection overflows for every token of the
    batch, which must not turn into NaN in the rows that do not use it (no inf * 0 anywhere)."""
    directory = Path(make_bottleneck(tiny_dir, str(Path(campaign.root) / "huge"), "parallel", seed=6))
    weights = directory / "adapter.safetensors"
    tensors = {k: torch.full_like(v, 1e38) if "adapter_down" in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    with Client(campaign.target, timeout=120) as client:
        client.load_adapter("huge", str(directory))
        try:
            with campaign.beside(), pytest.raises(DeltaserveError) as attacker:
                client.generate("Overflowing", adapter_id="huge", max_new_tokens=4)
            assert attacker.value.code == grpc.StatusCode.FAILED_PRECONDITION  # its own row fails, alone
        finally:
            client.unload_adapter("huge")
    campaign.assert_clean()


def test_a_failed_load_clears_once_the_file_is_fixed(campaign):
    directory = _copy(campaign, "heals")
    weights = directory / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    code, _ = _refused(campaign, str(directory), "heals")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    weights.write_bytes(good)
    with Client(campaign.target, timeout=60) as client:
        assert client.load_adapter("heals", str(directory)).state in ("device", "host")
        assert client.generate("Healed", adapter_id="heals", max_new_tokens=3).generated_tokens == 3
        client.unload_adapter("heals")
    campaign.assert_clean()


def test_a_failed_load_is_labelled_by_what_was_read(campaign, tmp_path):
    """The metrics label of a refused path outside the root comes from the load attempt (nothing read), not
    from reading the path again."""
    registry = campaign.server.server.metrics.registry

    def failures(kind: str) -> float:
        return registry.get_sample_value("deltaserve_adapter_loads_total", {"kind": kind, "result": "denied"}) or 0.0

    outside = shutil.copytree(campaign.lora, tmp_path / "elsewhere")
    before = failures("unknown"), failures("lora")
    _refused(campaign, str(outside))
    assert (failures("unknown"), failures("lora")) == (before[0] + 1, before[1])


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("rank_pattern", {r"(?:[a-z_.0-9]|[a-z_.0-9])*(?=\d{3})": 4}, "took longer than"),
        ("alpha_pattern", {"(": 4}, "is invalid"),
        ("rank_pattern", {"x" * 5000: 4}, "characters"),
        ("r", float("inf"), "malformed LoRA field"),
    ],
    ids=["catastrophic", "invalid", "long", "infinite_rank"],
)
def test_hostile_patterns_and_numbers_in_a_config(campaign, field, value, fragment):
    """A backtracking pattern is cut off by a time budget with the GIL released (health and the victim keep
    going); invalid, oversized and non-numeric values are named, never INTERNAL."""
    directory = _copy(campaign, f"pattern_{field}_{fragment.split()[0]}")
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with campaign.beside():
        code, message = _refused(campaign, str(directory))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in message, (code, message)
    campaign.assert_clean()
