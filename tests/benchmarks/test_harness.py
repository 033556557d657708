"""The benchmark harness: settings from the command line, the table, the rounds and the ratios.

benchmarks/ is a folder of scripts, not a package; the harness is loaded from its file (no sys.path change).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "harness.py"
spec = importlib.util.spec_from_file_location("benchmark_harness", HARNESS)
harness = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = harness  # dataclasses look their module up while the class is built
spec.loader.exec_module(harness)


@dataclass(frozen=True)
class Example(harness.Settings):
    STEM = "example-cpu"

    requests: int = harness.option(16, "concurrent requests", quick=4, minimum=1)
    ranks: tuple[int, ...] = harness.option((8, 16), "LoRA ranks", quick=(8,), minimum=1)
    pause: float = harness.option(1.0, "seconds between loads", minimum=0)
    no_peft: bool = harness.option(False, "skip PEFT")


def test_defaults_quick_values_and_flags():
    full = harness.parse_settings(Example, [])
    assert (full.requests, full.ranks, full.pause, full.no_peft) == (16, (8, 16), 1.0, False)
    assert full.json_path == harness.RESULTS / "example-cpu.json"
    quick = harness.parse_settings(Example, ["--quick", "--pause", "0.5", "--no-peft"])
    assert (quick.requests, quick.ranks, quick.pause, quick.no_peft) == (4, (8,), 0.5, True)
    assert quick.json_path == harness.RESULTS / "example-cpu-quick.json"
    given = harness.parse_settings(Example, ["--quick", "--ranks", "32", "64", "--out", "/tmp/x.json"])
    assert given.ranks == (32, 64) and given.json_path == Path("/tmp/x.json")


def test_a_value_below_its_minimum_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        harness.parse_settings(Example, ["--ranks", "8", "0"])
    assert "--ranks must be at least 1" in capsys.readouterr().err


def test_help_names_default_and_quick_value(capsys):
    with pytest.raises(SystemExit):
        harness.parse_settings(Example, ["--help"])
    assert "concurrent requests (default 16; --quick 4)" in " ".join(capsys.readouterr().out.split())


def test_table_aligns_names_left_and_numbers_right():
    table = harness.format_table(["system", "tok/s"], [["base", "71.1"], ["server-mixed", "5.0"]])
    assert table.splitlines() == [
        "system       tok/s",
        "------------------",
        "base          71.1",
        "server-mixed   5.0",
    ]


def test_rounds_rotate_the_order_and_keep_every_run():
    calls = []

    def system(name: str):
        return lambda: calls.append(name) or harness.Run(1.0, [[0] * len(calls)])

    rounds = harness.timed_rounds({"a": system("a"), "b": system("b")}, 2, describe=lambda run: "")
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-ups, round 1, round 2 rotated
    a = rounds.measurements["a"]
    assert a.values() == [3.0, 6.0] and a.best() == 6.0 and a.median() == 4.5
    assert len(rounds.loads) == 2


def test_a_ratio_carries_both_rates():
    assert harness.ratio(50.0, 100.0) == {"ratio": 0.5, "tokens_per_s": 50.0, "base_tokens_per_s": 100.0}
    assert harness.ratio(None, 100.0)["ratio"] is None


def test_served_bytes_counts_every_tensor_at_the_served_element_size(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4, dtype=torch.float16), "b": torch.zeros(5)}, str(tmp_path / "x.safetensors"))
    assert harness.served_bytes(str(tmp_path)) == (12 + 5) * 4
    assert harness.served_bytes(str(tmp_path), element_size=2) == (12 + 5) * 2


def test_a_zipf_spread_is_skewed_and_covers_every_request_and_adapter():
    counts = harness.zipf_counts(16, 8)
    assert sum(counts) == 16 and min(counts) >= 1 and counts == sorted(counts, reverse=True) and counts[0] >= 4
