"""The benchmark harness every script in benchmarks/ uses, so that a script only says what it measures.

settings   a frozen dataclass of `option(...)` fields; `parse_settings` derives the command line from it
           (one flag per field, its help, its default and its `--quick` value) and validates it
setup      the embedded model on the CPU in fp32, a `deltaserve serve` process (`ServerProcess`), chat
           prompts, PEFT LoRA adapters
rounds     `timed_rounds`: one warm-up per system, then N rounds in which the systems take turns
           (the order rotates, so machine noise hits all alike); `Measurement` keeps every run and gives
           the best or the median of any per-run metric
output     `format_table` (printed), `write_result` (JSON with the machine it ran on and the settings),
           `ratio` (a ratio with the base tok/s beside it), `save_plot` (PNG; skipped without matplotlib),
           and `report`, which does all three and prints where the files went
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from deltaserve.server.config import ServerConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CALL_TIMEOUT_S = 1800.0  # a hang shows up as DEADLINE_EXCEEDED rather than a stuck benchmark

# Varied, realistic chat prompts (rendered with the model's chat template by the server and the benchmarks).
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


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- settings -------------------------------------------------------------------------------------
S = TypeVar("S", bound="Settings")
NO_QUICK = object()


def option(default: Any, help: str, *, quick: Any = NO_QUICK, minimum: float | None = None, flag: str = "") -> Any:
    """A settings field: its default, one line of help, its value under --quick, a lower bound, and its flag
    (default: --field-name)."""
    return field(default=default, metadata={"help": help, "quick": quick, "minimum": minimum, "flag": flag})


@dataclass(frozen=True)
class Settings:
    """What every benchmark accepts; a script subclasses it with its own options."""

    STEM: ClassVar[str] = "benchmark"  # the result file's name without .json
    QUICK_SUFFIX: ClassVar[str] = "-quick"  # added to the name of a --quick run's files

    quick: bool = option(False, "smoke run at the smallest settings (written to <name>-quick.json)")
    out: str = option("", "JSON path; the PNG goes next to it ('' = benchmarks/results/<name>.json)")

    def __post_init__(self) -> None:
        for f in fields(self):
            minimum = f.metadata.get("minimum")
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if minimum is not None and any(v is not None and v < minimum for v in values):
                raise ValueError(f"{flag_of(f)} must be at least {minimum}")

    def stem(self) -> str:
        return self.STEM

    @property
    def json_path(self) -> Path:
        return (
            Path(self.out)
            if self.out
            else RESULTS / (self.stem() + (self.QUICK_SUFFIX if self.quick else "") + ".json")
        )


def require(condition: bool, message: str) -> None:
    """Settings validation: a ValueError that parse_settings reports as a usage error."""
    if not condition:
        raise ValueError(message)


def flag_of(f: Any) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _scalar(hint: Any) -> type:
    """int for `int`, `int | None`, `tuple[int, ...]` and `tuple[int | None, ...]`; likewise for other types."""
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _help(f: Any) -> str:
    """The field's help, its default (unless empty: the help says what empty means) and its --quick value."""
    notes = [] if f.default in ("", ()) else [f"default {f.default}"]
    quick = f.metadata.get("quick", NO_QUICK)
    notes += [] if quick is NO_QUICK else [f"--quick {quick}"]
    return f.metadata["help"] + (f" ({'; '.join(notes)})" if notes else "")


def parse_settings(cls: type[S], argv: list[str] | None = None, description: str | None = None) -> S:
    """The settings from the command line: a flag per field; unset flags take the field's default, or its
    --quick value under --quick."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        if hints[f.name] is bool:
            parser.add_argument(flag_of(f), dest=f.name, action="store_true", help=f.metadata["help"])
            continue
        nargs = "+" if typing.get_origin(hints[f.name]) is tuple else None
        parser.add_argument(flag_of(f), dest=f.name, type=_scalar(hints[f.name]), nargs=nargs, help=_help(f))
    args = parser.parse_args(argv)
    values = {}
    for f in fields(cls):
        given = getattr(args, f.name)
        quick = f.metadata.get("quick", NO_QUICK)
        default = quick if args.quick and quick is not NO_QUICK else f.default
        values[f.name] = default if given is None else (tuple(given) if isinstance(given, list) else given)
    try:
        return cls(**values)
    except ValueError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def settings_dict(settings: Settings) -> dict[str, object]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}


def description(doc: str | None) -> str:
    """A script docstring's first paragraph: the --help description."""
    return (doc or "").split("\n\n")[0]


# ---- setup ----------------------------------------------------------------------------------------
def quiet() -> None:
    """Keep the log readable: no transformers progress bars."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def embedded_model() -> tuple[str, str]:
    """(directory, name) of the embedded SmolLM2-135M-Instruct."""
    from deltaserve.server.model.loader import EMBEDDED_NAME, embedded_model_dir

    return embedded_model_dir(), EMBEDDED_NAME


def cpu_config(model_dir: str, **overrides: Any) -> ServerConfig:
    """The ServerConfig the CPU benchmarks serve with: fp32 on the CPU, then the benchmark's own limits (flat
    setting names)."""
    return ServerConfig.of(model=model_dir, dtype="float32", device="cpu", **overrides)


# How ServerProcess starts a server: `deltaserve serve`'s own entry point, with the config as JSON.
SERVE_CONFIG = (
    "import json, sys; from deltaserve.server.cli import serve_process; "
    "from deltaserve.server.config import ServerConfig; "
    "sys.exit(serve_process(ServerConfig.of(**json.loads(sys.argv[1]))))"
)


class ServerProcess:
    """A server for `config` in a process of its own on a free loopback port, started as `deltaserve serve`
    starts one. Benchmarks measure it this way rather than in a thread of their own process: a deployment runs
    it so, and two OpenMP teams in one process (the benchmark's reference models and the server's engine) slow
    both on a small machine (server/kernels/threads.py). Its log goes to a file, printed if it fails to start."""

    def __init__(self, config: ServerConfig) -> None:
        from deltaserve.testing.helpers import free_port

        self.config = config.replace(host="127.0.0.1", port=free_port())
        self.target = f"127.0.0.1:{self.config.doors.port}"
        handle, self._log = tempfile.mkstemp(prefix="deltaserve-serve-", suffix=".log")
        os.close(handle)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        from deltaserve.client import Client

        settings = json.dumps(self.config.settings())
        command = [sys.executable, "-c", SERVE_CONFIG, settings]
        with open(self._log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            with Client(self.target) as client:
                client.wait_ready(timeout=300)
        except BaseException:
            self.stop()
            log(Path(self._log).read_text()[-4000:])
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        os.unlink(self._log)


def served_bytes(directory: str, element_size: int = 4) -> int:
    """Bytes of every tensor in a safetensors directory (a model or a PEFT adapter) when served with
    `element_size`-byte elements (4: fp32): what a decode step reads of it."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return total * element_size


def served(config: ServerConfig, *names: str) -> dict[str, Any]:
    """Some settings of a ServerConfig by their flat names, for the result file."""
    flat = config.settings()
    return {name: flat[name] for name in names}


def chat_messages(n: int) -> list[str]:
    """n user messages, cycling through CHAT_PROMPTS."""
    return [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(n)]


def zipf_counts(requests: int, adapters: int) -> list[int]:
    """Requests per adapter in proportion to 1 / (k + 1), rounded so that they sum to `requests` (16 over 8:
    6 3 2 1 1 1 1 1): the skewed mixes real traffic brings, where one adapter is popular."""
    weights = [1 / (k + 1) for k in range(adapters)]
    counts = [max(1, round(requests * w / sum(weights))) for w in weights]
    while sum(counts) > requests:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < requests:
        counts[0] += 1
    return counts


def render(tokenizer: Any, message: str) -> str:
    """One user message through the tokenizer's chat template, as the server renders it."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


def max_seq_len_for(tokenizer: Any, new_tokens: int, prompts: Sequence[str] = CHAT_PROMPTS) -> int:
    """Room for the longest chat-rendered prompt plus the generated tokens."""
    longest = max(len(tokenizer(render(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts)
    return longest + new_tokens + 16


def make_adapter(model_dir: str, root: str, name: str, rank: int, seed: int) -> str:
    """A random, non-zero all-linear LoRA adapter saved with PEFT's save_pretrained."""
    from deltaserve.testing.helpers import make_lora

    return make_lora(
        model_dir, os.path.join(root, name), seed=seed, r=rank, lora_alpha=2 * rank, target_modules="all-linear"
    )


def trained_adapters(dirs: Iterable[str]) -> dict[str, str]:
    """Adapter directories given on the command line (e.g. examples/adapters/json), by their directory names,
    as absolute paths the in-process server can open."""
    paths = {Path(d).name: str(Path(d).resolve()) for d in dirs}
    for name, path in paths.items():
        require((Path(path) / "adapter_config.json").exists(), f"{path} has no adapter_config.json ({name})")
    return paths


def is_lora(path: str) -> bool:
    """Whether a PEFT directory is a plain LoRA (PEFT's mixed-adapter generate only takes LoRA-family adapters)."""
    return json.loads((Path(path) / "adapter_config.json").read_text()).get("peft_type") == "LORA"


# ---- requests -------------------------------------------------------------------------------------
async def load_adapters(client: Any, paths: dict[str, str]) -> dict[str, Any]:
    """LoadAdapter each one (the server validates it); adapter id -> the AdapterInfo the server answered."""
    return {adapter_id: await client.load_adapter(adapter_id, path) for adapter_id, path in paths.items()}


async def generate_batch(
    client: Any, messages: list[str], adapter_ids: list[str], new_tokens: int, raw: bool = False
) -> Run:
    """One greedy chat request per (message, adapter id), all in flight at once, each of exactly `new_tokens`
    tokens (min_new_tokens = max_new_tokens, so EOS never ends a row early); timed from the first submit.
    `raw`: each message is sent as a plain-text prompt, without the chat template."""
    start = time.perf_counter()
    results = await asyncio.gather(
        *(
            client.generate(
                **({"prompt": message} if raw else {"messages": [{"role": "user", "content": message}]}),
                adapter_id=adapter_id,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                temperature=0.0,
            )
            for message, adapter_id in zip(messages, adapter_ids, strict=True)
        )
    )
    run = Run(time.perf_counter() - start, [result.token_ids for result in results])
    if run.tokens != len(messages) * new_tokens:
        raise RuntimeError(f"generated {run.tokens} tokens, expected {len(messages) * new_tokens}")
    return run


async def stream_chunks(
    client: Any, message: str, adapter_id: str, new_tokens: int
) -> tuple[list[tuple[float, int]], list[int]]:
    """One greedy chat stream of exactly `new_tokens` tokens: (arrival time, tokens) of every chunk that holds
    tokens, and the token ids."""
    chunks, ids = [], []
    async for chunk in client.generate_stream(
        messages=[{"role": "user", "content": message}],
        adapter_id=adapter_id,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        temperature=0.0,
    ):
        if chunk.token_ids:
            chunks.append((time.perf_counter(), len(chunk.token_ids)))
            ids.extend(chunk.token_ids)
    return chunks, ids


# ---- timed rounds ---------------------------------------------------------------------------------
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


@dataclass
class Measurement:
    """Every timed run of one system or configuration; `info` holds what the script needs to describe it."""

    name: str
    runs: list[Any] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def values(self, metric: str = "rate") -> list[float]:
        return [getattr(run, metric) for run in self.runs]

    def best(self, metric: str = "rate") -> float:
        return max(self.values(metric))

    def median(self, metric: str = "rate") -> float:
        return statistics.median(self.values(metric))


@dataclass(frozen=True)
class Rounds:
    measurements: dict[str, Measurement]
    loads: list[float]  # the 1-minute load average after each round: above the core count, something competed


def timed_rounds(
    systems: dict[str, Callable[[], Any]],
    rounds: int,
    *,
    warmups: dict[str, Callable[[], Any]] | None = None,
    rotate: bool = True,
    describe: Callable[[Any], str] = lambda run: f"{run.rate:.1f} tok/s",
) -> Rounds:
    """Warm every system up once (with its own call unless `warmups` gives a shorter one), then time them in
    turn for `rounds` rounds; with `rotate` the order shifts by one every round."""
    for name, run in (warmups or systems).items():
        run()
        log(f"warmed up {name}")
    measurements = {name: Measurement(name) for name in systems}
    loads = []
    names = list(systems)
    for round_ in range(rounds):
        k = round_ % len(names) if rotate else 0
        for name in names[k:] + names[:k]:
            result = systems[name]()
            measurements[name].runs.append(result)
            log(f"round {round_ + 1}/{rounds} {name}: {describe(result)}")
        loads.append(os.getloadavg()[0])
    return Rounds(measurements, loads)


def on_loop(runner: asyncio.Runner, make: Callable[[], Any]) -> Callable[[], Any]:
    """A system for timed_rounds that runs the coroutine `make()` on `runner`'s loop (one loop for all rounds,
    so an async client opened on it stays usable)."""
    return lambda: runner.run(make())


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


# ---- output ---------------------------------------------------------------------------------------
def ratio(tokens_per_s: float | None, base_tokens_per_s: float | None) -> dict[str, float | None]:
    """A throughput ratio with both throughputs beside it, so a reader can tell a slower base from a faster
    adapter path."""
    value = None if tokens_per_s is None or not base_tokens_per_s else tokens_per_s / base_tokens_per_s
    return {"ratio": value, "tokens_per_s": tokens_per_s, "base_tokens_per_s": base_tokens_per_s}


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
    """What the figures were measured on: CPU, GPU, torch threads, library versions and the date."""
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_json(data: dict[str, object], path: Path) -> None:
    """Write through a temporary file so an interrupted run never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def write_result(name: str, settings: Settings, data: dict[str, object]) -> Path:
    """The result file: the benchmark's name, the machine, the settings, then the script's own data."""
    path = settings.json_path
    write_json({"benchmark": name, "machine": machine_info(), "settings": settings_dict(settings), **data}, path)
    return path


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]], left: int = 1) -> str:
    """A plain-text table: the first `left` columns (names) left-aligned, the others (numbers) right-aligned, and a
    rule under the header."""
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        padded = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return " ".join(padded).rstrip()

    head = line(cells[0])
    return "\n".join([head, "-" * len(head), *(line(row) for row in cells[1:])])


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("warning: matplotlib is not installed (pip install matplotlib); skipping the plot")
        return None
    return plt


def save_plot(
    path: Path,
    draw: Callable[..., None],
    *,
    panels: int = 1,
    size: tuple[float, float] = (7, 4.2),
    title: str = "",
    dpi: int = 120,
    widths: Sequence[float] | None = None,
) -> bool:
    """Call draw(ax) (draw(ax1, ax2, ...) with several panels) on a new figure and write it as a PNG;
    False (with a warning) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    grid = {"width_ratios": list(widths)} if widths else None
    figure, axes = plt.subplots(1, panels, figsize=size, gridspec_kw=grid)
    draw(*axes) if panels > 1 else draw(axes)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return True


def report(
    name: str,
    settings: Settings,
    data: dict[str, object],
    text: Sequence[str],
    draw: Callable[..., None] | None = None,
    **plot: Any,
) -> Path:
    """Write the JSON (and the PNG, when the script draws one), print the text blocks, say where the files went."""
    path = write_result(name, settings, data)
    png = path.with_suffix(".png")
    plotted = draw is not None and save_plot(png, draw, **plot)
    for block in text:
        print(block)
    print(f"wrote {path}" + (f" and {png}" if plotted else ""))
    return path
