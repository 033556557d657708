"""Many distinct LoRA adapters in PEFT's format, cheaply: one saved by PEFT, the rest cloned from its files.

PEFT's `save_pretrained` loads a base model per adapter, so 64 adapters take minutes. Here the first adapter of a
set is made by PEFT itself (deltaserve.testing.helpers.make_lora, through harness.make_adapter); every other one
copies its `adapter_config.json` and writes an `adapter_model.safetensors` with the same keys, shapes, dtypes and
metadata, filled with fresh random weights drawn as PEFT's `init_lora_weights=False` leaves them (nn.Linear's default
init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = a matrix's second dimension). The server reads both alike;
the benchmarks load every one of them with LoadAdapter, which validates it.

Sets for the embedded model are cached under benchmarks/.cache/adapters/ (gitignored), one folder per rank, and
grow on demand; each adapter directory appears complete or not at all (written aside, then renamed).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from deltaserve.adapters import ParsedAdapter
from harness import REPO, log, make_adapter
from safetensors import safe_open
from safetensors.torch import save_file

CACHE = REPO / "benchmarks" / ".cache" / "adapters"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def clone_adapter(source: str, out_dir: str, seed: int) -> str:
    """A new adapter in `source`'s exact file format with fresh random weights (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(os.path.join(source, WEIGHTS_FILE), framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            like = f.get_tensor(key)
            bound = 1 / math.sqrt(like.shape[-1]) if like.dim() > 1 else 1.0
            fresh = torch.rand(like.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
            tensors[key] = fresh.to(like.dtype)
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(os.path.join(source, CONFIG_FILE), os.path.join(out_dir, CONFIG_FILE))
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata=metadata)
    return out_dir


def _publish(make: Callable[[str], object], target: Path) -> None:
    """Run make(staging_dir) and rename the result to `target`, so a half-written adapter is never seen."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        make(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def adapter_set(model_dir: str, model_name: str, rank: int, count: int) -> list[str]:
    """`count` distinct rank-`rank` all-linear LoRA adapters on the model in `model_dir`: lora0 saved by PEFT
    (seed 0), lora1.. cloned from it (seed i); cached, so later runs reuse them."""
    root = CACHE / f"{model_name}-r{rank}"
    paths = [root / f"lora{i}" for i in range(count)]
    missing = [p for p in paths if not (p / WEIGHTS_FILE).exists()]
    if missing:
        log(f"making {len(missing)} rank-{rank} adapters in {root} (cached for later runs)")
    if not (paths[0] / WEIGHTS_FILE).exists():
        _publish(lambda d: make_adapter(model_dir, str(root), os.path.basename(d), rank, seed=0), paths[0])
    for i, path in enumerate(paths[1:], start=1):
        if not (path / WEIGHTS_FILE).exists():
            _publish(lambda d, i=i: clone_adapter(str(paths[0]), d, seed=i), path)
    return [str(p) for p in paths]


def lora_bytes(adapter: ParsedAdapter, dtype: torch.dtype) -> int:
    """Bytes of an adapter's A and B matrices at its own rank in `dtype`: what a decode step reads for it."""
    size = torch.empty((), dtype=dtype).element_size()
    return size * sum(
        t.numel() for delta in adapter.modules.values() for t in (delta.lora_a, delta.lora_b_scaled) if t is not None
    )
