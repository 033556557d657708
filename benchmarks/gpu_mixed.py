"""Mixed-adapter decoding on a GPU: a Llama-3-8B-shaped model with random bf16 weights, 64 concurrent requests.

The model is built from a config (no download): LlamaConfig with Llama-3-8B's shapes (hidden 4096, MLP 14336,
32 layers, 32 query / 8 key-value heads, vocabulary 128256, untied head), random weights, bf16, on the GPU. deltaserve's
own parts are assembled in-process as server/app.py does (ModelRunner, DeviceSlots, AdapterRegistry, Engine; no
gRPC) and fed N requests of P random prompt token ids each, greedy, exactly T new tokens (the engine is built with no
EOS id, so no row ends early). The adapters are rank-16 all-linear LoRA files in PEFT's format: lora0 made by PEFT
(LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False) on a copy of the same base,
save_pretrained), the others cloned from its files with fresh random weights (adapter_files.py), all loaded through
the registry (validated as LoadAdapter would). Systems, taking turns each round after one warm-up batch each:

  base          deltaserve, no adapter
  mixed-8       deltaserve, request i on adapter i % 8 (8 distinct adapters in every decode step)
  mixed-32      deltaserve, request i on adapter i % 32
  peft-mixed-8  PEFT's mixed-batch generate(adapter_names=[...]) on its own copy of the base with the same 8 adapter
                files loaded and the same per-row assignment (min_new_tokens = max_new_tokens)

Reported (medians over rounds): end-to-end tokens/s (first submit to last token, prefill included; for PEFT the whole
generate call) and, for deltaserve, decode tokens/s over the window in which all N rows decode together (from the
time of every token as the engine hands it out: after the last row's first token, before the first row's last) and
the decode step time. Ratios: mixed-8 / base; mixed-32 / base next to the bandwidth floor 1 / (1 + adapter bytes /
base bytes), adapter bytes being the 32 adapters' A and B in bf16; mixed-8 / peft-mixed-8 (end to end); and the base
decode step against the memory-bandwidth floor: (weights read + KV cache read per step) / copy bandwidth, the weights
being every parameter but the input embeddings, the KV read N rows x the mean attended span, and the bandwidth
measured with a large device-to-device tensor copy (bytes read + written / time, best of 5).

Run:  python benchmarks/gpu_mixed.py           (CUDA: N=64, P=32, T=128, 8 and 32 adapters, 3 rounds; ~40 GB of
                                                GPU memory, two copies of the base; a few minutes on an H100)
      python benchmarks/gpu_mixed.py --tiny    (a 2-layer model, N=8, P=8, T=16, 2 and 4 adapters, 1 round: a smoke
                                                run that works on the CPU)
Writes benchmarks/results/gpu-mixed-<device>.json (gpu-mixed-<device>-tiny.json for --tiny) and a PNG next to it.
"""

from __future__ import annotations

import copy
import queue
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from adapter_files import clone_adapter, lora_bytes
from deltaserve.adapters import tensor_bytes
from deltaserve.server.engine.engine import Engine, EngineConfig
from deltaserve.server.engine.request import Request, RequestOutput
from deltaserve.server.engine.sampling import SamplingParams
from deltaserve.server.metrics import Metrics
from deltaserve.server.model.kv_cache import blocks_for
from deltaserve.server.model.loader import embedded_model_dir
from deltaserve.server.model.runner import ModelRunner
from deltaserve.server.residency.registry import AdapterRegistry, DeviceSlots
from harness import (
    Settings,
    description,
    format_table,
    log,
    option,
    parse_settings,
    quiet,
    ratio,
    report,
    require,
    timed_rounds,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
BASE, PEFT = "base", "peft-mixed"
BATCH_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class GpuSettings(Settings):
    QUICK_SUFFIX = "-tiny"

    quick: bool = option(
        False, "smoke run: 2-layer model, N=8, P=8, T=16, 2 and 4 adapters (works on the CPU)", flag="--tiny"
    )
    requests: int = option(64, "concurrent requests N", quick=8, minimum=1)
    prompt_tokens: int = option(32, "prompt length P", quick=8, minimum=1)
    new_tokens: int = option(128, "tokens per request T", quick=16, minimum=2)
    adapters: tuple[int, ...] = option((8, 32), "the two adapter counts", quick=(2, 4), minimum=1)
    rank: int = option(16, "LoRA rank", minimum=1)
    rounds: int = option(3, "timed rounds", quick=1, minimum=1)
    copy_mib: int = option(4096, "MiB copied to measure the device's bandwidth", quick=64, minimum=1)
    device: str = option("", "cuda or cpu ('' = cuda when there is one)")
    dtype: str = option("bfloat16", "bfloat16, float16 or float32")
    no_peft: bool = option(False, "skip the PEFT system (and its copy of the base)")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "device", self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        require(self.dtype in ("bfloat16", "float16", "float32"), "--dtype must be bfloat16, float16 or float32")
        require(
            self.quick or self.device.startswith("cuda"),
            "the full size needs a CUDA GPU (16 GB of bf16 weights, twice); use --tiny on the CPU",
        )
        require(len(self.adapters) == 2, "--adapters takes two counts")
        require(
            self.few <= self.many <= self.requests,
            "the adapter counts must be ascending and at most N (every adapter needs a request)",
        )

    @property
    def few(self) -> int:
        return self.adapters[0]

    @property
    def many(self) -> int:
        return self.adapters[1]

    @property
    def peft(self) -> bool:
        return not self.no_peft

    def stem(self) -> str:
        return f"gpu-mixed-{slug(device_name(torch.device(self.device)))}"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- setup ----------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, mib: int, repeats: int = 5) -> float:
    """Device memory bandwidth in bytes/s: (read + write bytes) / time of a large tensor copy, best of `repeats`."""
    source = torch.ones(mib * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    del source, target
    return 2 * mib * 2**20 / best


def build_model(shape: dict[str, object], dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """A Llama with random weights, created directly on the device (no download)."""
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    return model.eval().requires_grad_(False)


def make_adapters(peft_base: PreTrainedModel, root: str, count: int, rank: int) -> tuple[object, list[str]]:
    """lora0 made and saved by PEFT on `peft_base` (which becomes a PeftModel), lora1.. cloned from its files."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(peft_base, config)  # adapter "default"
    first = f"{root}/lora0"
    peft_model.save_pretrained(first)
    return peft_model, [first] + [clone_adapter(first, f"{root}/lora{i}", seed=1 + i) for i in range(1, count)]


def peft_with_adapters(peft_model: object, paths: list[str]) -> object:
    """The PEFT model with the files `paths` loaded as lora0.. (the creation-time "default" removed)."""
    for i, path in enumerate(paths):
        peft_model.load_adapter(path, adapter_name=f"lora{i}")
    peft_model.set_adapter("lora0")
    peft_model.delete_adapter("default")
    return peft_model.eval()


@dataclass
class Deltaserve:
    engine: Engine
    registry: AdapterRegistry

    def close(self) -> None:
        self.engine.stop(5.0)
        self.registry.close()


def build_deltaserve(
    model: PreTrainedModel, settings: GpuSettings, dtype: torch.dtype, device: torch.device
) -> Deltaserve:
    """The parts server/app.py's Server assembles, without gRPC; EOS disabled (every row runs T tokens)."""
    max_seq_len = settings.prompt_tokens + settings.new_tokens + 8
    runner = ModelRunner(model, dtype=dtype, device=device)
    slots = DeviceSlots(runner.adapter_layers, runner.bottleneck_banks, settings.many, settings.rank, dtype, device)
    registry = AdapterRegistry(runner.base_spec(), slots, max_host=settings.many)
    block_size = 16
    num_blocks = 1 + settings.requests * blocks_for(max_seq_len, block_size)  # every row at full length
    runner.allocate_cache(num_blocks, block_size)
    config = EngineConfig(
        settings.requests,
        max_seq_len,
        eos_token_ids=(),
        max_prefill_tokens=max(4096, max_seq_len),
        block_size=block_size,
        num_blocks=num_blocks,
    )
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())  # only detokenizes; unknown ids decode to ""
    engine = Engine(runner, tokenizer, registry, config, Metrics())
    registry.on_resident = engine.wake
    engine.start()
    return Deltaserve(engine, registry)


# ---- one batch ------------------------------------------------------------------------------------
@dataclass
class Batch:
    seconds: float
    outputs: list[list[int]]
    times: list[list[float]] = field(default_factory=list)  # per row: when each token was handed out

    @property
    def rate(self) -> float:
        return sum(map(len, self.outputs)) / self.seconds

    def decode_window(self) -> tuple[float, int]:
        """(seconds, tokens) while every row decodes: after the last first token, up to the first last token."""
        if not self.times:
            return 0.0, 0
        start = max(row[0] for row in self.times)
        end = min(row[-1] for row in self.times)
        return end - start, sum(start < t <= end for row in self.times for t in row)

    @property
    def decode_rate(self) -> float | None:
        seconds, tokens = self.decode_window()
        return tokens / seconds if tokens else None


def deltaserve_batch(ds: Deltaserve, prompts: list[list[int]], adapter_ids: list[str], new_tokens: int) -> Batch:
    """Submit every request at once; wait until all finished."""
    n = len(prompts)
    times: list[list[float]] = [[] for _ in range(n)]
    outputs: list[list[int]] = [[] for _ in range(n)]
    finished: queue.Queue[BaseException | None] = queue.Queue()

    def sink_for(i: int) -> Callable[[RequestOutput], None]:
        def sink(output: RequestOutput) -> None:
            times[i].append(time.perf_counter())
            outputs[i].extend(output.token_ids)
            if output.finished:
                finished.put(output.error)

        return sink

    params = SamplingParams(max_new_tokens=new_tokens)
    start = time.perf_counter()
    for i, (prompt, adapter_id) in enumerate(zip(prompts, adapter_ids, strict=True)):
        adapter = ds.registry.acquire(adapter_id) if adapter_id else None
        ds.engine.submit(Request(f"req{i}", prompt, params, adapter, sink_for(i)))
    for _ in range(n):
        error = finished.get(timeout=BATCH_TIMEOUT_S)
        if error is not None:
            raise RuntimeError("a request failed in the engine") from error
    seconds = time.perf_counter() - start
    if any(len(row) != new_tokens for row in outputs):
        raise RuntimeError(f"rows generated {sorted({len(r) for r in outputs})} tokens, expected {new_tokens}")
    return Batch(seconds, outputs, times)


def peft_batch(
    model: object, prompts: list[list[int]], adapter_names: list[str], new_tokens: int, device: torch.device
) -> Batch:
    input_ids = torch.tensor(prompts, device=device)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            adapter_names=adapter_names,
        )
    synchronize(device)
    return Batch(time.perf_counter() - start, out[:, input_ids.shape[1] :].tolist())


# ---- measuring and reporting ----------------------------------------------------------------------
def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def summarize(results: dict[str, list[Batch]], adapters: dict[str, int], requests: int) -> dict[str, dict]:
    base_outputs = results[BASE][-1].outputs
    out = {}
    for name, batches in results.items():
        decode = median_or_none([b.decode_rate for b in batches])
        out[name] = {
            "adapters": adapters[name],
            "median_tokens_per_s": statistics.median(b.rate for b in batches),
            "median_decode_tokens_per_s": decode,
            "decode_step_ms": None if decode is None else 1e3 * requests / decode,
            "tokens_per_s": [b.rate for b in batches],
            "decode_tokens_per_s": [b.decode_rate for b in batches],
            "seconds": [b.seconds for b in batches],
            "rows_differing_from_base": sum(a != b for a, b in zip(batches[-1].outputs, base_outputs, strict=True)),
        }
    return out


def table(summary: dict[str, dict], floors: dict[str, float]) -> str:
    base = summary[BASE]
    rows = []
    for name, s in summary.items():
        decode = s["median_decode_tokens_per_s"]
        rows.append(
            [
                name,
                s["adapters"],
                f"{s['median_tokens_per_s']:.1f}",
                f"{decode:.1f}" if decode else "-",
                f"{s['decode_step_ms']:.2f}" if decode else "-",
                f"{s['median_tokens_per_s'] / base['median_tokens_per_s']:.2f}x",
                f"{decode / base['median_decode_tokens_per_s']:.2f}x" if decode else "-",
                f"{floors.get(name, 1.0):.2f}",
            ]
        )
    header = ["system", "adapters", "tok/s e2e", "decode tok/s", "step ms", "e2e/base", "decode/base", "floor"]
    return format_table(header, rows)


def draw(summary: dict[str, dict], floors: dict[str, float], title: str) -> Callable:
    """End-to-end and decode tokens/s per system, with the base's decode rate scaled by each bandwidth floor."""

    def plot(ax: object) -> None:
        names = list(summary)
        xs = range(len(names))
        e2e = [summary[n]["median_tokens_per_s"] for n in names]
        bars = ax.bar([x - 0.2 for x in xs], e2e, 0.4, color="#4c72b0", label="end to end")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        with_decode = [(x, n) for x, n in zip(xs, names, strict=True) if summary[n]["median_decode_tokens_per_s"]]
        decode = [summary[n]["median_decode_tokens_per_s"] for _, n in with_decode]
        bars = ax.bar(
            [x + 0.2 for x, _ in with_decode], decode, 0.4, color="#c44e52", label="decode (all rows running)"
        )
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        base_decode = summary[BASE]["median_decode_tokens_per_s"]
        label = "base decode x bandwidth floor"
        for x, name in with_decode[1:]:
            ax.hlines(base_decode * floors[name], x, x + 0.4, colors="k", linestyles=":", label=label)
            label = None
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("generated tokens/s (median)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)

    return plot


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def base_step_floor(model: PreTrainedModel, settings: GpuSettings, bandwidth: float) -> dict[str, float]:
    """The base decode step's memory-bandwidth floor: every weight but the input embeddings (a step gathers only N
    of their rows) and the attended KV cache (N rows x the mean attended span, K and V), each read once."""
    config = model.config
    weights = tensor_bytes(model.parameters()) - tensor_bytes([model.get_input_embeddings().weight])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize
    span = settings.prompt_tokens + (settings.new_tokens + 1) / 2
    kv = settings.requests * span * per_position
    floor_ms = 1e3 * (weights + kv) / bandwidth
    return {"weights_read_bytes": weights, "kv_read_bytes": kv, "mean_attended_positions": span, "floor_ms": floor_ms}


def over(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def prepare(
    model: PreTrainedModel, settings: GpuSettings, dtype: torch.dtype, device: torch.device
) -> tuple[Deltaserve, object | None, int]:
    """Make the adapters, assemble deltaserve with all of them loaded, and PEFT's model with the first few; also
    the bytes of one adapter's A and B in the served dtype."""
    with tempfile.TemporaryDirectory(prefix="deltaserve-gpu-bench-") as root:
        # PEFT makes lora0 on its own copy of the base (kept for the PEFT system), or on the base itself and is
        # unloaded again (--no-peft), before deltaserve wraps the base's linear layers.
        source = copy.deepcopy(model) if settings.peft else model
        peft_model, paths = make_adapters(source, root, settings.many, settings.rank)
        if settings.peft:
            peft_model = peft_with_adapters(peft_model, paths[: settings.few])
        else:
            peft_model.unload()  # the base's own layers back in place
            peft_model = None
        log(f"made {len(paths)} adapters; loading them into the registry")
        ds = build_deltaserve(model, settings, dtype, device)
        records = [ds.registry.load(f"lora{i}", path) for i, path in enumerate(paths)]
    return ds, peft_model, lora_bytes(records[0].adapter, dtype)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(GpuSettings, argv, description(__doc__))
    quiet()
    device, dtype = torch.device(settings.device), getattr(torch, settings.dtype)
    shape = TINY if settings.quick else LLAMA3_8B
    name = device_name(device)
    bandwidth = copy_bandwidth(device, settings.copy_mib)
    log(f"{name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; building the model")
    model = build_model(shape, dtype, device)
    base_bytes = tensor_bytes(model.parameters())
    n, t, few, many = settings.requests, settings.new_tokens, f"mixed-{settings.few}", f"mixed-{settings.many}"
    peft_name = f"{PEFT}-{settings.few}"
    vocab = min(shape["vocab_size"], 49152)  # ids the detokenizer's vocabulary knows (others decode to "")
    prompts = torch.randint(0, vocab, (n, settings.prompt_tokens), generator=torch.Generator().manual_seed(2)).tolist()
    ds, peft_model, adapter_bytes = prepare(model, settings, dtype, device)
    adapters = {BASE: 0, few: settings.few, many: settings.many, peft_name: settings.few}
    assign = {name: [f"lora{i % k}" for i in range(n)] if k else [""] * n for name, k in adapters.items()}
    systems: dict[str, Callable[[], Batch]] = {
        system: lambda system=system: deltaserve_batch(ds, prompts, assign[system], t) for system in (BASE, few, many)
    }
    if peft_model is not None:
        systems[peft_name] = lambda: peft_batch(peft_model, prompts, assign[peft_name], t, device)
    try:
        rounds = timed_rounds(systems, settings.rounds, describe=describe)
    finally:
        ds.close()
    results = {system: m.runs for system, m in rounds.measurements.items()}
    summary = summarize(results, adapters, n)
    floors = {system: 1 / (1 + k * adapter_bytes / base_bytes) for system, k in adapters.items()}
    step = base_step_floor(model, settings, bandwidth)
    step["measured_ms"] = summary[BASE]["decode_step_ms"]
    ratios = compare(summary, few, many, peft_name, floors, step)
    agreement = {}
    if peft_name in summary:
        pairs = zip(results[few][-1].outputs, results[peft_name][-1].outputs, strict=True)
        prefixes = [common_prefix(a, b) for a, b in pairs]
        agreement = {"mean_common_prefix_tokens": statistics.mean(prefixes), "identical_rows": prefixes.count(t)}
    data = {
        "command": shlex.join(["python", *sys.argv]),
        "device": name,
        "cuda": torch.version.cuda,
        "dtype": settings.dtype,
        "model": {"architecture": "LlamaForCausalLM, random weights", **shape},
        "base_bytes": base_bytes,
        "adapter_bytes_each": adapter_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "base_step": step,
        "statistic": "median over rounds; decode = tokens while all rows decode / that window's seconds",
        "systems": summary,
        "bandwidth_floors": {system: floors[system] for system in summary},
        "ratios": ratios,
        "deltaserve_vs_peft_greedy": agreement,
    }
    title = (
        f"{'tiny Llama' if settings.quick else 'Llama-3-8B-shaped'} random {settings.dtype} on {name}: "
        f"N={n}, P={settings.prompt_tokens}, T={t}, rank-{settings.rank} all-linear LoRA"
    )
    text = [title, table(summary, floors)]
    for key, value in ratios.items():
        shown = value["ratio"] if isinstance(value, dict) else value
        text.append(f"{key}: " + ("-" if shown is None else f"{shown:.2f}"))
    text.append(
        f"base {base_bytes / 1e6:.1f} MB, one adapter {adapter_bytes / 1e6:.1f} MB; copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s; base decode step {step['measured_ms'] or 0:.2f} ms vs floor "
        f"{step['floor_ms']:.2f} ms (weights {step['weights_read_bytes'] / 1e6:.1f} MB + KV "
        f"{step['kv_read_bytes'] / 1e6:.1f} MB)"
    )
    if agreement:
        text.append(
            f"{few} vs PEFT greedy: {agreement['identical_rows']}/{n} rows identical, mean common prefix "
            f"{agreement['mean_common_prefix_tokens']:.1f} of {t} tokens"
            + ("" if dtype == torch.float32 else f" (deltaserve's slots hold {settings.dtype}, PEFT's adapters fp32)")
        )
    report("gpu_mixed", settings, data, text, draw(summary, floors, title), size=(7.5, 4.2))
    return 0


def describe(batch: Batch) -> str:
    decode = f", {batch.decode_rate:.1f} decode" if batch.decode_rate else ""
    return f"{batch.rate:.1f} tok/s end to end{decode}"


def compare(
    summary: dict[str, dict], few: str, many: str, peft_name: str, floors: dict[str, float], step: dict
) -> dict[str, object]:
    """The headline ratios; throughput ratios carry both tokens/s beside them."""
    base = summary[BASE]["median_decode_tokens_per_s"]
    ratios: dict[str, object] = {
        f"{few} / base (decode)": ratio(summary[few]["median_decode_tokens_per_s"], base),
        f"{many} / base (decode)": ratio(summary[many]["median_decode_tokens_per_s"], base),
        f"{many} bandwidth floor": floors[many],
        "base decode step: bandwidth floor / measured": over(step["floor_ms"], step["measured_ms"]),
    }
    if peft_name in summary:
        ratios[f"{few} / {peft_name} (end to end)"] = ratio(
            summary[few]["median_tokens_per_s"], summary[peft_name]["median_tokens_per_s"]
        )
    return ratios


if __name__ == "__main__":
    raise SystemExit(main())
