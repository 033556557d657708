"""The merge path: fold one LoRA adapter into the base weights (W + s·BA) for zero-overhead serving of it.

While an adapter is merged its own requests run with no adapter work at all. Requests for the base or for
other adapters stay correct because their rows subtract the merged delta again, y -= (x A_m^T) B_m, from the
merged adapter's device slot (`LoraBatch.unmerge_*`). That suits the workload the merge is for — one adapter
carrying nearly all traffic: the majority pays nothing, the few other rows pay one low-rank product, and a
change in the mix never forces a weight copy between steps. The original weights of every merged module are
kept, so unmerging copies them back bit for bit instead of subtracting.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

from deltaserve.server.engine.engine import Engine
from deltaserve.server.errors import DeltaserveServerError, MergeError
from deltaserve.server.metrics import Metrics
from deltaserve.server.model.runner import ModelRunner
from deltaserve.server.residency.registry import AdapterRecord, AdapterRegistry

log = logging.getLogger(__name__)


class MergeController:
    def __init__(self, engine: Engine, registry: AdapterRegistry, runner: ModelRunner, metrics: Metrics) -> None:
        self.engine = engine
        self.registry = registry
        self.runner = runner
        self.metrics = metrics

    @property
    def merged_adapter_id(self) -> str:
        merged = self.engine.merged
        return merged.adapter_id if merged is not None else ""

    def merge(self, adapter_id: str) -> AdapterRecord:
        """Merge `adapter_id` (unmerging another one first). Blocking: call it off the event loop."""
        record = self.registry.set_merged(adapter_id, True)  # pinned on the device, cannot be unloaded
        try:
            self.engine.call(lambda: self.merge_on_engine(record))
        except BaseException:
            if self.engine.merged is not record:
                self.registry.set_merged(adapter_id, False)
            raise
        return record

    def unmerge(self) -> str:
        """Restore the base weights exactly; returns the adapter that was merged."""
        merged = self.engine.merged
        if merged is None:
            raise MergeError("no adapter is merged")
        self.engine.call(self.unmerge_on_engine)
        return merged.adapter_id

    def merge_on_engine(self, record: AdapterRecord) -> None:
        """Fold `record` into the base now. Engine thread only (between forwards)."""
        if self.engine.merged is record:
            return
        adapter = record.adapter
        if adapter is None or not adapter.mergeable:
            raise MergeError(
                f"adapter {record.adapter_id!r} ({record.kind}) cannot be merged into the base: only a pure low-rank "
                "delta (LoRA, rsLoRA, AdaLoRA without bias deltas) folds into the weights exactly"
            )
        if self.engine.merged is not None:
            self.unmerge_on_engine()
        self.runner.merge_weights({name: (w.lora_a, w.lora_b_scaled) for name, w in adapter.modules.items()})
        self.engine.merged = record
        self.metrics.merge_switches.inc()
        self.metrics.merged_adapter.labels(record.adapter_id).set(1)
        log.info("merged adapter %r into the base (%d modules)", record.adapter_id, len(adapter.modules))

    def unmerge_on_engine(self) -> None:
        """Restore the saved base weights now. Engine thread only (between forwards)."""
        record = self.engine.merged
        if record is None:
            return
        self.runner.restore_weights()
        self.engine.merged = None
        self.registry.set_merged(record.adapter_id, False)
        self.metrics.merge_switches.inc()
        self.metrics.merged_adapter.remove(record.adapter_id)
        log.info("unmerged adapter %r: base weights restored", record.adapter_id)


class AutoMergePolicy:
    """`--merge-policy auto` (dLoRA's idea): merge the adapter that carries nearly all traffic, unmerge when
    the mix changes.

    It looks at the adapters named by the last `window` admitted requests. With nothing merged, an adapter
    named by at least `merge_share` of them is merged; a merged adapter whose share falls below
    `unmerge_share` is unmerged. Two thresholds, and a dwell of `window` new requests after every switch,
    keep it from flapping. Counting requests rather than decode steps means that one long request does not
    look like a traffic shift. It runs on the engine thread between forwards, so it changes the weights
    directly.
    """

    def __init__(
        self, controller: MergeController, window: int = 32, merge_share: float = 0.95, unmerge_share: float = 0.8
    ) -> None:
        self.controller = controller
        self.window = window
        self.merge_share = merge_share
        self.unmerge_share = unmerge_share
        self._recent: deque[str] = deque(maxlen=window)
        self._since_switch = 0
        self._refused: set[str] = set()  # adapters that cannot be merged (quantized base, tied lm_head, ...)

    def observe(self, adapter_id: str) -> None:
        """Called for every admitted request with its adapter id ("" for the base)."""
        self._recent.append(adapter_id)
        self._since_switch += 1
        if self._since_switch < self.window:
            return
        counts = Counter(self._recent)
        merged = self.controller.engine.merged
        if merged is not None:
            share = counts[merged.adapter_id] / len(self._recent)
            if share < self.unmerge_share:
                self.controller.unmerge_on_engine()
                self._switched(f"{merged.adapter_id!r} was named by {share:.0%} of the requests")
            return
        candidate, count = counts.most_common(1)[0]
        if candidate and candidate not in self._refused and count >= self.merge_share * len(self._recent):
            self._merge(candidate, count / len(self._recent))

    def _merge(self, adapter_id: str, share: float) -> None:
        registry = self.controller.registry
        current = next((r for r in registry.list() if r.adapter_id == adapter_id), None)
        if current is None or not current.mergeable:  # not a pure low-rank delta: never pin it for nothing
            self._refused.add(adapter_id)
            return
        try:
            record = registry.set_merged(adapter_id, True)
        except (DeltaserveServerError, KeyError):  # unloaded meanwhile, or no slot can be pinned
            self._refused.add(adapter_id)
            return
        try:
            self.controller.merge_on_engine(record)
        except Exception as err:  # MergeError, or out of memory: either way the base stays unmerged
            registry.set_merged(adapter_id, False)
            self._refused.add(adapter_id)
            log.log(
                logging.INFO if isinstance(err, MergeError) else logging.WARNING,
                "auto merge: %r cannot be merged (%s)",
                adapter_id,
                err,
            )
            return
        self._switched(f"{adapter_id!r} was named by {share:.0%} of the requests")

    def _switched(self, why: str) -> None:
        self._since_switch = 0
        log.info("auto merge policy switched: %s (last %d)", why, self.window)
