"""The adapter registry: ids -> parsed adapters in device slots, with per-adapter reference counts.

Loading parses and validates off the engine thread, then copies the weights into a free device slot; only
then does the id become visible, so an adapter is either fully usable or absent. Unloading hides the id
at once; the slot is freed when the last in-flight request using it finishes. A free slot is never read
by a forward (only slots of admitted requests are), so writing it while the engine runs is safe.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

import torch
from deltaserve.adapters import (
    AdapterMismatchError,
    BaseModelSpec,
    LoraAdapter,
    ParsedAdapter,
    load_adapter,
)
from deltaserve.server.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    CapacityError,
    InvalidRequestError,
)
from deltaserve.server.layers import AdapterLinear


class AdapterState(enum.Enum):
    LOADING = "loading"
    DEVICE = "device"
    UNLOADING = "unloading"


@dataclass
class AdapterRecord:
    adapter_id: str
    path: str
    adapter: ParsedAdapter | None
    slot: int
    state: AdapterState
    active_requests: int = 0
    requests_served: int = 0
    loaded_at: float = field(default_factory=time.time)

    @property
    def kind(self) -> str:
        return self.adapter.kind.value if self.adapter is not None else ""


class LoraSlots:
    """The device slots: S preallocated LoRA positions in every adapter-aware layer."""

    def __init__(
        self,
        layers: dict[str, AdapterLinear],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers = layers
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.ranks = [0] * num_slots  # host copy of each slot's rank, for building batch descriptions
        self._lock = threading.Lock()  # concurrent loads must not both allocate one layer's stacks

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        with self._lock:
            self._write(slot, adapter)

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        for name in adapter.modules:
            self.layers[name].allocate(self.num_slots, self.max_rank, self.dtype, self.device)
        for name, layer in self.layers.items():
            weights = adapter.modules.get(name)
            if weights is None:
                layer.write_slot(slot, None, None)
            else:
                layer.write_slot(
                    slot,
                    weights.lora_a.to(self.device, self.dtype),
                    weights.lora_b_scaled.to(self.device, self.dtype),
                )
        self.ranks[slot] = adapter.rank

    def clear(self, slot: int) -> None:
        with self._lock:
            for layer in self.layers.values():
                layer.write_slot(slot, None, None)
            self.ranks[slot] = 0

    @property
    def bytes_allocated(self) -> int:
        """Device bytes of the slot stacks allocated so far (they grow once per newly targeted layer)."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers.values()
            for t in (layer.lora_a, layer.lora_b)
            if t is not None
        )


class AdapterRegistry:
    def __init__(self, spec: BaseModelSpec, slots: LoraSlots) -> None:
        self._spec = spec
        self._slots = slots
        self._lock = threading.Lock()
        self._by_id: dict[str, AdapterRecord] = {}  # visible (loading or loaded) adapters
        self._draining: list[AdapterRecord] = []  # unloaded, still used by in-flight requests
        self._free_slots = list(range(slots.num_slots))

    # ---- lifecycle ---------------------------------------------------------------------------------
    def load(self, adapter_id: str, path: str) -> AdapterRecord:
        """Parse, validate and place an adapter. Blocking (disk and copies): call it off the event loop.

        The id is reserved first (ALREADY_EXISTS at once), the files are validated next (so a broken adapter
        is reported as such even when the slots are full), and only then is a slot taken.
        """
        if not adapter_id:
            raise InvalidRequestError("adapter_id must not be empty")
        if not path:
            raise InvalidRequestError("path must name an adapter directory")
        with self._lock:
            if adapter_id in self._by_id:
                raise AdapterExistsError(f"adapter {adapter_id!r} is already loaded; unload it first")
            record = AdapterRecord(adapter_id, path, None, -1, AdapterState.LOADING)
            self._by_id[adapter_id] = record
        try:
            adapter = load_adapter(path, self._spec)
            if adapter.rank > self._slots.max_rank:
                raise AdapterMismatchError(
                    f"adapter rank {adapter.rank} exceeds the server's --max-lora-rank {self._slots.max_rank}"
                )
            record.slot = self._take_slot()
            self._slots.write(record.slot, adapter)
        except BaseException:
            with self._lock:
                del self._by_id[adapter_id]
                if record.slot >= 0:
                    self._free_slots.append(record.slot)
            raise
        with self._lock:
            record.adapter = adapter
            record.state = AdapterState.DEVICE
        return record

    def _take_slot(self) -> int:
        with self._lock:
            if not self._free_slots:
                raise CapacityError(
                    f"all {self._slots.num_slots} adapter slots are in use; unload an adapter or start the "
                    "server with a larger --max-adapters"
                )
            return self._free_slots.pop(0)

    def unload(self, adapter_id: str) -> int:
        """Hide the adapter; returns how many in-flight requests still finish with it."""
        with self._lock:
            record = self._by_id.get(adapter_id)
            if record is None or record.state is AdapterState.LOADING:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
            del self._by_id[adapter_id]
            record.state = AdapterState.UNLOADING
            if record.active_requests == 0:
                self._free(record)
            else:
                self._draining.append(record)
            return record.active_requests

    # ---- per request -------------------------------------------------------------------------------
    def acquire(self, adapter_id: str) -> AdapterRecord:
        """Reference a loaded adapter for one request (NOT_FOUND if it is not loaded)."""
        with self._lock:
            record = self._by_id.get(adapter_id)
            if record is None or record.state is not AdapterState.DEVICE:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
            record.active_requests += 1
            return record

    def release(self, record: AdapterRecord, served: bool) -> None:
        with self._lock:
            record.active_requests -= 1
            record.requests_served += int(served)
            if record.state is AdapterState.UNLOADING and record.active_requests == 0:
                self._draining.remove(record)
                self._free(record)

    def _free(self, record: AdapterRecord) -> None:
        self._slots.clear(record.slot)
        self._free_slots.append(record.slot)

    # ---- views -------------------------------------------------------------------------------------
    def list(self) -> list[AdapterRecord]:
        with self._lock:
            return sorted([*self._by_id.values(), *self._draining], key=lambda r: r.adapter_id)

    def resident(self, tier: str) -> int:
        """Adapters held per tier: "device" counts occupied slots (loaded or draining); "host" counts adapters
        held only in host memory, which this release does not do (every loaded adapter has a slot)."""
        if tier != "device":
            return 0
        with self._lock:
            return len(self._by_id) + len(self._draining)

    @property
    def slot_ranks(self) -> list[int]:
        return self._slots.ranks

    @property
    def num_slots(self) -> int:
        return self._slots.num_slots

    @property
    def max_rank(self) -> int:
        return self._slots.max_rank
