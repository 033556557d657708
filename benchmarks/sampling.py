"""Sampled against greedy decoding through the server, and the sampler alone.

Part 1 (server): N concurrent requests on the embedded SmolLM2-135M-Instruct (fp32, CPU, a `deltaserve serve`
process), each generating exactly `--new-tokens` tokens (min_new_tokens = max_new_tokens), under three
sampling settings that take turns round by round in one run:
  greedy          temperature 0
  top-p           temperature 0.8, top_p 0.95 (every row seeded)
  top-k+penalty   temperature 0.8, top_k 50, repetition_penalty 1.1
Each reports its best round; the ratio to greedy is printed beside greedy's tok/s, for N in `--concurrency`.

Part 2 (sampler alone): one step of the batched sampler over B rows of real next-token logits (every prompt
position of the chat prompts through the embedded model), in ms a step (median of `--steps`), for the same
settings, beside the per-row Python sampler it replaced (kept here as the baseline, as it was in
server/engine/sampling.py before the batched one).

Run:  python benchmarks/sampling.py           (N = 16 and 64, 64 tokens, 2 repeats; B = 16, 64, 256)
      python benchmarks/sampling.py --quick   (N = 4, 8 tokens, 1 repeat; B = 16; a smoke run)
Writes benchmarks/results/sampling-cpu.json and a PNG next to it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import torch
from deltaserve.client import AsyncClient
from deltaserve.server.engine.sampling import Sampler, SamplingParams
from harness import (
    CALL_TIMEOUT_S,
    Run,
    ServerProcess,
    Settings,
    chat_messages,
    cpu_config,
    description,
    embedded_model,
    format_table,
    log,
    option,
    parse_settings,
    quiet,
    ratio,
    render,
    report,
    timed_rounds,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

SETTINGS = {
    "greedy": {},
    "top-p": {"temperature": 0.8, "top_p": 0.95},
    "top-k+penalty": {"temperature": 0.8, "top_k": 50, "repetition_penalty": 1.1},
}


@dataclass(frozen=True)
class SamplingSettings(Settings):
    STEM = "sampling-cpu"

    concurrency: tuple[int, ...] = option((16, 64), "concurrent requests N (one server run each)", quick=(4,))
    new_tokens: int = option(64, "tokens per request", quick=8, minimum=1)
    repeats: int = option(2, "timed rounds per setting", quick=1, minimum=1)
    rows: tuple[int, ...] = option((16, 64, 256), "batch rows B of the sampler-alone part", quick=(16,))
    steps: int = option(20, "timed sampler steps per setting", quick=3, minimum=1)


# ---- part 1: through the server --------------------------------------------------------------------
async def _batch(target: str, messages: list[str], options: dict, new_tokens: int) -> Run:
    async with AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        await client.model_info()  # connected before the clock starts
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                client.generate(
                    messages=[{"role": "user", "content": message}],
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    seed=i if options else None,
                    **options,
                )
                for i, message in enumerate(messages)
            )
        )
    run = Run(time.perf_counter() - start, [r.token_ids for r in results])
    if run.tokens != len(messages) * new_tokens:
        raise RuntimeError(f"generated {run.tokens} tokens, expected {len(messages) * new_tokens}")
    return run


def server_part(s: SamplingSettings, model_dir: str, tokenizer) -> dict[int, dict[str, dict]]:
    results = {}
    for n in s.concurrency:
        messages = chat_messages(n)
        longest = max(len(tokenizer(render(tokenizer, m), add_special_tokens=False)["input_ids"]) for m in messages)
        config = cpu_config(model_dir, max_batch_size=n, max_seq_len=longest + s.new_tokens + 16)
        log(f"N={n}: starting the server")
        with ServerProcess(config) as server:
            systems = {
                name: (lambda o=options, m=messages: asyncio.run(_batch(server.target, m, o, s.new_tokens)))
                for name, options in SETTINGS.items()
            }
            measured = timed_rounds(systems, s.repeats).measurements
        greedy = measured["greedy"].best()
        results[n] = {
            name: {"best_tokens_per_s": m.best(), "tokens_per_s": m.values(), **ratio(m.best(), greedy)}
            for name, m in measured.items()
        }
    return results


# ---- part 2: the sampler alone ----------------------------------------------------------------------
def real_logits(model_dir: str, tokenizer, rows: int) -> torch.Tensor:
    """Next-token logits [rows, V] of the embedded model at every position of the chat prompts."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    collected, messages = [], chat_messages(64)
    with torch.inference_mode():
        for message in messages:
            ids = tokenizer(render(tokenizer, message), return_tensors="pt", add_special_tokens=False)["input_ids"]
            collected.append(model(input_ids=ids).logits[0].float())
            if sum(len(c) for c in collected) >= rows:
                break
    logits = torch.cat(collected)
    return logits.repeat((rows + len(logits) - 1) // len(logits), 1)[:rows]


def per_row_step(logits: torch.Tensor, params: SamplingParams, seen: list[list[int]], generators) -> list[int]:
    """The sampler this one replaced: every warped row alone in Python (penalty, temperature, top-k, a full sort
    for top-p, softmax, two host checks and a multinomial draw per row)."""
    processed = logits.clone()
    chosen = processed.argmax(dim=-1)
    for i in range(len(processed)):
        row = processed[i]
        if params.repetition_penalty != 1.0:
            ids = torch.tensor(seen[i]).unique()
            scores = row[ids]
            row[ids] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
        if params.greedy:
            continue
        row = row / params.temperature
        if params.top_k:
            row = row.masked_fill(row < torch.topk(row, params.top_k).values[-1], float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(row)
            drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - params.top_p
            drop[-1] = False
            row = row.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = row.softmax(-1)
        if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
            continue
        chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return chosen.tolist()


def sampler_part(s: SamplingSettings, model_dir: str, tokenizer) -> dict[int, dict[str, dict]]:
    logits_all = real_logits(model_dir, tokenizer, max(s.rows))
    prompt = list(range(100, 160))
    results: dict[int, dict[str, dict]] = {}
    for rows in s.rows:
        logits = logits_all[:rows].contiguous()
        results[rows] = {}
        for name, options in SETTINGS.items():
            params = SamplingParams(max_new_tokens=1 << 20, seed=1, **options)
            sampler = Sampler(logits.shape[1], torch.device("cpu"), ())
            states = [sampler.new_row(params, prompt) for _ in range(rows)]
            seen = [list(prompt) for _ in range(rows)]
            generators = [torch.Generator().manual_seed(i) for i in range(rows)]
            batched, per_row = [], []
            for _ in range(s.steps + 1):  # the first of each is a warm-up
                start = time.perf_counter()
                sampler.sample(logits, states)
                batched.append(time.perf_counter() - start)
                start = time.perf_counter()
                per_row_step(logits, params, seen, generators)
                per_row.append(time.perf_counter() - start)
            fast, slow = statistics.median(batched[1:]) * 1e3, statistics.median(per_row[1:]) * 1e3
            results[rows][name] = {"batched_ms": fast, "per_row_ms": slow, "speedup": slow / fast}
            log(f"B={rows} {name}: batched {fast:.2f} ms, per-row {slow:.2f} ms")
    return results


# ---- report -----------------------------------------------------------------------------------------
def tables(server: dict, alone: dict) -> list[str]:
    rows = [
        [f"N={n}", name, f"{r['best_tokens_per_s']:.1f}", f"{r['ratio']:.2f}x", f"{r['base_tokens_per_s']:.1f}"]
        for n, by_name in server.items()
        for name, r in by_name.items()
    ]
    first = format_table(["requests", "setting", "tok/s (best)", "vs greedy", "greedy tok/s"], rows, left=2)
    rows = [
        [f"B={b}", name, f"{r['batched_ms']:.2f}", f"{r['per_row_ms']:.2f}", f"{r['speedup']:.1f}x"]
        for b, by_name in alone.items()
        for name, r in by_name.items()
    ]
    second = format_table(["rows", "setting", "batched ms/step", "per-row ms/step", "speedup"], rows, left=2)
    return [first, second]


def draw(server: dict):
    def plot(ax) -> None:
        names, width = list(SETTINGS), 0.8 / len(server)
        for k, (n, by_name) in enumerate(server.items()):
            xs = [i + k * width for i in range(len(names))]
            bars = ax.bar(xs, [by_name[name]["best_tokens_per_s"] for name in names], width, label=f"N={n}")
            ax.bar_label(bars, labels=[f"{by_name[name]['ratio']:.2f}x" for name in names], fontsize=8)
        ax.set_xticks([i + width * (len(server) - 1) / 2 for i in range(len(names))], names)
        ax.set_ylabel("generated tokens / s (best round)")
        ax.legend()

    return plot


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(SamplingSettings, argv, description(__doc__))
    quiet()
    model_dir, model_name = embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    server = server_part(s, model_dir, tokenizer)
    alone = sampler_part(s, model_dir, tokenizer)
    data = {
        "model": model_name,
        "device": "cpu",
        "dtype": "float32",
        "new_tokens": s.new_tokens,
        "statistic": "server: best of repeats after a warm-up; sampler: median ms of the steps after a warm-up",
        "server": {str(n): r for n, r in server.items()},
        "sampler_alone": {str(b): r for b, r in alone.items()},
    }
    title = f"{model_name} fp32 CPU: sampled vs greedy, {s.new_tokens} tokens a request"
    report("sampling", s, data, [title, *tables(server, alone)], draw(server), size=(7, 4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
