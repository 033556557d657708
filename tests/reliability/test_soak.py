"""A bounded churn soak: for SOAK_SECONDS, adapters are unloaded and reloaded, replaced, pinned and unpinned,
merged and unmerged, while generators run the base, every adapter and a weighted mix, and other clients cancel
streams and let tiny deadlines expire. Only documented status codes may come back, every completed output must
equal its PEFT reference, and at the end nothing is left referenced, draining or half-loaded."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread

from tests.references import greedy_reference, load_reference_model, peft_mix_model, tokenizer_for

SOAK_SECONDS = 60
MAX_NEW = 6
IDS = {"a": "qv8", "b": "all16_rs", "c": "pattern", "d": "head"}  # served id -> conftest LORA_VARIANTS name
MIX = {"a": 0.7, "d": -0.4}  # list-targeted LoRAs (PEFT mixes no list with a regex); "d" churns
MIX_METHOD = "cat"
# What each kind of call may answer besides success, and why.
ALLOWED = {
    "generate": {grpc.StatusCode.NOT_FOUND},  # "d" (and so the mix) is unloaded for a moment at a time
    "deadline": {grpc.StatusCode.DEADLINE_EXCEEDED},
    "admin": {
        grpc.StatusCode.NOT_FOUND,  # unloaded meanwhile
        grpc.StatusCode.ALREADY_EXISTS,  # loaded meanwhile
        grpc.StatusCode.FAILED_PRECONDITION,  # merged: unload, unpin and replace wait for the unmerge
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # every slot busy or pinned
    },
}


def _references(tiny_dir: str, paths: dict[str, str]) -> dict[tuple[str, int], list[int]]:
    tokenizer = tokenizer_for(tiny_dir)
    models = {name: load_reference_model(tiny_dir, path) for name, path in paths.items()}
    models[""] = load_reference_model(tiny_dir)
    models["mix"] = peft_mix_model(tiny_dir, paths, list(MIX), list(MIX.values()), MIX_METHOD)
    return {
        (name, i): greedy_reference(model, tokenizer, tokenizer(PROMPTS[i])["input_ids"], MAX_NEW).token_ids
        for name, model in models.items()
        for i in range(2)
    }


class Soak:
    def __init__(self, target: str, paths: dict[str, str], references: dict, seconds: float) -> None:
        self.target = target
        self.paths = paths
        self.references = references
        self.deadline = time.monotonic() + seconds
        self.errors: list[str] = []
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.errors

    def note(self, what: str, err: DeltaserveError | None = None, kind: str = "") -> None:
        with self.lock:
            if err is None:
                self.counts[what] += 1
            elif err.code in ALLOWED[kind]:
                self.counts[f"{what}:{err.code.name}"] += 1
            else:
                self.errors.append(f"{what}: {err.code.name} {err.message}")

    def generator(self, seed: int) -> None:
        rng = random.Random(seed)
        with Client(self.target, timeout=120) as client:
            while self.running():
                name, i = rng.choice(["", *IDS, "mix"]), rng.randrange(2)
                options = {"adapter_mix": MIX, "mix_method": MIX_METHOD} if name == "mix" else {"adapter_id": name}
                try:
                    result = client.generate(PROMPTS[i], max_new_tokens=MAX_NEW, **options)
                except DeltaserveError as err:
                    self.note(f"generate {name}", err, "generate")
                    continue
                if result.token_ids != self.references[name, i]:
                    with self.lock:
                        self.errors.append(f"{name!r} on prompt {i}: {result.token_ids} != {self.references[name, i]}")
                self.note("generate ok")

    def canceller(self, seed: int) -> None:
        rng = random.Random(seed)
        with Client(self.target, timeout=120) as client:
            while self.running():
                adapter = rng.choice(["", *IDS])
                if rng.random() < 0.5:  # a client that hangs up mid-stream
                    stream = client.generate_stream(PROMPTS[0], adapter_id=adapter, max_new_tokens=40)
                    try:
                        next(iter(stream), None)
                    except DeltaserveError as err:
                        self.note("stream", err, "generate")
                    finally:
                        stream.close()  # the generator's close cancels the call
                    self.note("stream cancelled")
                else:  # a deadline that expires at any point of the request's life
                    try:
                        client.generate(
                            PROMPTS[1], adapter_id=adapter, max_new_tokens=20, timeout=rng.uniform(0.001, 0.05)
                        )
                        self.note("deadline ok")
                    except DeltaserveError as err:
                        self.note("deadline", err, "deadline" if err.code != grpc.StatusCode.NOT_FOUND else "generate")

    def admin(self, seed: int) -> None:
        rng = random.Random(seed)
        actions = [self._reload_d, self._replace_b, self._pin_c, self._merge_a]
        with Client(self.target, timeout=120) as client:
            while self.running():
                action = rng.choice(actions)
                try:
                    action(client, rng)
                    self.note(action.__name__)
                except DeltaserveError as err:
                    self.note(action.__name__, err, "admin")
                time.sleep(rng.uniform(0.0, 0.2))
            try:
                client.unmerge_adapter()
            except DeltaserveError as err:
                self.note("unmerge at the end", err, "admin")

    def _reload_d(self, client: Client, rng: random.Random) -> None:
        client.unload_adapter("d")
        time.sleep(rng.uniform(0.0, 0.1))
        client.load_adapter("d", self.paths["d"])

    def _replace_b(self, client: Client, rng: random.Random) -> None:
        client.load_adapter("b", self.paths["b"], replace=True)  # the same weights: its reference still holds

    def _pin_c(self, client: Client, rng: random.Random) -> None:
        client.pin_adapter("c", pinned=rng.random() < 0.5)

    def _merge_a(self, client: Client, rng: random.Random) -> None:
        if client.model_info().merged_adapter_id:
            client.unmerge_adapter()
        else:
            client.merge_adapter("a")


def test_churn_soak(tiny_dir, lora_dirs, tmp_path):
    paths = {served: str(shutil.copytree(lora_dirs[name], Path(tmp_path) / served)) for served, name in IDS.items()}
    references = _references(tiny_dir, paths)
    config = ServerConfig.of(
        model=tiny_dir,
        max_batch_size=6,
        max_seq_len=256,
        max_adapters=4,  # five adapters and a mix compete for four slots: eviction and reloads under traffic
        max_cpu_adapters=1,
        max_lora_rank=16,
        adapter_root=[str(tmp_path)],
    )
    with ServerThread(config) as running:
        with Client(running.target, timeout=60) as client:
            for served, path in paths.items():
                client.load_adapter(served, path)
        soak = Soak(running.target, paths, references, SOAK_SECONDS)
        workers = [threading.Thread(target=soak.generator, args=(seed,)) for seed in range(3)]
        workers += [
            threading.Thread(target=soak.canceller, args=(10,)),
            threading.Thread(target=soak.admin, args=(20,)),
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=SOAK_SECONDS + 120)
        assert not any(worker.is_alive() for worker in workers), "a soak worker hung"
        assert soak.errors == [], soak.errors[:5]
        assert soak.counts["generate ok"] > 50 and soak.counts["_merge_a"] > 0 and soak.counts["_reload_d"] > 0, (
            soak.counts
        )
        _assert_nothing_left(running)


def _assert_nothing_left(running: ServerThread) -> None:
    registry = running.server.metrics.registry
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with Client(running.target, timeout=30) as client:
            adapters = client.list_adapters()
        busy = [a for a in adapters if a.active_requests or a.state in ("loading", "unloading")]
        gauges = [registry.get_sample_value(f"deltaserve_requests_{g}") for g in ("running", "waiting")]
        if not busy and gauges == [0, 0]:
            return
        time.sleep(0.1)
    raise AssertionError(f"left behind: {busy}, running/waiting {gauges}")
