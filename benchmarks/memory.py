"""Memory of a serving process as adapters are loaded: base weights, KV cache, adapter slots, host cache, RSS.

The real deltaserve gRPC server runs in-process on 127.0.0.1 (the embedded SmolLM2-135M-Instruct, fp32, CPU) with
`--max-adapters` device slots of rank `--rank` and the server's default batch size and context (16 x 2048); the
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

import argparse
import ctypes
from dataclasses import asdict, dataclass
from pathlib import Path

import transformers
from adapter_files import adapter_set
from common import RESULTS, import_test_helpers, log, machine_info, pyplot, save_figure, write_json
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.server.model.loader import EMBEDDED_NAME, embedded_model_dir

CALL_TIMEOUT_S = 600.0
UNLOADED = "unloaded"
TRIMMED = "trimmed"
PARTS = ("model", "kv_cache", "adapter_slots", "host_copies")
COLORS = {"model": "#8c8c8c", "kv_cache": "#4c72b0", "adapter_slots": "#c44e52", "host_copies": "#dd8452"}


@dataclass(frozen=True)
class Settings:
    counts: tuple[int, ...]
    rank: int
    out: Path


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 slots, 0 1 4 8 adapters")
    parser.add_argument("--counts", type=int, nargs="+", default=None, help="adapters loaded (default 0 1 8 32 64)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG goes next to it)")
    args = parser.parse_args(argv)
    counts = tuple(sorted(set(args.counts or ((0, 1, 4, 8) if args.quick else (0, 1, 8, 32, 64)))))
    if min(counts) < 0 or max(counts) < 1 or args.rank < 1:
        parser.error("--counts must be non-negative with one at least 1, --rank at least 1")
    out = args.out or RESULTS / ("memory-cpu-quick.json" if args.quick else "memory-cpu.json")
    return Settings(counts, args.rank, out)


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
    header = (
        f"{'adapters':>9} {'device':>6} {'host':>4} {'model MB':>8} {'KV MB':>7} {'slots MB':>8} "
        f"{'host copies MB':>14} {'sum MB':>7} {'RSS MB':>7} {'RSS-baseline MB':>15} {'other MB':>8} "
        f"{'peak RSS MB':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['step']:>9} {r['device_resident']:>6.0f} {r['host_resident']:>4.0f} {r['model'] / 1e6:>8.0f} "
            f"{r['kv_cache'] / 1e6:>7.0f} {r['adapter_slots'] / 1e6:>8.0f} {r['host_copies'] / 1e6:>14.0f} "
            f"{r['accounted'] / 1e6:>7.0f} {r['rss'] / 1e6:>7.0f} {r['rss_over_baseline'] / 1e6:>15.0f} "
            f"{r['other'] / 1e6:>8.0f} {r['peak_rss'] / 1e6:>11.0f}"
        )
    return "\n".join(lines)


def write_plot(rows: list[dict[str, object]], title: str, path: Path) -> bool:
    """Stacked bars of the accounted parts per step, with the measured RSS over the baseline as markers."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
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
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    helpers = import_test_helpers()
    model_dir = embedded_model_dir()
    slots = max(settings.counts)
    paths = adapter_set(helpers, model_dir, EMBEDDED_NAME, settings.rank, slots)
    config = ServerConfig.of(
        model=model_dir, dtype="float32", device="cpu", max_adapters=slots, max_lora_rank=settings.rank
    )
    baseline = proc_status()["VmRSS"]
    rows = []
    with helpers.ServerThread(config) as thread, Client(thread.target, timeout=CALL_TIMEOUT_S) as client:
        server = thread.server
        loaded = 0
        for count in settings.counts:
            for i in range(loaded, count):
                client.load_adapter(f"lora{i}", paths[i])
            loaded = count
            rows.append(snapshot(str(count), server, baseline))
        for i in range(loaded):
            client.unload_adapter(f"lora{i}")
        rows.append(snapshot(UNLOADED, server, baseline))
        if malloc_trim():
            rows.append(snapshot(TRIMMED, server, baseline))
        expected = expected_slot_bytes(server, slots, settings.rank)
        served = {"max_batch_size": config.max_batch_size, "max_seq_len": server.engine.config.max_seq_len}
    data = {
        "benchmark": "memory",
        "machine": machine_info(),
        "model": EMBEDDED_NAME,
        "device": "cpu",
        "dtype": "float32",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "server": {"max_adapters": slots, "max_lora_rank": settings.rank, **served},
        "baseline_rss_bytes": baseline,
        "expected_slot_bytes": expected,
        "statistic": "one reading per step; bytes",
        "steps": rows,
    }
    write_json(data, settings.out)
    title = (
        f"{EMBEDDED_NAME} fp32 CPU: {slots} slots x rank {settings.rank}, batch {served['max_batch_size']} x "
        f"{served['max_seq_len']} context"
    )
    plotted = write_plot(rows, title, settings.out.with_suffix(".png"))
    print(title)
    print(table(rows))
    print(
        f"baseline RSS before the server {baseline / 1e6:.0f} MB; expected slot stacks {expected / 1e6:.0f} MB "
        f"({slots} slots x rank {settings.rank}, fp32)"
    )
    print(f"wrote {settings.out}" + (f" and {settings.out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
