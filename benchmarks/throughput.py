"""Generated tokens per second: deltaserve against transformers' and PEFT's batched generate.

N concurrent greedy requests, each generating exactly `--new-tokens` tokens (min_new_tokens equals
max_new_tokens, so EOS never ends a row early), on the embedded SmolLM2-135M-Instruct in fp32 on the CPU.
Four systems get the same prompts: the chat prompts rendered with the tokenizer's chat template, or with
`--prompts short` their first three words as plain text (a decode-heavy load of a few prompt tokens each):

  server-base    the real deltaserve gRPC server (a `deltaserve serve` process on 127.0.0.1), no adapter; all
                 N requests are in flight at once through AsyncClient + asyncio.gather
  server-mixed   the same server, the N requests spread round-robin over K LoRA adapters
                 (rank `--rank`, target_modules="all-linear", made with PEFT and loaded with LoadAdapter)
  hf-generate    transformers' batched `generate` on the base (left padding, greedy)
  peft-mixed     PEFT's mixed-adapter batched `generate(..., adapter_names=[...])` with all K adapters
                 loaded and the same per-row adapter assignment as server-mixed

Every timed run is end to end, text in and text out: the server runs include gRPC, tokenization and
detokenization; the generate runs include tokenizing the batch and decoding the outputs. Each system is
warmed up once; then the systems take turns for `--repeats` rounds (so machine noise hits all of them
alike) and each reports its BEST round (the highest tokens/s). The greedy outputs are also compared
row by row (server-base vs hf-generate, server-mixed vs peft-mixed) as a sanity check.

Run:  python benchmarks/throughput.py            (N=16, 64 tokens, K=8, 2 repeats; several minutes)
      python benchmarks/throughput.py --quick    (N=4, 16 tokens, K=2, 1 repeat; a smoke run)
      python benchmarks/throughput.py --prompts short   (short plain-text prompts: decode-heavy)
      python benchmarks/throughput.py --adapter-dirs examples/adapters/*   (the trained example adapters
      instead of K generated ones; peft-mixed runs only when they are all LoRAs)
Writes benchmarks/results/throughput-cpu.json (throughput-short-cpu.json for --prompts short; …-quick.json for
--quick) and a PNG bar chart next to it
(skipped with a warning when matplotlib is missing: pip install matplotlib).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from deltaserve.adapters import tensor_bytes
from deltaserve.client import AsyncClient
from harness import (
    CALL_TIMEOUT_S,
    Measurement,
    Run,
    ServerProcess,
    Settings,
    chat_messages,
    cpu_config,
    description,
    embedded_model,
    format_table,
    generate_batch,
    is_lora,
    load_adapters,
    log,
    make_adapter,
    option,
    parse_settings,
    quiet,
    ratio,
    render,
    report,
    require,
    served_bytes,
    timed_rounds,
    trained_adapters,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SERVER_BASE = "server-base"
SERVER_MIXED = "server-mixed"
HF_GENERATE = "hf-generate"
PEFT_MIXED = "peft-mixed"


@dataclass(frozen=True)
class ThroughputSettings(Settings):
    STEM = "throughput-cpu"

    requests: int = option(16, "concurrent requests N", quick=4, minimum=1)
    new_tokens: int = option(64, "tokens per request", quick=16, minimum=1)
    adapters: int = option(8, "LoRA adapters K", quick=2, minimum=1)
    adapter_dirs: tuple[str, ...] = option(
        (), "serve these trained adapter directories (e.g. examples/adapters/*) instead of K generated LoRAs"
    )
    rank: int = option(16, "LoRA rank", minimum=1)
    repeats: int = option(2, "timed rounds per system", quick=1, minimum=1)
    prompts: str = option("chat", "chat (the chat template) or short (three words of plain text: decode-heavy)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.prompts in ("chat", "short"), "--prompts must be chat or short")

    def stem(self) -> str:
        return self.STEM if self.prompts == "chat" else "throughput-short-cpu"


@dataclass(frozen=True)
class Workload:
    """The N requests: one user message each, the prompt text generate sees, and its adapter in mixed runs.
    `raw`: the messages are plain-text prompts (the server gets them as `prompt`, without the template)."""

    messages: list[str]
    rendered: list[str]
    adapter_ids: list[str]
    new_tokens: int
    raw: bool = False


# ---- setup ----------------------------------------------------------------------------------------
def build_workload(tokenizer: PreTrainedTokenizerBase, s: ThroughputSettings, names: list[str]) -> Workload:
    """Cycle through the prompts; request i uses adapter i % K in the mixed runs."""
    messages = chat_messages(s.requests)
    adapter_ids = [names[i % len(names)] for i in range(s.requests)]
    if s.prompts == "short":
        short = [" ".join(m.split()[:3]) for m in messages]
        return Workload(short, short, adapter_ids, s.new_tokens, raw=True)
    return Workload(messages, [render(tokenizer, m) for m in messages], adapter_ids, s.new_tokens)


def load_base(model_dir: str) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def load_peft(model_dir: str, adapters: dict[str, str]) -> PreTrainedModel:
    """A PeftModel over its own copy of the base with all K adapters loaded under their ids."""
    from peft import PeftModel

    (first_id, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(load_base(model_dir), first_path, adapter_name=first_id)
    for adapter_id, path in rest:
        model.load_adapter(path, adapter_name=adapter_id)
    return model.eval()


def left_padded(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---- the systems ----------------------------------------------------------------------------------
async def _server_batch(target: str, work: Workload, adapter_ids: list[str]) -> Run:
    async with AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        await client.model_info()  # connect before the clock starts
        return await generate_batch(client, work.messages, adapter_ids, work.new_tokens, raw=work.raw)


async def _load(target: str, adapters: dict[str, str]) -> None:
    async with AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        await load_adapters(client, adapters)


def server_runner(target: str, work: Workload, mixed: bool) -> Callable[[], Run]:
    adapter_ids = work.adapter_ids if mixed else [""] * len(work.messages)
    return lambda: asyncio.run(_server_batch(target, work, adapter_ids))


def generate_runner(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, work: Workload, mixed: bool
) -> Callable[[], Run]:
    """transformers' (or, with adapter_names, PEFT's mixed-adapter) batched greedy generate."""
    extra = {"adapter_names": work.adapter_ids} if mixed else {}

    def run() -> Run:
        start = time.perf_counter()
        # The rendered template already holds the special tokens, as on the server.
        inputs = tokenizer(work.rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=work.new_tokens,
                min_new_tokens=work.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **extra,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        tokenizer.batch_decode(new, skip_special_tokens=True)
        return Run(time.perf_counter() - start, new.tolist())

    return run


def checked(name: str, run: Callable[[], Run], expected: int) -> Callable[[], Run]:
    """`run`, failing loudly if a round did not generate exactly the expected tokens."""

    def wrapped() -> Run:
        result = run()
        if result.tokens != expected:
            raise RuntimeError(f"{name} generated {result.tokens} tokens, expected {expected}")
        return result

    return wrapped


def matching_rows(a: Measurement, b: Measurement) -> int:
    """Rows whose greedy output is identical in the two systems' last runs."""
    return sum(x == y for x, y in zip(a.runs[-1].outputs, b.runs[-1].outputs, strict=True))


# ---- reporting ------------------------------------------------------------------------------------
def ratios(by_name: dict[str, Measurement]) -> dict[str, dict]:
    """Best-round ratios, each with both throughputs beside it."""
    best = {name: m.best() for name, m in by_name.items()}
    pairs = {
        "server_mixed / server_base": (SERVER_MIXED, SERVER_BASE),
        "server_mixed / peft_mixed": (SERVER_MIXED, PEFT_MIXED),
        "server_base / hf_generate": (SERVER_BASE, HF_GENERATE),
    }
    return {label: ratio(best[a], best[b]) for label, (a, b) in pairs.items() if a in best and b in best}


def table(by_name: dict[str, Measurement]) -> str:
    base = by_name[SERVER_BASE].best()
    peft = by_name[PEFT_MIXED].best() if PEFT_MIXED in by_name else None
    rows = [
        [
            m.name,
            f"{m.best():.1f}",
            f"{m.median():.1f}",
            f"{m.best() / base:.2f}x",
            f"{m.best() / peft:.2f}x" if peft else "-",
        ]
        for m in by_name.values()
    ]
    return format_table(["system", "tok/s (best)", "tok/s (median)", "vs server-base", "vs peft-mixed"], rows)


def weight_bytes(base_model: PreTrainedModel, adapters: dict[str, str]) -> dict[str, float]:
    """Bytes a mixed decode step must read besides the base's: every active adapter's weights (fp32). When
    decode is memory-bound, mixed/base throughput cannot beat 1 / (1 + adapter bytes / base bytes)."""
    base = tensor_bytes(base_model.parameters())
    adapters = sum(served_bytes(path) for path in adapters.values())
    return {"base_bytes": base, "adapter_bytes": adapters, "bandwidth_floor_mixed_over_base": 1 / (1 + adapters / base)}


def result(by_name: dict[str, Measurement], s: ThroughputSettings, max_seq_len: int, sizes: dict) -> dict:
    matching = {"server-base vs hf-generate": matching_rows(by_name[SERVER_BASE], by_name[HF_GENERATE])}
    if PEFT_MIXED in by_name:
        matching["server-mixed vs peft-mixed"] = matching_rows(by_name[SERVER_MIXED], by_name[PEFT_MIXED])
    return {
        "model": by_name[SERVER_BASE].info["model"],
        "device": "cpu",
        "dtype": "float32",
        "tokens_per_run": s.requests * s.new_tokens,
        "target_modules": "all-linear" if not s.adapter_dirs else "as trained",
        "adapter_dirs": list(s.adapter_dirs),
        "statistic": "best of repeats (highest tokens/s), after one warm-up run per system",
        "server_max_seq_len": max_seq_len,
        "systems": {
            m.name: {
                "best_tokens_per_s": m.best(),
                "median_tokens_per_s": m.median(),
                "tokens_per_s": m.values(),
                "seconds": m.values("seconds"),
            }
            for m in by_name.values()
        },
        "ratios": ratios(by_name),
        "weights": sizes,
        "greedy_rows_matching": {**matching, "of": s.requests},
    }


def draw(by_name: dict[str, Measurement], title: str) -> Callable:
    """A bar chart of the best tokens/s per system."""

    def plot(ax: object) -> None:
        bars = ax.bar(list(by_name), [m.best() for m in by_name.values()])
        for bar, color in zip(bars, ["#4c72b0", "#55a868", "#8c8c8c", "#c44e52"], strict=False):
            bar.set_color(color)
        ax.bar_label(bars, fmt="%.0f")
        ax.set_ylabel("generated tokens / s (best of repeats)")
        ax.set_title(title, fontsize=9)

    return plot


def summary_lines(data: dict, sizes: dict) -> list[str]:
    lines = [
        f"{name}: {r['ratio']:.2f} ({r['tokens_per_s']:.1f} / {r['base_tokens_per_s']:.1f} tok/s)"
        for name, r in data["ratios"].items()
    ]
    lines.append(
        f"adapters {sizes['adapter_bytes'] / 1e6:.0f} MB vs base {sizes['base_bytes'] / 1e6:.0f} MB: "
        f"bandwidth floor for server_mixed / server_base {sizes['bandwidth_floor_mixed_over_base']:.2f}"
    )
    match = data["greedy_rows_matching"]
    pairs = ", ".join(f"{pair} {count}/{match['of']}" for pair, count in match.items() if pair != "of")
    return [*lines, f"identical greedy rows: {pairs}"]


# ---- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    s = parse_settings(ThroughputSettings, argv, description(__doc__))
    quiet()
    model_dir, model_name = embedded_model()
    tokenizer = left_padded(AutoTokenizer.from_pretrained(model_dir))
    trained = trained_adapters(s.adapter_dirs)
    work = build_workload(tokenizer, s, list(trained) or [f"lora{i}" for i in range(s.adapters)])
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in work.rendered)
    max_seq_len = longest + s.new_tokens + 16
    expected = s.requests * s.new_tokens
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-") as root:
        if trained:
            log(f"serving {len(trained)} trained adapters: {', '.join(trained)}")
            adapters = trained
        else:
            log(f"making {s.adapters} LoRA adapters (rank {s.rank}, all-linear)")
            adapters = {
                f"lora{i}": make_adapter(model_dir, root, f"lora{i}", s.rank, seed=i) for i in range(s.adapters)
            }
        config = cpu_config(
            model_dir,
            max_batch_size=s.requests,
            max_seq_len=max_seq_len + 32,  # room for trained soft prompts' virtual tokens
            max_adapters=len(adapters),
            max_lora_rank=s.rank,
        )
        log("starting the server and loading the base and PEFT models")
        with ServerProcess(config) as server:
            asyncio.run(_load(server.target, adapters))
            base_model = load_base(model_dir)
            sizes = weight_bytes(base_model, adapters)
            systems = {
                SERVER_BASE: server_runner(server.target, work, mixed=False),
                SERVER_MIXED: server_runner(server.target, work, mixed=True),
                HF_GENERATE: generate_runner(base_model, tokenizer, work, mixed=False),
            }
            if all(is_lora(path) for path in adapters.values()):  # PEFT's mixed batches take LoRAs only
                systems[PEFT_MIXED] = generate_runner(load_peft(model_dir, adapters), tokenizer, work, mixed=True)
            systems = {name: checked(name, run, expected) for name, run in systems.items()}
            by_name = timed_rounds(systems, s.repeats, rotate=False).measurements
    by_name[SERVER_BASE].info["model"] = model_name
    data = result(by_name, s, max_seq_len, sizes)
    title = (
        f"{model_name} fp32 CPU: N={s.requests} concurrent requests x {s.new_tokens} tokens, "
        + (f"trained adapters {', '.join(adapters)}" if trained else f"K={s.adapters} LoRA adapters rank {s.rank}")
        + (", short plain-text prompts" if s.prompts == "short" else ", chat prompts")
        + f", best of {s.repeats}"
    )
    text = [title, table(by_name), *summary_lines(data, sizes)]
    report("throughput", s, data, text, draw(by_name, title), size=(7, 4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
