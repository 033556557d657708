"""Structured output: throughput of a batch in which half the requests are under a JSON schema, against the
same batch all free, measured side by side; and grammar compile time, cold and cached.

Every request of a round is sent at once (16 by default) over gRPC, spread over the base and two LoRA adapters,
and generates exactly --new-tokens tokens: free rows ignore end-of-sequence, constrained rows are under a schema
(an array of --new-tokens digits) that cannot complete sooner. The ratio is the mixed batch's tokens/s over the
free batch's. Compile times are measured in this process on xgrammar's compiler over the embedded tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import (
    Run,
    ServerProcess,
    Settings,
    cpu_config,
    embedded_model,
    format_table,
    log,
    make_adapter,
    option,
    parse_settings,
    quiet,
    ratio,
    timed_rounds,
    write_result,
)


@dataclass(frozen=True)
class StructuredSettings(Settings):
    STEM = "structured"
    requests: int = option(16, "concurrent requests per round (half constrained)", quick=4, minimum=2)
    new_tokens: int = option(48, "tokens every request generates", quick=8, minimum=4)
    rounds: int = option(3, "timed rounds per system", quick=1, minimum=1)


def digits_schema(tokens: int) -> dict:
    """An array of single digits long enough that no row completes before `tokens` tokens."""
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": tokens}


COMPILE_SCHEMAS = {
    "person (2 fields)": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested 20 levels": None,  # filled below
    "enum of 1000": {"enum": [f"member-{i}" for i in range(1000)]},
}


def _nested(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


COMPILE_SCHEMAS["nested 20 levels"] = _nested(20)


def compile_times(model_dir: str) -> dict[str, dict[str, float]]:
    """Seconds to build the tokenizer's compiler, and per schema its cold compile and a cached lookup."""
    from deltaserve.server.engine.grammar import GrammarKind, GrammarService, GrammarSpec
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = json.loads(Path(model_dir, "config.json").read_text())["vocab_size"]
    service = GrammarService(tokenizer, vocab, (tokenizer.eos_token_id,))

    async def measure() -> dict[str, dict[str, float]]:
        start = time.perf_counter()
        await service.compiled(GrammarSpec(GrammarKind.REGEX, "a", param="warm"))
        out = {"tokenizer info + compiler": {"cold_s": time.perf_counter() - start}}
        for name, schema in COMPILE_SCHEMAS.items():
            spec = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(schema), param=name)
            start = time.perf_counter()
            await service.compiled(spec)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            await service.matcher(spec)
            out[name] = {"cold_s": cold, "cached_s": time.perf_counter() - start}
        return out

    try:
        return asyncio.run(measure())
    finally:
        service.close()


def main() -> None:
    settings = parse_settings(StructuredSettings, description=__doc__)
    quiet()
    from concurrent.futures import ThreadPoolExecutor

    from deltaserve.client import Client

    model_dir, model_name = embedded_model()
    times = compile_times(model_dir)
    root = tempfile.mkdtemp(prefix="structured-bench-")
    adapters = [make_adapter(model_dir, root, f"lora{i}", 8, seed=i) for i in range(2)]
    config = cpu_config(model_dir, max_batch_size=max(settings.requests, 16), max_seq_len=256, max_adapters=3)
    schema = digits_schema(settings.new_tokens)
    names = ["", "lora0", "lora1"]
    with ServerProcess(config) as server, Client(server.target, timeout=600) as client:
        for name, path in zip(names[1:], adapters, strict=True):
            client.load_adapter(name, path)
        pool = ThreadPoolExecutor(settings.requests)

        def one(i: int, constrained: bool) -> list[int]:
            options = {"json_schema": schema} if constrained else {"ignore_eos": True}
            result = client.generate(
                "List some digits:",
                adapter_id=names[i % len(names)],
                max_new_tokens=settings.new_tokens,
                temperature=0.0,
                **options,
            )
            return list(result.token_ids)

        def batch(half_constrained: bool) -> Run:
            start = time.perf_counter()
            jobs = [pool.submit(one, i, half_constrained and i % 2 == 0) for i in range(settings.requests)]
            outputs = [job.result() for job in jobs]
            return Run(time.perf_counter() - start, outputs)

        rounds = timed_rounds({"free": lambda: batch(False), "half constrained": lambda: batch(True)}, settings.rounds)
        pool.shutdown()
    free, mixed = rounds.measurements["free"], rounds.measurements["half constrained"]
    result = ratio(mixed.best(), free.best())
    rows = [
        ["free (all rows)", f"{free.best():.1f}", "1.00"],
        ["half under a JSON schema", f"{mixed.best():.1f}", f"{result['ratio']:.2f}"],
    ]
    print(format_table(["batch", "best tok/s", "x free"], rows))
    compile_rows = [
        [name, f"{entry['cold_s'] * 1000:.1f}", f"{entry['cached_s'] * 1000:.3f}" if "cached_s" in entry else "-"]
        for name, entry in times.items()
    ]
    print(format_table(["grammar", "cold ms", "cached ms"], compile_rows))
    tokens = {len(row) for run in mixed.runs for row in run.outputs}
    path = write_result(
        "structured",
        settings,
        {
            "model": model_name,
            "throughput": result,
            "free_tokens_per_s": free.values(),
            "mixed_tokens_per_s": mixed.values(),
            "tokens_per_request": sorted(tokens),
            "compile": times,
            "load_average": rounds.loads,
        },
    )
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
