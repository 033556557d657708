"""Adapters by name from --adapter-source stores: ids that cannot escape a source, the hub cache layout, the
bounded LRU cache, the negative cache, identity by content, versions, and a real server that serves names
from a local directory on first use."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import grpc
import pytest
from deltaserve.adapters.digest import content_digest
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.server.errors import AdapterNotFoundError
from deltaserve.server.residency.sources import (
    AdapterCache,
    AdapterResolver,
    HubCacheSource,
    Version,
    open_source,
    parse_adapter_id,
)
from deltaserve.testing.helpers import PROMPTS, ServerThread, make_lora

from tests.references import greedy_reference, load_reference_model, tokenizer_for

MAX_NEW = 6


# ---- ids ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "adapter_id",
    [
        "../etc",
        "a/../../b",
        "/abs/path",
        "s3://bucket/x",
        "file:x",
        "a\\b",
        ".",
        "a/./b",
        "a//b",
        "",
        "a@",
        "a@../b",
        "a@b/c",
        "x" * 300,
        "a/b/c/d",
        "-rf",
        "a b",
        "naïve",
    ],
)
def test_ids_that_could_escape_a_source_are_refused(adapter_id):
    with pytest.raises(AdapterNotFoundError):
        parse_adapter_id(adapter_id)


def test_good_ids_parse_into_name_and_revision():
    assert parse_adapter_id("support-bot").revision is None
    pinned = parse_adapter_id("acme/support-bot@step-00100")
    assert (pinned.name, pinned.revision, pinned.parts) == ("acme/support-bot", "step-00100", ["acme", "support-bot"])


# ---- the hub cache layout -----------------------------------------------------------------------------------
def _hub_repo(root, org_name: str, adapter_dir: str, commit: str, ref: str | None = "main") -> None:
    repo = root / ("models--" + org_name.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        blob = repo / "blobs" / f"{commit}-{name}"
        shutil.copyfile(os.path.join(adapter_dir, name), blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def test_hub_cache_follows_refs_main_and_pins_commits(tmp_path, lora_dirs):
    _hub_repo(tmp_path, "acme/bot", lora_dirs["qv8"], "c0ffee01")
    _hub_repo(tmp_path, "acme/bot", lora_dirs["all16_rs"], "c0ffee02", ref=None)
    source = HubCacheSource("hf-cache://" + str(tmp_path), str(tmp_path))
    assert source.find(parse_adapter_id("acme/bot")).revision == "c0ffee01"
    pinned = source.find(parse_adapter_id("acme/bot@c0ffee02"))
    into = tmp_path / "out"
    into.mkdir()
    source.fetch(pinned, str(into))
    assert content_digest(str(into)) == content_digest(lora_dirs["all16_rs"])
    assert not any(os.path.islink(into / name) for name in os.listdir(into))
    with pytest.raises(AdapterNotFoundError):
        source.find(parse_adapter_id("acme/other"))


def test_hub_cache_refuses_links_out_of_blobs(tmp_path, lora_dirs):
    _hub_repo(tmp_path, "evil", lora_dirs["qv8"], "abc")
    link = tmp_path / "models--evil" / "snapshots" / "abc" / "adapter_config.json"
    link.unlink()
    link.symlink_to("/etc/hostname")
    with pytest.raises(AdapterNotFoundError, match="outside"):
        HubCacheSource("hf-cache://x", str(tmp_path)).find(parse_adapter_id("evil"))


# ---- the cache ----------------------------------------------------------------------------------------------
def _fill(size: int):
    def download(into: str) -> int:
        with open(os.path.join(into, "blob"), "wb") as handle:
            handle.write(b"x" * size)
        return size

    return download


def test_cache_is_bounded_lru_and_keeps_entries_in_use(tmp_path):
    cache = AdapterCache(str(tmp_path / "cache"), max_bytes=250)
    busy: set[str] = set()
    dropped: list[str] = []
    cache.in_use = lambda path: path in busy
    cache.on_drop = dropped.append
    a = cache.put("ds-" + "a" * 32, 100, _fill(100))
    b = cache.put("ds-" + "b" * 32, 100, _fill(100))
    assert cache.get("ds-" + "a" * 32) == a  # a is now the most recently used
    c = cache.put("ds-" + "c" * 32, 100, _fill(100))  # b (least recent) goes
    assert dropped == [b] and not os.path.exists(b) and os.path.exists(a) and os.path.exists(c)
    busy.add(a)
    cache.get("ds-" + "c" * 32)
    cache.put("ds-" + "d" * 32, 100, _fill(100))  # a is least recent but busy: c goes
    assert dropped == [b, c] and os.path.exists(a)
    assert cache.size_bytes == 200
    with pytest.raises(Exception, match="adapter-cache-bytes"):
        cache.put("ds-" + "e" * 32, 300, _fill(300))
    assert not [n for n in os.listdir(cache.directory) if n.startswith("tmp-")]


def test_cache_clears_only_its_own_entries_at_start(tmp_path):
    directory = tmp_path / "cache"
    (directory / ("ds-" + "f" * 32)).mkdir(parents=True)
    (directory / "operator-notes").mkdir()
    AdapterCache(str(directory), 10)
    assert os.listdir(directory) == ["operator-notes"]


# ---- the negative cache (a real directory source, a stand-in registry that records loads) ----------------
class _Registry:
    def __init__(self) -> None:
        self.loads: list[tuple[str, str]] = []

    def load(self, adapter_id, path, **options):
        self.loads.append((adapter_id, path))

    def find(self, adapter_id):
        return None


def test_a_miss_is_answered_from_the_negative_cache_until_it_expires(tmp_path, lora_dirs):
    root = tmp_path / "store"
    root.mkdir()
    registry = _Registry()
    resolver = AdapterResolver(
        [open_source(str(root))], registry, AdapterCache(str(tmp_path / "c"), 1 << 30), negative_ttl_s=0.5
    )
    calls = []
    source = resolver.sources[0]
    original = source.find
    source.find = lambda name: (calls.append(name), original(name))[1]

    async def run() -> None:
        for _ in range(20):  # a typo storm: one look-up
            with pytest.raises(AdapterNotFoundError):
                await resolver.ensure("tpyo")
        assert len(calls) == 1
        shutil.copytree(lora_dirs["qv8"], root / "tpyo")
        with pytest.raises(AdapterNotFoundError):
            await resolver.ensure("tpyo")  # still remembered
        await asyncio.sleep(0.6)
        assert await resolver.ensure("tpyo")
        assert registry.loads == [("tpyo", str(root / "tpyo"))]

    try:
        asyncio.run(run())
    finally:
        resolver.close()


def test_revision_folders_newest_by_write_time(tmp_path, lora_dirs):
    root = tmp_path / "store"
    for i, revision in enumerate(("v10", "v9")):  # v9 written last: newest despite its name
        shutil.copytree(lora_dirs["qv8"], root / "bot" / revision)
        stamp = time.time() - 100 + i * 50
        os.utime(root / "bot" / revision / "adapter_config.json", (stamp, stamp))
    source = open_source(str(root))
    assert source.find(parse_adapter_id("bot")).revision == "v9"
    assert source.find(parse_adapter_id("bot@v10")).revision == "v10"
    with pytest.raises(AdapterNotFoundError):
        source.find(parse_adapter_id("bot@v11"))
    assert isinstance(source.find(parse_adapter_id("bot")), Version)


def test_links_inside_a_directory_source_are_refused(tmp_path, lora_dirs):
    root = tmp_path / "store"
    (root / "bot").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "bot" / name).symlink_to(os.path.join(lora_dirs["qv8"], name))
    with pytest.raises(AdapterNotFoundError, match="regular file"):
        open_source(str(root)).find(parse_adapter_id("bot"))


# ---- a real server with a directory source ------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("store")
    one = make_lora(tiny_dir, str(root / "one"), seed=61, r=4, target_modules=["q_proj", "v_proj"])
    shutil.copytree(one, root / "twin")  # byte-identical weights under another name
    config = json.loads((root / "twin" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "somewhere/else"  # provenance does not change the identity
    (root / "twin" / "adapter_config.json").write_text(json.dumps(config))
    make_lora(tiny_dir, str(root / "bot" / "v1"), seed=62, r=4, target_modules=["q_proj"])
    return root


@pytest.fixture(scope="module")
def server(tiny_dir, store, tmp_path_factory):
    config = ServerConfig.of(
        model=tiny_dir,
        max_batch_size=4,
        max_seq_len=128,
        max_adapters=4,
        max_lora_rank=16,
        adapter_source=[str(store)],
        adapter_cache_dir=str(tmp_path_factory.mktemp("cache")),
        adapter_refresh_s=0.0,
        adapter_negative_ttl_s=30.0,
    )
    with ServerThread(config) as running:
        yield running


def _reference(tiny_dir, path: str, prompt: str):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_reference_model(tiny_dir), path).eval()
    tokenizer = tokenizer_for(tiny_dir)
    return greedy_reference(model, tokenizer, tokenizer(prompt)["input_ids"], MAX_NEW).token_ids


def test_a_name_is_served_on_first_use_and_equals_peft(server, store, tiny_dir):
    with Client(server.target, timeout=60) as client:
        got = client.generate(PROMPTS[0], adapter_id="one", max_new_tokens=MAX_NEW)
        assert got.token_ids == _reference(tiny_dir, str(store / "one"), PROMPTS[0])
        base = client.generate(PROMPTS[0], max_new_tokens=MAX_NEW)
        assert base.token_ids != got.token_ids


def test_names_with_identical_weights_share_one_record(server):
    with Client(server.target, timeout=60) as client:
        client.generate(PROMPTS[1], adapter_id="one", max_new_tokens=MAX_NEW)
        client.generate(PROMPTS[1], adapter_id="twin", max_new_tokens=MAX_NEW)
        listed = {a.adapter_id: a for a in client.list_adapters()}
    assert listed["one"].content_hash.startswith("sha256:")
    assert listed["one"].content_hash == listed["twin"].content_hash
    registry = server.server.registry
    assert registry.find("one") is registry.find("twin")
    assert registry.occupied_slots() == len({id(registry.find(n)) for n in listed})


def test_unloading_one_name_keeps_its_twin_serving(server):
    registry = server.server.registry
    with Client(server.target, timeout=60) as client:
        client.generate(PROMPTS[1], adapter_id="one", max_new_tokens=2)
        client.generate(PROMPTS[1], adapter_id="twin", max_new_tokens=2)
        shared = registry.find("twin")
        registry.unload("one")
        assert registry.find("one") is None and registry.find("twin") is shared and shared.adapter_id == "twin"
        expected = client.generate(PROMPTS[1], adapter_id="twin", max_new_tokens=MAX_NEW).token_ids
        assert client.generate(PROMPTS[1], adapter_id="one", max_new_tokens=MAX_NEW).token_ids == expected
        assert registry.find("one") is shared  # resolved again, and shared again


def test_a_miss_is_not_found_and_nothing_else_fails(server):
    with Client(server.target, timeout=60) as client:
        for adapter_id in ("missing", "../one", "s3://x/one"):
            with pytest.raises(DeltaserveError) as info:
                client.generate(PROMPTS[0], adapter_id=adapter_id, max_new_tokens=2)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert client.generate(PROMPTS[0], adapter_id="one", max_new_tokens=2).token_ids


def test_a_bare_name_follows_a_new_version_and_a_pin_stays(server, store, tiny_dir):
    with Client(server.target, timeout=60) as client:
        first = client.generate(PROMPTS[2], adapter_id="bot", max_new_tokens=MAX_NEW).token_ids
        make_lora(tiny_dir, str(store / "bot" / "v2"), seed=63, r=4, target_modules=["q_proj", "o_proj"])
        expected_v2 = _reference(tiny_dir, str(store / "bot" / "v2"), PROMPTS[2])
        assert expected_v2 != first
        deadline = time.monotonic() + 30
        while True:  # refresh_s is 0: each request may start a background re-check
            got = client.generate(PROMPTS[2], adapter_id="bot", max_new_tokens=MAX_NEW).token_ids
            if got == expected_v2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert got == expected_v2
        pinned = client.generate(PROMPTS[2], adapter_id="bot@v1", max_new_tokens=MAX_NEW).token_ids
        assert pinned == first
        listed = {a.adapter_id: a for a in client.list_adapters()}
        assert listed["bot"].version == "v2" and listed["bot@v1"].version == "v1"
        assert listed["bot"].content_hash != listed["bot@v1"].content_hash
