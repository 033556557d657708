"""Cold start from an --adapter-source: time to first token for a never-seen adapter against a warm one.

On the embedded SmolLM2-135M-Instruct in fp32 on the CPU, with the real deltaserve gRPC server in-process on
127.0.0.1 started with two sources and nothing loaded:
  - "dir":    a local directory of adapter folders (read in place: no download);
  - "fsspec": an fsspec `memory://` store in the same process (downloaded into the adapter cache, the path
              an s3:// source takes, without a network).
Each adapter is a rank-16 all-linear LoRA (PEFT's own save for the first; the others reuse its keys and
config with fresh random values, so every one is new to the server and has its own content hash).

For each of `--repeats` never-seen names per source, one short request (a chat prompt, max_new_tokens=1:
its latency is the time to first token as the client sees it) is timed cold (it causes the resolution),
then the same request again warm (the adapter already on the device). The cold one is split by timing the
server's own steps where they run: download (source.fetch), content digest, load to host (parse and
validate), device placement (copy into a slot). Cold and warm requests alternate, so noise hits both.

Run:  python benchmarks/cold_start.py           (8 names per source)
      python benchmarks/cold_start.py --quick   (2 names per source)
Writes benchmarks/results/cold-start-cpu.json (…-quick.json for --quick).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from deltaserve.client import Client
from deltaserve.testing.helpers import ServerThread
from harness import (
    CALL_TIMEOUT_S,
    CHAT_PROMPTS,
    Settings,
    cpu_config,
    description,
    embedded_model,
    format_table,
    log,
    make_adapter,
    ms_summary,
    option,
    parse_settings,
    quiet,
    report,
)
from safetensors.torch import load_file, save_file

RANK = 16
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class ColdSettings(Settings):
    STEM = "cold-start-cpu"

    repeats: int = option(8, "never-seen adapters timed per source", quick=2, minimum=1)


def make_library(model_dir: str, root: str, count: int) -> list[str]:
    """`count` rank-16 all-linear LoRA folders under root/lib: one from PEFT, the rest with fresh values
    (the second half is moved to root/upload, the memory store's, so the directory source lacks them)."""
    first = make_adapter(model_dir, os.path.join(root, "peft"), "seed", RANK, seed=1)
    tensors = load_file(os.path.join(first, FILES[1]))
    names = []
    for i in range(count):
        generator = torch.Generator().manual_seed(1000 + i)
        folder = os.path.join(root, "lib", f"cold-{i:03d}")
        os.makedirs(folder)
        shutil.copyfile(os.path.join(first, FILES[0]), os.path.join(folder, FILES[0]))
        values = {k: torch.randn(v.shape, generator=generator) * float(v.std()) for k, v in tensors.items()}
        save_file(values, os.path.join(folder, FILES[1]))
        names.append(f"cold-{i:03d}")
    for name in names[count // 2 :]:
        shutil.move(os.path.join(root, "lib", name), os.path.join(root, "upload", name))
    return names


def upload_to_memory(root: str, names: list[str]) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    for name in names:
        for file in FILES:
            with (
                open(os.path.join(root, "upload", name, file), "rb") as src,
                memory.open(f"/bench/{name}/{file}", "wb") as dst,
            ):
                dst.write(src.read())


class StepClock:
    """Wraps the server's own steps with timers, by the adapter directory they ran for."""

    def __init__(self, server: Any) -> None:
        self.seconds: dict[str, dict[str, float]] = defaultdict(dict)
        registry = server.registry

        def timed(step: str, call: Any, key: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return call(*args, **kwargs)
                finally:
                    self.seconds[key(*args)][step] = time.perf_counter() - start

            return wrapper

        registry._digest = timed("digest", registry._digest, lambda path: os.path.basename(path))
        registry._parse = timed("load to host", registry._parse, lambda path: os.path.basename(path))
        registry._fill_slot = timed(
            "device placement", registry._fill_slot, lambda record, slot: os.path.basename(record.path)
        )
        for source in server.sources:
            source.fetch = timed("download", source.fetch, lambda version, into: os.path.basename(version.location))


def timed_request(client: Client, adapter_id: str, prompt: str) -> float:
    start = time.perf_counter()
    client.generate(messages=[{"role": "user", "content": prompt}], adapter_id=adapter_id, max_new_tokens=1)
    return time.perf_counter() - start


def main() -> None:
    settings = parse_settings(ColdSettings, description=description(__doc__))
    quiet()
    model_dir, model_name = embedded_model()
    root = tempfile.mkdtemp(prefix="deltaserve-cold-")
    names = make_library(model_dir, root, 2 * settings.repeats)
    dir_names, memory_names = names[: settings.repeats], names[settings.repeats :]
    upload_to_memory(root, memory_names)
    config = cpu_config(
        model_dir,
        max_batch_size=4,
        max_seq_len=512,
        max_adapters=2 * settings.repeats + 2,
        max_lora_rank=RANK,
        adapter_source=[os.path.join(root, "lib"), "memory://bench"],
        adapter_cache_dir=os.path.join(root, "cache"),
    )
    rows, data = [], {"model": model_name, "rank": RANK, "sources": {}}
    with ServerThread(config) as running, Client(running.target, timeout=CALL_TIMEOUT_S) as client:
        clock = StepClock(running.server)
        for prompt in CHAT_PROMPTS[:2]:  # warm the engine (and the slot stacks) on the base and one adapter
            client.generate(messages=[{"role": "user", "content": prompt}], max_new_tokens=1)
        shutil.copytree(os.path.join(root, "lib", dir_names[0]), os.path.join(root, "lib", "warmup"))
        timed_request(client, "warmup", CHAT_PROMPTS[0])
        for source, group in (("dir", dir_names), ("fsspec", memory_names)):
            cold, warm, steps = [], [], defaultdict(list)
            for i, name in enumerate(group):
                prompt = CHAT_PROMPTS[i % len(CHAT_PROMPTS)]
                cold.append(timed_request(client, name, prompt))
                warm.append(timed_request(client, name, prompt))
                # The download is keyed by the name, the rest by the folder loaded (the cache entry's for fsspec).
                loaded = os.path.basename(running.server.resolver._tracked[name].path)
                for key in dict.fromkeys((name, loaded)):
                    for step, seconds in clock.seconds.get(key, {}).items():
                        steps[step].append(seconds)
            extra = [c - w for c, w in zip(cold, warm, strict=True)]
            entry = {
                "cold_ttft_ms": ms_summary(cold),
                "warm_ttft_ms": ms_summary(warm),
                "cold_minus_warm_ms": ms_summary(extra),
                "steps_ms": {step: ms_summary(values) for step, values in steps.items()},
            }
            data["sources"][source] = entry
            split = {
                step: entry["steps_ms"].get(step, {}).get("p50", 0.0)
                for step in ("download", "digest", "load to host", "device placement")
            }
            rows.append(
                (
                    source,
                    f"{entry['warm_ttft_ms']['p50']:.1f}",
                    f"{entry['cold_ttft_ms']['p50']:.1f}",
                    f"{entry['cold_minus_warm_ms']['p50']:.1f}",
                    *(f"{v:.1f}" for v in split.values()),
                )
            )
            log(f"{source}: cold {entry['cold_ttft_ms']['p50']:.1f} ms, warm {entry['warm_ttft_ms']['p50']:.1f} ms")
    header = ("source", "warm TTFT", "cold TTFT", "cold - warm", "download", "digest", "load to host", "placement")
    table = format_table(header, rows)
    note = f"p50 over {settings.repeats} never-seen rank-{RANK} all-linear adapters per source, milliseconds"
    report("cold_start", settings, data, [note, table])
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
