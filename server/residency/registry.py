"""The adapter registry: ids -> adapters across three tiers (disk, host cache, device slots).

- LoadAdapter parses and validates on a worker thread; only then does the id become visible, so an adapter
  is either fully usable or absent. A validated adapter is placed in a device slot at once when one is free
  (or an idle, unpinned adapter can be evicted), else it waits in the host cache.
- A request references its adapter (`acquire`) from submit to finish. An adapter with references is never
  evicted. A referenced adapter that is not on the device is brought in by the residency thread (parse from
  disk if the host copy was dropped, wait for an evictable slot, copy): the engine thread never does disk
  I/O, it only admits requests whose adapter already has a slot.
- Least-recently-used idle adapters leave the device first (to the host cache, bounded by `max_host`;
  beyond it the host copy is dropped and the adapter stays registered on disk). Pinned adapters never leave.
- Unloading (or replacing) hides the id at once; in-flight requests finish with the old weights and the
  slot is freed when the last one leaves.
- Identity by content: every load computes the adapter's content digest (deltaserve.adapters.digest). A
  name whose digest equals a servable adapter's becomes an alias of that record: one slot, one host copy,
  one prefix-cache root (the engine keys K/V by `cache_identity`). Unloading a name drops only that name;
  the record retires with its last name. A host copy read back from disk must still have its digest, so a
  file changed under a loaded path is refused (reload it) rather than silently mixed with the old one.
A free slot is never read by a forward (only slots of admitted requests are), so writing it while the engine
runs is safe.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from deltaserve.adapters import (
    AdapterMismatchError,
    BaseModelSpec,
    ModuleDelta,
    ParsedAdapter,
    load_adapter,
    tensor_bytes,
)
from deltaserve.adapters.digest import content_digest
from deltaserve.server.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterUnreadableError,
    CapacityError,
    InvalidRequestError,
    MergeError,
)
from deltaserve.server.kernels.threads import one_thread_here
from deltaserve.server.model.layers import AdapterLinear, BottleneckBank
from deltaserve.server.model.runner import NO_SOFT_PROMPT, SoftPrompt

log = logging.getLogger(__name__)


class AdapterState(enum.Enum):
    LOADING = "loading"  # LoadAdapter is validating it; not visible to requests yet
    DISK = "disk"  # registered; weights are read from disk again when needed
    HOST = "host"  # parsed weights in the host cache
    DEVICE = "device"  # in a device slot
    UNLOADING = "unloading"  # unloaded or replaced, still finishing its in-flight requests


_GENERATIONS = itertools.count(1)


@dataclass(eq=False)
class AdapterRecord:
    adapter_id: str
    path: str
    adapter: ParsedAdapter | None  # host copy; None while loading or when only on disk
    state: AdapterState
    slot: int = -1
    pinned: bool = False
    active_requests: int = 0
    requests_served: int = 0
    last_used: float = field(default_factory=time.time)
    kind: str = ""
    rank: int = 0
    size_bytes: int = 0
    target_modules: list[str] = field(default_factory=list)
    extra_positions: int = 0  # prefix entries + virtual tokens the adapter puts before every prompt
    mergeable: bool = False
    load_error: BaseException | None = None  # set when the residency thread could not bring it back
    merged: bool = False  # folded into the base weights (pinned meanwhile; cannot be unloaded or replaced)
    pinned_for_merge: bool = False  # the pin was taken by the merge, so unmerging lifts it
    components: tuple[str, ...] = ()  # for a weighted mix: the adapters it was built from
    content_hash: str = ""  # "sha256:..." of its weights and config (empty for mixes and stacks)
    version: str = ""  # the source's version it was resolved at (empty for LoadAdapter paths)
    source: str = ""  # the --adapter-source it came from (empty for LoadAdapter paths)
    # Unique per record, so per load, replace and mix: the prefix cache keys K/V by it, never by the id.
    generation: int = field(default_factory=_GENERATIONS.__next__)

    @property
    def cache_identity(self) -> str:
        """What the prefix cache keys this adapter's K/V by: its content, or (mixes, stacks) its record."""
        return self.content_hash or f"generation:{self.generation}"

    def describe(self, adapter: ParsedAdapter) -> None:
        self.kind = adapter.kind.value
        self.rank = adapter.rank
        self.extra_positions = adapter.extra_positions
        self.mergeable = adapter.mergeable
        self.size_bytes = adapter.size_bytes
        self.target_modules = adapter.target_modules


class DeviceSlots:
    """The device slots: S preallocated adapter positions in every adapter-aware layer and bottleneck bank,
    plus each slot's soft prompt (prefix entries, virtual tokens) as device tensors."""

    def __init__(
        self,
        layers: dict[str, AdapterLinear],
        banks: dict[tuple[int, str], BottleneckBank],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        max_bottleneck_size: int = 64,
    ) -> None:
        self.layers = layers
        self.banks = banks
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.max_bottleneck_size = max_bottleneck_size
        self.dtype = dtype
        self.device = device
        # Host copies per slot, for building batch descriptions without touching the device.
        self.ranks = [0] * num_slots
        self.vector_slots: set[int] = set()  # slots with scales or bias deltas (the forward needs a SlotBatch)
        self.bottleneck_slots: set[int] = set()  # slots with bottleneck modules
        self.prompts = [NO_SOFT_PROMPT] * num_slots
        self._lock = threading.Lock()  # concurrent loads must not both allocate one layer's stacks

    def _on_device(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(self.device, self.dtype)

    def write(self, slot: int, adapter: ParsedAdapter) -> None:
        """Copy an adapter into `slot`, resetting the slot to the identity wherever the adapter has no part."""
        with self._lock:
            for name, delta in adapter.modules.items():
                self.layers[name].allocate(delta, self.num_slots, self.max_rank, self.dtype, self.device)
            for key in adapter.bottlenecks:
                self.banks[key].allocate(self.num_slots, self.max_bottleneck_size, self.dtype, self.device)
            for name, layer in self.layers.items():
                delta = adapter.modules.get(name)
                if delta is not None:
                    delta = ModuleDelta(*(self._on_device(t) for t in dataclasses.astuple(delta)))
                layer.write_slot(slot, delta)
            for key, bank in self.banks.items():
                module = adapter.bottlenecks.get(key)
                if module is not None:
                    module = dataclasses.replace(
                        module,
                        **{f: self._on_device(getattr(module, f)) for f in ("down", "down_bias", "up", "up_bias")},
                    )
                bank.write_slot(slot, module)
            prefix = adapter.prefix
            self.prompts[slot] = SoftPrompt(
                self._on_device(prefix.keys) if prefix else None,
                self._on_device(prefix.values) if prefix else None,
                self._on_device(adapter.virtual_tokens),
            )
            self.ranks[slot] = adapter.rank
            for members, present in (
                (self.vector_slots, adapter.has_vectors),
                (self.bottleneck_slots, adapter.bottlenecks),
            ):
                members.add(slot) if present else members.discard(slot)

    @property
    def bytes_allocated(self) -> int:
        """Device bytes of the slot stacks allocated so far (they grow once per newly targeted layer)."""
        stacks = [
            t
            for layer in self.layers.values()
            for t in (layer.lora_a, layer.lora_b, layer.input_scale, layer.output_scale, layer.bias_delta)
        ]
        stacks += [t for bank in self.banks.values() for t in (bank.down, bank.down_bias, bank.up, bank.up_bias)]
        stacks += [
            t for prompt in self.prompts for t in (prompt.prefix_keys, prompt.prefix_values, prompt.virtual_tokens)
        ]
        return tensor_bytes(stacks)


AdapterLoader = Callable[[str, BaseModelSpec], ParsedAdapter]
AdapterDigest = Callable[[str], str]  # a directory's content digest (deltaserve.adapters.digest)


class AdapterRegistry:
    def __init__(
        self,
        spec: BaseModelSpec,
        slots: DeviceSlots,
        max_host: int = 32,
        loader: AdapterLoader = load_adapter,
        resolve_path: Callable[[str], str] = lambda path: path,
        digest: AdapterDigest = content_digest,
    ) -> None:
        self._spec = spec
        self._slots = slots
        self._max_host = max_host  # adapters kept parsed in host memory besides those on the device
        self._loader = loader
        self._resolve_path = resolve_path
        self._digest = digest
        self._hasher = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="deltaserve-digest")
        self._aliases: dict[str, AdapterRecord] = {}  # names served by another name's record (same content)
        self._cv = threading.Condition()
        self._by_id: dict[str, AdapterRecord] = {}  # visible adapters (and ids reserved while loading)
        self._draining: list[AdapterRecord] = []  # unloaded/replaced, still used by in-flight requests
        self._owners: list[AdapterRecord | None] = [None] * slots.num_slots
        self._want: list[AdapterRecord] = []  # referenced adapters that need a slot
        self.on_resident: Callable[[], None] = lambda: None  # the engine's wake-up
        self.on_evict: Callable[[], None] = lambda: None  # the evictions metric
        self._stopping = False
        self._worker = threading.Thread(target=self._residency_loop, name="deltaserve-adapters", daemon=True)
        self._worker.start()

    # ---- lifecycle ---------------------------------------------------------------------------------
    def load(
        self,
        adapter_id: str,
        path: str,
        *,
        replace: bool = False,
        pin: bool = False,
        resolved: bool = False,
        version: str = "",
        source: str = "",
    ) -> AdapterRecord:
        """Validate an adapter and register it (on the device if a slot can be had). Blocking: call it off
        the event loop. With `replace`, an existing id switches to the new weights once they validated;
        requests already running finish with the old ones. `resolved`: the path comes from an operator's
        --adapter-source (already confined there), not from a caller, so --adapter-root does not apply.
        Returns the record that serves the name: an existing one when the content is the same."""
        if not adapter_id:
            raise InvalidRequestError("adapter_id must not be empty")
        if not path:
            raise InvalidRequestError("path must name an adapter directory")
        if not resolved:
            path = self._resolve_path(path)  # PERMISSION_DENIED outside the allowed roots
        record = AdapterRecord(adapter_id, path, None, AdapterState.LOADING, pinned=pin, version=version, source=source)
        with self._cv:
            if pin:
                self._check_pin_room(adapter_id)
            self._refuse_if_merged(adapter_id)
            if (adapter_id in self._by_id or adapter_id in self._aliases) and not replace:
                raise AdapterExistsError(
                    f"adapter {adapter_id!r} is already loaded; unload it first or load with replace"
                )
            if adapter_id not in self._by_id and adapter_id not in self._aliases:
                self._by_id[adapter_id] = record  # reserve the id while validating
        try:
            adapter, record.content_hash = self._parse_and_digest(path)
            with self._cv:
                twin = self._twin(record.content_hash)
                if twin is not None and not pin:  # the same weights are served already: share them
                    return self._alias(adapter_id, record, twin)
        except BaseException:
            with self._cv:
                if self._by_id.get(adapter_id) is record:
                    del self._by_id[adapter_id]
            raise
        record.adapter = adapter
        record.describe(adapter)
        with self._cv:
            record.state = AdapterState.HOST
            slot = self._reserve_slot(record)
        if slot >= 0:
            try:
                self._fill_slot(record, slot)
            except BaseException:  # nothing half-registered: the id is free again (or keeps its old adapter)
                with self._cv:
                    if self._by_id.get(adapter_id) is record:
                        del self._by_id[adapter_id]
                raise
        with self._cv:
            if slot < 0 and pin:
                if self._by_id.get(adapter_id) is record:
                    del self._by_id[adapter_id]  # a replaced adapter keeps serving: nothing changed
                raise CapacityError(f"no device slot can be freed to pin {adapter_id!r}: every slot is busy or pinned")
            twin = self._twin(record.content_hash)
            if twin is not None and twin is not record and not pin:  # loaded concurrently under another name
                self._free_slot(record)
                record.adapter = None
                return self._alias(adapter_id, record, twin)
            if self._by_id.get(adapter_id) is not record and (adapter_id in self._by_id or adapter_id in self._aliases):
                self._drop_name(adapter_id)
            self._by_id[adapter_id] = record
            self._trim_host_cache()
        return record

    def _twin(self, content_hash: str) -> AdapterRecord | None:
        """A servable record with this content (lock held)."""
        return next(
            (
                r
                for r in self._by_id.values()
                if r.content_hash == content_hash and r.state not in (AdapterState.LOADING, AdapterState.UNLOADING)
            ),
            None,
        )

    def _alias(self, adapter_id: str, reservation: AdapterRecord, twin: AdapterRecord) -> AdapterRecord:
        """Serve `adapter_id` by `twin`'s record (lock held); the name's old adapter, if any, is dropped."""
        if self._by_id.get(adapter_id) is reservation:
            del self._by_id[adapter_id]
        if twin.adapter_id == adapter_id:
            return twin  # the name already serves these weights
        if adapter_id in self._by_id or adapter_id in self._aliases:
            self._drop_name(adapter_id)
        self._aliases[adapter_id] = twin
        log.info(
            "adapter %r has the content of %r (%s): served by its slot", adapter_id, twin.adapter_id, twin.content_hash
        )
        return twin

    def _drop_name(self, adapter_id: str) -> None:
        """Stop serving a name (lock held). A record keeps serving under its other names (one of them becomes
        its id); without any it retires."""
        if adapter_id in self._aliases:
            del self._aliases[adapter_id]
        else:
            record = self._by_id.pop(adapter_id)
            heir = next((name for name, r in self._aliases.items() if r is record), None)
            if heir is None:
                self._retire(record)
            else:
                del self._aliases[heir]
                record.adapter_id = heir
                self._by_id[heir] = record
        self._retire_mixes_of(adapter_id)

    def _parse_and_digest(self, path: str) -> tuple[ParsedAdapter, str]:
        """Parse and hash at once (hashing releases the GIL): a cold start waits for the longer of the two,
        not their sum. A twin found afterwards drops this parse, so only one host copy stays."""
        digest = self._hasher.submit(self._digest, path)
        try:
            adapter = self._parse(path)
        finally:
            concurrent.futures.wait([digest])  # never leave the hash running past a failed parse
        return adapter, digest.result()

    def _parse(self, path: str) -> ParsedAdapter:
        adapter = self._loader(path, self._spec)
        self._check_fits(adapter, "adapter")
        return adapter

    def _check_fits(self, adapter: ParsedAdapter, what: str) -> None:
        """A slot holds at most the server's max rank (--max-lora-rank) and bottleneck size
        (--max-bottleneck-size)."""
        if adapter.rank > self._slots.max_rank:
            raise AdapterMismatchError(
                f"{what} rank {adapter.rank} exceeds the server's --max-lora-rank {self._slots.max_rank}"
            )
        if adapter.bottleneck_size > self._slots.max_bottleneck_size:
            raise AdapterMismatchError(
                f"{what} bottleneck size {adapter.bottleneck_size} exceeds the server's --max-bottleneck-size "
                f"{self._slots.max_bottleneck_size}"
            )

    def unload(self, adapter_id: str) -> int:
        """Hide the adapter; returns how many in-flight requests still finish with it."""
        with self._cv:
            record = self._visible(adapter_id)
            self._refuse_if_merged(adapter_id)
            self._drop_name(adapter_id)
            return record.active_requests

    def set_pinned(self, adapter_id: str, pinned: bool) -> AdapterRecord:
        """Pin (bring to the device now and never evict) or unpin an adapter."""
        with self._cv:
            record = self._visible(adapter_id)
            if not pinned and record.merged:
                raise MergeError(f"adapter {adapter_id!r} is merged into the base and stays pinned; unmerge it first")
            if pinned and not record.pinned:
                self._check_pin_room(adapter_id)
            was_pinned, record.pinned = record.pinned, pinned  # pinned first: it must not be evicted meanwhile
            self._cv.notify_all()
        if not pinned or record.slot >= 0:
            return record
        self._ensure_host_copy(record)
        with self._cv:
            if record.slot >= 0:  # placed meanwhile
                return record
            slot = self._reserve_slot(record)
            if slot < 0:
                record.pinned = was_pinned
                raise CapacityError(f"no device slot can be freed to pin {adapter_id!r}: every slot is busy or pinned")
        self._fill_slot(record, slot)
        return record

    def set_merged(self, adapter_id: str, merged: bool) -> AdapterRecord:
        """Mark an adapter merged (pinning it on the device first) or no longer merged."""
        if merged:
            with self._cv:
                already_pinned = self._visible(adapter_id).pinned
            record = self.set_pinned(adapter_id, True)
            with self._cv:
                record.merged = True
                record.pinned_for_merge = not already_pinned
            return record
        with self._cv:
            record = self._by_id.get(adapter_id) or self._aliases[adapter_id]
            record.merged = False
            if record.pinned_for_merge:
                record.pinned, record.pinned_for_merge = False, False
            self._cv.notify_all()
            return record

    def _refuse_if_merged(self, adapter_id: str) -> None:
        """An adapter merged into the base, or a member of a merged mix, stays until it is unmerged."""
        record = self._by_id.get(adapter_id)
        if record is not None and record.merged:
            raise MergeError(f"adapter {adapter_id!r} is merged into the base; unmerge it first")
        merged_mix = next((r for r in self._by_id.values() if r.merged and adapter_id in r.components), None)
        if merged_mix is not None:
            raise MergeError(f"adapter {adapter_id!r} is part of {merged_mix.adapter_id!r}, merged into the base")

    def _check_pin_room(self, adapter_id: str) -> None:
        """At least one slot must stay unpinned, or requests for any other adapter could never run."""
        pinned = sum(owner is not None and owner.pinned for owner in self._owners)
        if pinned + 1 >= self._slots.num_slots:
            raise CapacityError(
                f"pinning {adapter_id!r} would leave no device slot for other adapters ({pinned} of "
                f"{self._slots.num_slots} slots pinned); unpin one or raise --max-resident-adapters"
            )

    def _visible(self, adapter_id: str) -> AdapterRecord:
        record = self._by_id.get(adapter_id) or self._aliases.get(adapter_id)
        if record is None or record.state is AdapterState.LOADING:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
        return record

    def find(self, adapter_id: str) -> AdapterRecord | None:
        """The servable record a name is served by now (its own or its twin's), or None."""
        with self._cv:
            try:
                return self._visible(adapter_id)
            except AdapterNotFoundError:
                return None

    def _retire_mixes_of(self, adapter_id: str) -> None:
        """Cached weighted mixes built from `adapter_id` are stale once it is unloaded or replaced (lock held)."""
        for mix in [r for r in list(self._by_id.values()) if adapter_id in r.components]:
            del self._by_id[mix.adapter_id]
            self._retire(mix)

    # ---- weighted mixes and stacks ------------------------------------------------------------------
    def derive(
        self, derived_id: str, members: tuple[str, ...], build: Callable[[list[ParsedAdapter]], ParsedAdapter]
    ) -> None:
        """Register the adapter `build` makes from the members' parsed weights (a weighted mix or a stack),
        unless it exists already. It dies with its members: if one is unloaded or replaced while it is being
        built, nothing is registered (NOT_FOUND), so a mix never outlives the weights it was made from."""
        with self._cv:
            sources = [self._visible(adapter_id) for adapter_id in members]
        adapters = []
        for record in sources:
            self._ensure_host_copy(record)
            if record.adapter is None:  # unloaded meanwhile
                raise AdapterNotFoundError(f"adapter {record.adapter_id!r} is not loaded")
            adapters.append(record.adapter)
        derived = build(adapters)
        self._check_fits(derived, f"{derived.kind.value} {derived_id!r}:")
        record = AdapterRecord(derived_id, derived_id, derived, AdapterState.HOST, components=members)
        record.describe(derived)
        with self._cv:
            if derived_id in self._by_id:
                return  # built concurrently by another request
            for adapter_id, source in zip(members, sources, strict=True):
                if (self._by_id.get(adapter_id) or self._aliases.get(adapter_id)) is not source:
                    raise AdapterNotFoundError(f"adapter {adapter_id!r} was unloaded or replaced meanwhile")
            self._by_id[derived_id] = record
            slot = self._reserve_slot(record)
        if slot >= 0:
            self._fill_slot(record, slot)
        with self._cv:
            self._trim_host_cache()

    def _retire(self, record: AdapterRecord) -> None:
        """Take a record out of service (lock held): free now if idle, else when its last request leaves."""
        record.state = AdapterState.UNLOADING
        record.pinned = False
        if record.active_requests == 0:
            self._free_slot(record)
            record.adapter = None
        else:
            self._draining.append(record)

    # ---- per request -------------------------------------------------------------------------------
    def acquire(self, adapter_id: str) -> AdapterRecord:
        """Reference a loaded adapter for one request (NOT_FOUND if it is not loaded); if it is not on the
        device, the residency thread starts bringing it in."""
        with self._cv:
            record = self._visible(adapter_id)
            record.active_requests += 1
            record.last_used = time.time()
            record.load_error = None  # a failed read-back is retried by the next request: the files may be fixed
            if record.slot < 0 and record not in self._want:
                self._want.append(record)
                self._cv.notify_all()
            return record

    def release(self, record: AdapterRecord, served: bool) -> None:
        with self._cv:
            record.active_requests -= 1
            record.requests_served += int(served)
            record.last_used = time.time()
            if record.state is AdapterState.UNLOADING and record.active_requests == 0:
                self._draining.remove(record)
                self._free_slot(record)
                record.adapter = None
            self._cv.notify_all()  # an idle adapter may now be evicted for a waiting one

    # ---- slots (lock held) -------------------------------------------------------------------------
    def _reserve_slot(self, record: AdapterRecord) -> int:
        """Claim a slot for `record` (lock held): a free one, else the least recently used idle unpinned
        adapter's (evicted); -1 if every slot is busy, pinned or being written. The weights are copied by
        `_fill_slot` without the lock, so requests and the event loop never wait for a copy."""
        slot = next((i for i, owner in enumerate(self._owners) if owner is None), -1)
        if slot < 0:
            idle = [
                o for o in self._owners if o is not None and o.slot >= 0 and o.active_requests == 0 and not o.pinned
            ]
            if not idle:
                return -1
            victim = min(idle, key=lambda r: r.last_used)
            slot = victim.slot
            self._free_slot(victim)
            victim.state = AdapterState.HOST
            self.on_evict()
            log.info("evicted adapter %r from device slot %d", victim.adapter_id, slot)
        self._owners[slot] = record  # reserved: record.slot stays -1 until the copy is done
        return slot

    def _fill_slot(self, record: AdapterRecord, slot: int) -> None:
        """Copy the weights into a reserved slot (lock not held; a free slot is never read by a forward). A copy
        that fails (out of memory allocating a stack) gives the reservation back before it raises."""
        try:
            self._slots.write(slot, record.adapter)
        except BaseException:
            with self._cv:
                self._owners[slot] = None
                self._cv.notify_all()
            raise
        with self._cv:
            if record.state is AdapterState.UNLOADING and record.active_requests == 0:
                self._owners[slot] = None  # unloaded while copying: nobody will use it
            else:
                record.slot = slot
                if record.state is not AdapterState.UNLOADING:  # a retired record still serves its last requests
                    record.state = AdapterState.DEVICE
            self._cv.notify_all()
        self.on_resident()

    def _free_slot(self, record: AdapterRecord) -> None:
        """Give the slot back (lock held). No need to zero it: a free slot is never read, and the next
        write_slot zeroes it before copying."""
        if record.slot >= 0:
            self._owners[record.slot] = None
            record.slot = -1

    def _trim_host_cache(self) -> None:
        """Drop the host copies of the least recently used host-only adapters beyond `max_host`."""
        host_only = [r for r in self._by_id.values() if r.state is AdapterState.HOST and r.active_requests == 0]
        for record in sorted(host_only, key=lambda r: r.last_used)[: max(0, len(host_only) - self._max_host)]:
            if record.components:  # a mix has no files to come back from: drop it (rebuilt on demand)
                del self._by_id[record.adapter_id]
                self._retire(record)
                continue
            record.adapter = None
            record.state = AdapterState.DISK

    # ---- residency thread --------------------------------------------------------------------------
    def _residency_loop(self) -> None:
        one_thread_here()  # only the engine thread computes with several (kernels/threads.py)
        while True:
            with self._cv:
                while not self._stopping and not self._want:
                    self._cv.wait()
                if self._stopping:
                    return
                record = self._want[0]
            try:
                self._bring_in(record)
            except Exception:  # the files changed or vanished since they were validated
                log.exception("cannot bring adapter %r back from %s", record.adapter_id, record.path)
                with self._cv:
                    self._want.remove(record)
                    # The detail (paths, library text) stays in the log; requests get the adapter's id.
                    record.load_error = AdapterUnreadableError(
                        f"adapter {record.adapter_id!r} could not be read back from its files; fix or reload it"
                    )
                self.on_resident()

    def _bring_in(self, record: AdapterRecord) -> None:
        self._ensure_host_copy(record)
        slot = -1
        with self._cv:
            while record.slot < 0 and record.adapter is not None and not self._stopping:
                slot = self._reserve_slot(record)
                if slot >= 0:
                    break
                self._cv.wait()  # every slot busy or pinned: wait for a request to finish
        if slot >= 0:
            self._fill_slot(record, slot)
        with self._cv:
            if record in self._want:
                self._want.remove(record)
            self._trim_host_cache()
        self.on_resident()

    def _ensure_host_copy(self, record: AdapterRecord) -> None:
        """Parse from disk (outside the lock) when the host copy was dropped; the files must still hold the
        content the record was loaded with."""
        if record.adapter is not None:
            return
        if record.content_hash and self._digest(record.path) != record.content_hash:
            raise AdapterUnreadableError(
                f"adapter {record.adapter_id!r} changed on disk since it was loaded; load it again (a new version)"
            )
        adapter = self._parse(record.path)
        with self._cv:
            if record.adapter is None:
                record.adapter = adapter
                if record.state is AdapterState.DISK:
                    record.state = AdapterState.HOST

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._worker.join(timeout=10)
        self._hasher.shutdown(wait=False)

    # ---- views -------------------------------------------------------------------------------------
    def list(self) -> list[AdapterRecord]:
        """Every record, plus a snapshot per alias (a copy named after it: read it, do not act on it)."""
        with self._cv:
            views = [dataclasses.replace(record, adapter_id=name) for name, record in self._aliases.items()]
            return sorted([*self._by_id.values(), *self._draining, *views], key=lambda r: r.adapter_id)

    def occupied_slots(self) -> int:
        """Device slots owned or reserved; equal to resident("device") whenever no copy is in progress."""
        with self._cv:
            return sum(owner is not None for owner in self._owners)

    def resident(self, tier: str) -> int:
        """Adapters per tier: "device" (holding a slot, incl. draining), "host" (host cache only)."""
        with self._cv:
            records = [*self._by_id.values(), *self._draining]
            if tier == "device":
                return sum(r.slot >= 0 for r in records)
            return sum(r.state is AdapterState.HOST for r in records)

    @property
    def spec(self) -> BaseModelSpec:
        return self._spec

    @property
    def slots(self) -> DeviceSlots:
        return self._slots
