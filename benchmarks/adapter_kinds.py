"""Every adapter kind against the base: decode throughput, and the prefill cost of prefix vs prompt tuning.

On the embedded SmolLM2-135M-Instruct in fp32 on the CPU, with the real deltaserve gRPC server as a `deltaserve
serve` process on 127.0.0.1, started once for the whole run. The adapters are real files with random non-identity
weights, made by the test factories (deltaserve.testing.kinds): PEFT kinds saved by PEFT itself, bottleneck adapters in
AdapterHub's format (with weights scaled so that their outputs stay finite on this model; see BOTTLENECK_SCALE).

  1. throughput  N concurrent greedy requests (`--requests`, chat prompts) of exactly `--new-tokens` tokens
                 each (min_new_tokens = max_new_tokens, so EOS never ends a row early), end to end, text in and
                 text out, for every configuration:
                   base       no adapter
                   <kind>     all N requests on one adapter of that kind: lora (rank 16, all-linear), dora,
                              adalora, ia3, prefix, prompt, ptuning (PEFT, as deltaserve.testing.kinds configures them:
                              prefix 5, prompt 6 and ptuning 4 virtual tokens), houlsby, pfeiffer, parallel
                              (bottleneck, reduction factor 8, size 72)
                   mixed      the N requests spread round-robin over the base and every kind at once
                 One untimed warm-up round of every configuration, then `--repeats` rounds in which the
                 configurations take turns (the order rotates every round, so machine noise hits all of them
                 alike). Reported: median (and best) generated tokens/s, and the ratio to the base measured in
                 the same run (median / median, and the median of the per-round ratios). As sanity checks, the
                 rows that differ from the base's greedy output (every kind should change the output) and the
                 mixed rows identical to the same request in its kind's own configuration.
  2. prefill     time to first token (TTFT: client side, until the first streamed chunk holding a token) of
                 single greedy requests with max_new_tokens=1 on a raw prompt of `--prompt-tokens` tokens T, for
                   base        no adapter, T tokens
                   base+P      no adapter, T + P tokens (the control: a prefill of P more tokens)
                   prefix      a prefix-tuning adapter with P = `--virtual-tokens` virtual tokens, T tokens
                   prompt      a prompt-tuning adapter with the same P, T tokens
                 (both made by make_peft_adapter with num_virtual_tokens overridden)
                 `--ttft-repeats` rounds after one untimed warm-up of each; p50 (and p95) reported. Prompt
                 tuning prepends P embeddings that run through every layer (a prefill of P + T positions, like
                 base+P); prefix tuning writes P ready-made key/value entries into the cache and runs only the
                 T prompt tokens (attending over P + T). The expectation, checked rather than assumed:
                 prompt ~ base+P and prefix ~ base.

Run:  python benchmarks/adapter_kinds.py          (N=16, 64 tokens, 3 repeats; TTFT 10 rounds; 15-20 minutes)
      python benchmarks/adapter_kinds.py --quick  (N=11: one request per target in the mixed run, 16 tokens,
                                                 1 repeat; TTFT 3 rounds; a smoke run)
Writes benchmarks/results/adapter_kinds.json (adapter_kinds-quick.json for --quick) and a PNG next to it
(skipped with a warning when matplotlib is missing: pip install matplotlib).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

from deltaserve.client import AsyncClient, Client
from deltaserve.testing import kinds
from harness import (
    CALL_TIMEOUT_S,
    Measurement,
    ServerProcess,
    Settings,
    chat_messages,
    cpu_config,
    description,
    embedded_model,
    format_table,
    generate_batch,
    log,
    ms_summary,
    on_loop,
    option,
    parse_settings,
    quiet,
    render,
    report,
    served,
    settings_dict,
    timed_rounds,
)
from harness import CHAT_PROMPTS as PROMPTS
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

BASE = "base"
MIXED = "mixed"
# adapter id -> (factory, its name in deltaserve.testing.kinds: a PEFT_KINDS entry or a BOTTLENECK_PRESETS preset)
KINDS: dict[str, tuple[str, str]] = {
    "lora": ("peft", "lora16"),
    "dora": ("peft", "dora"),
    "adalora": ("peft", "adalora"),
    "ia3": ("peft", "ia3"),
    "prefix": ("peft", "prefix"),
    "prompt": ("peft", "prompt"),
    "ptuning": ("peft", "ptuning"),
    "houlsby": ("bottleneck", "houlsby"),
    "pfeiffer": ("bottleneck", "pfeiffer"),
    "parallel": ("bottleneck", "parallel"),
}
CONFIGS = (BASE, *KINDS, MIXED)
LORA_RANK = 16  # the largest rank among the kinds (lora16); the server's --max-lora-rank
REDUCTION_FACTOR = 8  # bottleneck size = hidden size / 8
# make_bottleneck's default N(0, 0.3^2) weights suit the tests' 64-wide model; on SmolLM2 (576 wide, residual
# stream up to ~2.5e4) they overflow (parallel: inf/NaN logits). 0.02, as tests/server/test_adapter_kinds.py uses on
# SmolLM2, keeps every preset finite while still changing the output.
BOTTLENECK_SCALE = 0.02
# TTFT conditions -> adapter id ("" is the base); the two soft-prompt adapters have P virtual tokens each.
TTFT_PREFIX, TTFT_PROMPT = "prefix-p", "prompt-p"
TTFT_CONDITIONS = ("base", "base+P", "prefix", "prompt")
TTFT_ADAPTERS = {"base": "", "base+P": "", "prefix": TTFT_PREFIX, "prompt": TTFT_PROMPT}


@dataclass(frozen=True)
class KindsSettings(Settings):
    STEM = "adapter_kinds"

    requests: int = option(16, "concurrent requests N", quick=len(KINDS) + 1, minimum=1)
    new_tokens: int = option(64, "tokens per request", quick=16, minimum=1)
    repeats: int = option(3, "timed rounds per configuration", quick=1, minimum=1)
    virtual_tokens: int = option(20, "P of the TTFT prefix/prompt adapters", minimum=1)
    prompt_tokens: int = option(100, "T, the TTFT prompt's tokens", minimum=1)
    ttft_repeats: int = option(10, "TTFT rounds", quick=3, minimum=1)


def make_adapters(model_dir: str, root: str) -> dict[str, str]:
    """One adapter of every kind; adapter id -> directory."""
    paths = {}
    for seed, (adapter_id, (factory, name)) in enumerate(KINDS.items()):
        out_dir = os.path.join(root, adapter_id)
        if factory == "peft":
            paths[adapter_id] = kinds.make_peft_adapter(model_dir, out_dir, name, seed=seed)
        else:
            paths[adapter_id] = kinds.make_bottleneck(
                model_dir, out_dir, name, seed=seed, reduction_factor=REDUCTION_FACTOR, scale=BOTTLENECK_SCALE
            )
        log(f"made {adapter_id} ({factory} {name})")
    return paths


def fixed_length_prompt(tokenizer: PreTrainedTokenizerBase, tokens: int) -> str:
    """Raw text of about `tokens` tokens (the chat prompts repeated, cut at a token boundary)."""
    text = " ".join(PROMPTS)
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += " " + text
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens])


async def load_adapters(target: str, adapters: dict[str, str]) -> dict[str, dict[str, object]]:
    """LoadAdapter every adapter; adapter id -> what the server reports about it."""
    infos = {}
    async with AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        for adapter_id, path in adapters.items():
            info = await client.load_adapter(adapter_id, path)
            infos[adapter_id] = {
                "kind": info.kind,
                "rank": info.rank,
                "size_bytes": info.size_bytes,
                "virtual_tokens": info.virtual_tokens,
                "target_modules": info.target_modules,
            }
            log(f"loaded {adapter_id}: {info.kind}, {info.size_bytes / 1e6:.2f} MB, {info.virtual_tokens} virtual")
    return infos


# ---- part 1: throughput ---------------------------------------------------------------------------
def request_targets(config: str, n: int) -> list[str]:
    """The adapter id of each of the N requests ("" is the base)."""
    if config == BASE:
        return [""] * n
    if config == MIXED:
        targets = ["", *KINDS]
        return [targets[i % len(targets)] for i in range(n)]
    return [config] * n


def measure_throughput(target: str, settings: KindsSettings) -> tuple[dict[str, Measurement], list[float]]:
    """A warm-up round, then `repeats` rounds of every configuration (rotating order), on one client."""
    with asyncio.Runner() as runner:
        client = AsyncClient(target, timeout=CALL_TIMEOUT_S)
        runner.run(client.model_info())  # connect before the clock starts
        targets = {c: request_targets(c, settings.requests) for c in CONFIGS}

        def system(ids: list[str]) -> object:
            return on_loop(runner, lambda: generate_batch(client, chat_messages(len(ids)), ids, settings.new_tokens))

        rounds = timed_rounds({c: system(ids) for c, ids in targets.items()}, settings.repeats)
        runner.run(client.close())
    for config, ids in targets.items():
        rounds.measurements[config].info["adapter_ids"] = ids
    return rounds.measurements, rounds.loads


def throughput_summary(cells: dict[str, Measurement]) -> dict[str, object]:
    base = cells[BASE]
    out: dict[str, object] = {}
    for config, cell in cells.items():
        per_round = [r / b for r, b in zip(cell.values(), base.values(), strict=True)]
        last, base_last = cell.runs[-1].outputs, base.runs[-1].outputs
        out[config] = {
            "median_tokens_per_s": cell.median(),
            "best_tokens_per_s": cell.best(),
            "base_median_tokens_per_s": base.median(),
            "tokens_per_s": cell.values(),
            "seconds": cell.values("seconds"),
            "median_over_base": cell.median() / base.median(),
            "best_over_base": cell.best() / base.best(),
            "per_round_over_base": per_round,
            "median_of_per_round_over_base": statistics.median(per_round),
            "rows_differing_from_base": sum(a != b for a, b in zip(last, base_last, strict=True)),
            "adapter_ids": cell.info["adapter_ids"],
        }
    # Mixed row i is request i of its target's own configuration (same prompt): identical greedy outputs show
    # the batch's other kinds did not leak into it (fp32 batching noise may flip a near-tie, rarely).
    mixed = cells[MIXED]
    same = [
        mixed.runs[-1].outputs[i] == cells[adapter_id or BASE].runs[-1].outputs[i]
        for i, adapter_id in enumerate(mixed.info["adapter_ids"])
    ]
    out[MIXED]["rows_identical_to_own_config"] = sum(same)
    out[MIXED]["rows_differing_from_own_config"] = [
        f"{i}:{mixed.info['adapter_ids'][i] or BASE}" for i, ok in enumerate(same) if not ok
    ]
    return out


# ---- part 2: prefill cost (TTFT) ------------------------------------------------------------------
def _ttft(client: Client, prompt: str, adapter_id: str) -> tuple[float, float]:
    """(time to the first chunk holding a token, end to end) of one greedy 1-token request, in seconds."""
    start = time.perf_counter()
    first = None
    count = 0
    for chunk in client.generate_stream(prompt, adapter_id=adapter_id, max_new_tokens=1, temperature=0.0):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
        count += len(chunk.token_ids)
    end = time.perf_counter()
    if first is None or count != 1:
        raise RuntimeError(f"TTFT request on {adapter_id or 'base'} streamed {count} tokens, expected 1")
    return first - start, end - start


def measure_ttft(target: str, prompts: dict[str, str], settings: KindsSettings) -> dict[str, dict[str, list[float]]]:
    """One warm-up request per condition, then `ttft_repeats` rounds (the order rotates every round)."""
    times: dict[str, dict[str, list[float]]] = {c: {"ttft": [], "e2e": []} for c in TTFT_CONDITIONS}
    with Client(target, timeout=CALL_TIMEOUT_S) as client:
        client.model_info()  # connect before the clock starts
        for condition in TTFT_CONDITIONS:
            _ttft(client, prompts[condition], TTFT_ADAPTERS[condition])
        for round_ in range(settings.ttft_repeats):
            k = round_ % len(TTFT_CONDITIONS)
            for condition in TTFT_CONDITIONS[k:] + TTFT_CONDITIONS[:k]:
                ttft, e2e = _ttft(client, prompts[condition], TTFT_ADAPTERS[condition])
                times[condition]["ttft"].append(ttft)
                times[condition]["e2e"].append(e2e)
            log(
                f"TTFT round {round_ + 1}/{settings.ttft_repeats}: "
                + ", ".join(f"{c} {times[c]['ttft'][-1] * 1e3:.0f} ms" for c in TTFT_CONDITIONS)
            )
    return times


def ttft_summary(
    times: dict[str, dict[str, list[float]]], prompt_tokens: dict[str, int], infos: dict[str, dict[str, object]]
) -> dict[str, object]:
    out: dict[str, object] = {}
    base_p50 = ms_summary(times["base"]["ttft"])["p50"]
    for condition in TTFT_CONDITIONS:
        adapter_id = TTFT_ADAPTERS[condition]
        virtual = int(infos[adapter_id]["virtual_tokens"]) if adapter_id else 0
        tokens = prompt_tokens[condition]
        ttft = ms_summary(times[condition]["ttft"])
        out[condition] = {
            "adapter_id": adapter_id,
            "prompt_tokens": tokens,
            "adapter_virtual_tokens": virtual,
            # positions run through every layer in the prefill, and cache positions attended over
            "prefill_positions_computed": tokens + (virtual if condition == "prompt" else 0),
            "cache_positions_attended": tokens + virtual,
            "ttft_ms": ttft,
            "e2e_ms": ms_summary(times[condition]["e2e"]),
            "ttft_seconds": times[condition]["ttft"],
            "ttft_p50_minus_base_ms": ttft["p50"] - base_p50,
        }
    return out


# ---- reporting ------------------------------------------------------------------------------------
def made_by(adapter_id: str, settings: KindsSettings) -> str:
    if adapter_id in KINDS:
        factory, name = KINDS[adapter_id]
        if factory == "peft":
            return f"deltaserve.testing.kinds make_peft_adapter({name!r})"
        options = f"reduction_factor={REDUCTION_FACTOR}, scale={BOTTLENECK_SCALE}"
        return f"deltaserve.testing.kinds make_bottleneck({name!r}, {options})"
    kind = "prefix" if adapter_id == TTFT_PREFIX else "prompt"
    return f"deltaserve.testing.kinds make_peft_adapter({kind!r}, num_virtual_tokens={settings.virtual_tokens})"


def throughput_table(summary: dict[str, object], infos: dict[str, dict[str, object]]) -> str:
    rows = []
    for config in CONFIGS:
        s, info = summary[config], infos.get(config)
        rows.append(
            [
                config,
                info["kind"] if info else ("-" if config == BASE else "all"),
                f"{info['size_bytes'] / 1e6:.2f}" if info else "-",
                info["virtual_tokens"] if info else "-",
                f"{s['median_tokens_per_s']:.1f}",
                f"{s['best_tokens_per_s']:.1f}",
                f"{s['median_over_base']:.2f}x",
                f"{s['median_of_per_round_over_base']:.2f}x",
                s["rows_differing_from_base"],
            ]
        )
    header = ["config", "kind", "MB", "virt", "tok/s (median)", "tok/s (best)", "vs base", "per-round vs base"]
    return format_table([*header, "rows != base"], rows, left=2)


def ttft_table(summary: dict[str, object]) -> str:
    base = summary["base"]["ttft_ms"]["p50"]
    rows = []
    for condition in TTFT_CONDITIONS:
        s = summary[condition]
        t = s["ttft_ms"]
        rows.append(
            [
                condition,
                s["prompt_tokens"],
                s["adapter_virtual_tokens"],
                s["prefill_positions_computed"],
                s["cache_positions_attended"],
                t["n"],
                f"{t['p50']:.1f}",
                f"{t['p95']:.1f}",
                f"{t['p50'] / base:.2f}x",
                f"{s['ttft_p50_minus_base_ms']:+.1f}",
            ]
        )
    header = ["condition", "prompt tok", "virtual", "computed", "attended", "n", "TTFT p50 ms", "TTFT p95 ms"]
    return format_table([*header, "vs base", "- base ms"], rows)


def result(
    model_name: str,
    settings: KindsSettings,
    config: object,
    infos: dict[str, dict[str, object]],
    throughput: dict[str, object],
    loads: list[float],
    ttft: dict[str, object],
) -> dict[str, object]:
    return {
        "model": model_name,
        "device": "cpu",
        "dtype": "float32",
        "server": {
            **served(config, "max_batch_size", "max_seq_len", "max_adapters", "max_lora_rank", "max_bottleneck_size"),
            "server_process": "the server is a `deltaserve serve` process (harness.ServerProcess)",
        },
        "adapters": {
            adapter_id: {"made_by": made_by(adapter_id, settings), **info} for adapter_id, info in infos.items()
        },
        "statistic": (
            "throughput: generated tokens / wall seconds of the whole batch, client side, median (and best) of "
            "repeats after one warm-up round; ratios to the base of the same run. TTFT: client side, until the "
            "first streamed chunk holding a token; p50/p95 (linear interpolation)"
        ),
        "throughput": throughput,
        "load_average_after_rounds": loads,
        "prefill_ttft": ttft,
    }


def draw(data: dict[str, object], settings: dict[str, object]) -> object:
    """Throughput ratio to the base per configuration, and TTFT p50 per prefill condition."""

    def plot(ax_rate: object, ax_ttft: object) -> None:
        throughput = data["throughput"]
        names = [c for c in CONFIGS if c != BASE]
        ratios = [throughput[c]["median_over_base"] for c in names]
        colors = ["#8172b3" if c == MIXED else ("#55a868" if KINDS[c][0] == "bottleneck" else "#4c72b0") for c in names]
        bars = ax_rate.bar(names, ratios, color=colors)
        ax_rate.bar_label(bars, fmt="%.2f", fontsize=8)
        for x, c in enumerate(names):
            per_round = throughput[c]["per_round_over_base"]
            ax_rate.plot([x] * len(per_round), per_round, "k.", markersize=3)
        ax_rate.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
        ax_rate.set_ylabel("tokens/s vs base (bars: median/median; dots: per round)")
        ax_rate.set_title(
            f"1. decode throughput, N={settings['requests']} x {settings['new_tokens']} tokens "
            f"(base {throughput[BASE]['median_tokens_per_s']:.1f} tok/s, median of {settings['repeats']})",
            fontsize=10,
        )
        ax_rate.tick_params(axis="x", labelrotation=30)

        ttft = data["prefill_ttft"]
        p50 = [ttft[c]["ttft_ms"]["p50"] for c in TTFT_CONDITIONS]
        p95 = [ttft[c]["ttft_ms"]["p95"] for c in TTFT_CONDITIONS]
        bars = ax_ttft.bar(
            TTFT_CONDITIONS,
            p50,
            color=["#8c8c8c", "#c8c8c8", "#dd8452", "#c44e52"],
            yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]],
            capsize=4,
        )
        ax_ttft.bar_label(bars, fmt="%.0f", label_type="center")
        ax_ttft.set_ylabel("time to first token, ms (p50, whisker to p95)")
        ax_ttft.set_title(
            f"2. prefill: T={settings['prompt_tokens']} prompt tokens, P={settings['virtual_tokens']} virtual",
            fontsize=10,
        )

    return plot


# ---- main -----------------------------------------------------------------------------------------
def make_all(model_dir: str, root: str, p: int) -> dict[str, str]:
    """One adapter of every kind, and a prefix and a prompt adapter with P virtual tokens for part 2."""
    log(f"making one adapter of each of {len(KINDS)} kinds and two with {p} virtual tokens")
    adapters = make_adapters(model_dir, root)
    for seed, (adapter_id, kind) in enumerate(((TTFT_PREFIX, "prefix"), (TTFT_PROMPT, "prompt")), len(KINDS)):
        out_dir = os.path.join(root, adapter_id)
        adapters[adapter_id] = kinds.make_peft_adapter(model_dir, out_dir, kind, seed=seed, num_virtual_tokens=p)
    return adapters


def max_seq_len(tokenizer: PreTrainedTokenizerBase, settings: KindsSettings) -> int:
    """Room for the longest chat prompt plus its tokens, or the TTFT prompt, after the most virtual tokens."""
    longest = max(len(tokenizer(render(tokenizer, m), add_special_tokens=False)["input_ids"]) for m in PROMPTS)
    peft_virtual = [kinds.PEFT_KINDS[name][1].get("num_virtual_tokens", 0) for f, name in KINDS.values() if f == "peft"]
    most_virtual = max([settings.virtual_tokens, *peft_virtual])
    return max(longest + settings.new_tokens, settings.prompt_tokens + 2) + most_virtual + 16


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(KindsSettings, argv, description(__doc__))
    quiet()
    model_dir, model_name = embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    p = settings.virtual_tokens
    ttft_texts = {
        "base": fixed_length_prompt(tokenizer, settings.prompt_tokens),
        "base+P": fixed_length_prompt(tokenizer, settings.prompt_tokens + p),
    }
    ttft_texts |= {"prefix": ttft_texts["base"], "prompt": ttft_texts["base"]}
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-") as root:
        adapters = make_all(model_dir, root, p)
        config = cpu_config(
            model_dir,
            max_batch_size=settings.requests,
            max_seq_len=max_seq_len(tokenizer, settings),
            max_adapters=len(adapters),
            max_lora_rank=LORA_RANK,
            max_bottleneck_size=AutoConfig.from_pretrained(model_dir).hidden_size // REDUCTION_FACTOR,
        )
        log("starting the server")
        with ServerProcess(config) as server:
            infos = asyncio.run(load_adapters(server.target, adapters))
            with Client(server.target, timeout=CALL_TIMEOUT_S) as client:
                prompt_tokens = {c: len(client.tokenize(text).token_ids) for c, text in ttft_texts.items()}
            log(f"throughput: {len(CONFIGS)} configurations, N={settings.requests} x {settings.new_tokens} tokens")
            cells, loads = measure_throughput(server.target, settings)
            log(f"prefill: TTFT of {', '.join(TTFT_CONDITIONS)}, prompt tokens {prompt_tokens}")
            times = measure_ttft(server.target, ttft_texts, settings)
    throughput = throughput_summary(cells)
    ttft = ttft_summary(times, prompt_tokens, infos)
    data = result(model_name, settings, config, infos, throughput, loads, ttft)
    text = summary_text(model_name, settings, throughput, infos, loads, ttft)
    title = f"{model_name}, fp32 CPU ({os.cpu_count()} cores)"
    plot = {"panels": 2, "size": (13, 4.4), "widths": (2.2, 1), "title": title}
    report("adapter_kinds", settings, data, text, draw(data, settings_dict(settings)), **plot)
    return 0


def summary_text(
    model_name: str, settings: KindsSettings, throughput: dict, infos: dict, loads: list[float], ttft: dict
) -> list[str]:
    mixed = throughput[MIXED]
    differing = mixed["rows_differing_from_own_config"]
    return [
        f"{model_name} fp32 CPU ({os.cpu_count()} cores), N={settings.requests} concurrent requests x "
        f"{settings.new_tokens} tokens, median of {settings.repeats} (load average after rounds: "
        + ", ".join(f"{x:.2f}" for x in loads)
        + ")",
        throughput_table(throughput, infos),
        f"mixed rows identical to the same request in its own configuration: "
        f"{mixed['rows_identical_to_own_config']}/{settings.requests}"
        + (f" (differing: {', '.join(differing)})" if differing else "")
        + "\n",
        f"prefill: single requests, max_new_tokens=1, P={settings.virtual_tokens} virtual tokens, "
        f"p50 of {settings.ttft_repeats}",
        ttft_table(ttft),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
