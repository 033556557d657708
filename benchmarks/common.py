"""Helpers shared by the benchmark scripts: test helpers, logging, machine info and result files."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Varied, realistic chat prompts (rendered with the model's chat template by the benchmarks).
CHAT_PROMPTS = [
    "Explain in simple terms why the sky is blue.",
    "Write a short poem about autumn leaves falling in a quiet park.",
    "What are three tips for staying focused while working from home?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do I reverse a list in Python? Show an example.",
    "Give me a recipe for a quick vegetarian dinner.",
    "What is the difference between a virus and a bacterium?",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Write a polite email asking my manager for a day off next Friday.",
    "Why do cats purr?",
    "List the planets of the solar system in order from the sun.",
    "What causes inflation, and how do central banks respond to it?",
    "Describe a good morning routine for someone who wants more energy.",
    "Write a SQL query that counts orders per customer.",
    "What should I pack for a three-day hiking trip?",
    "Tell me a fun fact about octopuses.",
]


def import_test_helpers() -> ModuleType:
    """tests/helpers.py: make_lora (real PEFT adapters) and ServerThread (an in-process server)."""
    sys.path.insert(0, str(REPO / "tests"))
    import helpers

    return helpers


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    import peft

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("warning: matplotlib is not installed (pip install matplotlib); skipping the plot")
        return None
    return plt


def save_figure(figure: object, path: Path, dpi: int = 120) -> None:
    """Lay out, write and close a matplotlib figure."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


def write_json(data: dict[str, object], path: Path) -> None:
    """Write through a temporary file so an interrupted run never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def make_adapter(helpers: ModuleType, model_dir: str, root: str, name: str, rank: int, seed: int) -> str:
    """A random, non-zero all-linear LoRA adapter saved with PEFT's save_pretrained."""
    return helpers.make_lora(
        model_dir, os.path.join(root, name), seed=seed, r=rank, lora_alpha=2 * rank, target_modules="all-linear"
    )


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between order statistics (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "min": min(values) if values else math.nan,
    }


def ms_summary(seconds: list[float]) -> dict[str, float]:
    """summary() of values in seconds, reported in milliseconds."""
    return {k: (v if k == "n" else v * 1e3) for k, v in summary(seconds).items()}


@dataclass(frozen=True)
class Run:
    """One timed batch: how long it took and the generated token ids of every request."""

    seconds: float
    outputs: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.outputs)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds
