"""Memory of a serving process as adapters are loaded: base weights, KV cache, adapter slots, host cache, RSS.

The real deltaserve gRPC server runs in-process on 127.0.0.1 (the embedded SmolLM2-135M-Instruct, fp32, CPU) with
`--max-adapters` device slots of rank `--rank` and the server's default KV cache (1 GiB of blocks on the CPU); the
benchmark loads rank-16 all-linear LoRA adapters (adapter_files.py: real PEFT-format files) with LoadAdapter until
0, 1, 8, 32 and 64 are loaded, then unloads them all. At each step it records
  - the server's memory gauges, read from its Prometheus registry as a scrape would: base model bytes
    (deltaserve_model_memory_bytes), KV cache bytes (deltaserve_kv_cache_bytes), device adapter-slot bytes
    (deltaserve_adapter_memory_bytes) and adapters resident per tier (deltaserve_adapters_resident);
  - host-copy bytes: the parsed host copies the registry keeps (the sum of their sizes; it keeps one for every
    loaded adapter, those on the device included, so that an evicted adapter needs no disk read);
  - the process's resident set (VmRSS in /proc/self/status) and its peak (VmHWM), and VmRSS minus the value
    before the server was created (the benchmark's own imports and tokenizer are in the baseline); "other" is
    what that leaves beyond the parts above.
After the unload, one more reading follows glibc's malloc_trim(0) ("trimmed"): memory the allocator kept after
the frees is returned then, which tells allocator retention from a leak.
On the CPU "device" memory is host memory, so the RSS should hold the base, the KV cache, the slot stacks and the
host copies. The slot stacks are preallocated for every slot at the first load (max_adapters x max_rank rows in
every targeted layer): expected max_adapters * rank * sum(in + out) * 4 bytes from then on, however many are loaded.

Run:  python benchmarks/memory.py          (64 slots; 0 1 8 32 64 adapters; about 2 minutes)
      python benchmarks/memory.py --quick  (8 slots; 0 1 4 8 adapters)
Writes benchmarks/results/memory-cpu.json (…-quick.json for --quick) and a PNG next to it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from adapter_files import adapter_set
from deltaserve.client import Client
from deltaserve.testing.helpers import ServerThread
from harness import (
    CALL_TIMEOUT_S,
    Settings,
    cpu_config,
    description,
    embedded_model,
    format_table,
    log,
    option,
    parse_settings,
    quiet,
    report,
    require,
    served,
)

UNLOADED = "unloaded"
TRIMMED = "trimmed"
PARTS = ("model", "kv_cache", "adapter_slots", "host_copies")
COLORS = {"model": "#8c8c8c", "kv_cache": "#4c72b0", "adapter_slots": "#c44e52", "host_copies": "#dd8452"}


@dataclass(frozen=True)
class MemorySettings(Settings):
    STEM = "memory-cpu"

    counts: tuple[int, ...] = option((0, 1, 8, 32, 64), "adapters loaded at each step", quick=(0, 1, 4, 8), minimum=0)
    rank: int = option(16, "LoRA rank", minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "counts", tuple(sorted(set(self.counts))))
        require(max(self.counts) >= 1, "--counts needs one count of at least 1")


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (Linux /proc)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return values


def snapshot(label: str, server: object, baseline_rss: int) -> dict[str, object]:
    registry = server.metrics.registry
    records = server.registry.list()
    status = proc_status()
    row = {
        "step": label,
        "loaded": len(records),
        "device_resident": registry.get_sample_value("deltaserve_adapters_resident", {"tier": "device"}),
        "host_resident": registry.get_sample_value("deltaserve_adapters_resident", {"tier": "host"}),
        "model": registry.get_sample_value("deltaserve_model_memory_bytes"),
        "kv_cache": registry.get_sample_value("deltaserve_kv_cache_bytes"),
        "adapter_slots": registry.get_sample_value("deltaserve_adapter_memory_bytes"),
        "host_copies": sum(r.adapter.size_bytes for r in records if r.adapter is not None),
        "rss": status["VmRSS"],
        "peak_rss": status["VmHWM"],
        "rss_over_baseline": status["VmRSS"] - baseline_rss,
    }
    row["accounted"] = sum(row[part] for part in PARTS)
    row["other"] = row["rss_over_baseline"] - row["accounted"]
    log(f"{label}: RSS {row['rss'] / 1e6:.0f} MB, slots {row['adapter_slots'] / 1e6:.0f} MB")
    return row


def malloc_trim() -> bool:
    """Ask glibc to return freed heap memory to the system; False where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def expected_slot_bytes(server: object, slots: int, rank: int) -> int:
    """What the LoRA slot stacks of every layer an all-linear adapter targets hold, in fp32."""
    layers = [layer for name, layer in server.runner.adapter_layers.items() if name != "lm_head"]
    return 4 * slots * rank * sum(layer.in_features + layer.out_features for layer in layers)


def table(rows: list[dict[str, object]]) -> str:
    header = ["adapters", "device", "host", "model MB", "KV MB", "slots MB", "host copies MB", "sum MB", "RSS MB"]
    header += ["RSS-baseline MB", "other MB", "peak RSS MB"]
    mb = ("model", "kv_cache", "adapter_slots", "host_copies", "accounted", "rss", "rss_over_baseline", "other")
    return format_table(
        header,
        [
            [r["step"], f"{r['device_resident']:.0f}", f"{r['host_resident']:.0f}"]
            + [f"{r[k] / 1e6:.0f}" for k in (*mb, "peak_rss")]
            for r in rows
        ],
    )


def draw(rows: list[dict[str, object]], title: str) -> object:
    """Stacked bars of the accounted parts per step, with the measured RSS over the baseline as markers."""

    def plot(ax: object) -> None:
        labels = [str(r["step"]) for r in rows]
        bottom = [0.0] * len(rows)
        for part in PARTS:
            values = [r[part] / 1e6 for r in rows]
            ax.bar(labels, values, bottom=bottom, color=COLORS[part], label=part.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.plot(labels, [r["rss_over_baseline"] / 1e6 for r in rows], "kD", label="RSS - baseline (measured)")
        ax.set_xlabel("rank-16 adapters loaded")
        ax.set_ylabel("MB")
        ax.set_ylim(0, max(max(bottom), *(r["rss_over_baseline"] / 1e6 for r in rows)) * 1.3)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=3)

    return plot


def measure(thread: ServerThread, paths: list[str], counts: tuple[int, ...], baseline: int) -> list[dict]:
    """Load adapters up to each count, unload them all, then trim the heap; one snapshot after each step."""
    rows = []
    with Client(thread.target, timeout=CALL_TIMEOUT_S) as client:
        loaded = 0
        for count in counts:
            for i in range(loaded, count):
                client.load_adapter(f"lora{i}", paths[i])
            loaded = count
            rows.append(snapshot(str(count), thread.server, baseline))
        for i in range(loaded):
            client.unload_adapter(f"lora{i}")
    rows.append(snapshot(UNLOADED, thread.server, baseline))
    if malloc_trim():
        rows.append(snapshot(TRIMMED, thread.server, baseline))
    return rows


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(MemorySettings, argv, description(__doc__))
    quiet()
    model_dir, model_name = embedded_model()
    slots = max(s.counts)
    paths = adapter_set(model_dir, model_name, s.rank, slots)
    config = cpu_config(model_dir, max_adapters=slots, max_lora_rank=s.rank)
    baseline = proc_status()["VmRSS"]
    with ServerThread(config) as thread:
        rows = measure(thread, paths, s.counts, baseline)
        expected = expected_slot_bytes(thread.server, slots, s.rank)
        engine = thread.server.engine.config
        served_limits = {
            **served(config, "max_batch_size", "kv_cache_memory", "block_size"),
            "max_seq_len": engine.max_seq_len,
            "kv_blocks": engine.num_blocks,
        }
    data = {
        "model": model_name,
        "device": "cpu",
        "dtype": "float32",
        "server": {"max_adapters": slots, "max_lora_rank": s.rank, **served_limits},
        "baseline_rss_bytes": baseline,
        "expected_slot_bytes": expected,
        "statistic": "one reading per step; bytes",
        "steps": rows,
    }
    title = (
        f"{model_name} fp32 CPU: {slots} slots x rank {s.rank}, KV cache {served_limits['kv_blocks']} blocks of "
        f"{served_limits['block_size']} tokens"
    )
    note = (
        f"baseline RSS before the server {baseline / 1e6:.0f} MB; expected slot stacks {expected / 1e6:.0f} MB "
        f"({slots} slots x rank {s.rank}, fp32)"
    )
    report("memory", s, data, [title, table(rows), note], draw(rows, title), size=(7.5, 4.4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
