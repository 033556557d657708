"""Adapter lifecycle under traffic: more adapters than device slots, LRU eviction and pinning, load/unload/
replace churn beside running streams, start-up registration, and the guarded admin surface."""

from __future__ import annotations

import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread, make_lora
from safetensors.torch import load_file

from tests.references import greedy_reference, load_reference_model, tokenizer_for

MAX_NEW = 8


@pytest.fixture(scope="module")
def many_loras(tiny_dir, lora_dirs, tmp_path_factory) -> dict[str, str]:
    """Seven real PEFT adapters of different ranks and targets."""
    root = tmp_path_factory.mktemp("many")
    extra = {
        f"extra{i}": make_lora(
            tiny_dir,
            str(root / f"extra{i}"),
            seed=20 + i,
            r=4 * (i + 1),
            target_modules=["q_proj", "v_proj", "down_proj"],
        )
        for i in range(3)
    }
    return {**lora_dirs, **extra}


@pytest.fixture(scope="module")
def references(tiny_dir, many_loras) -> dict[tuple[str, int], list[int]]:
    tokenizer = tokenizer_for(tiny_dir)
    table = {}
    for adapter in ["", *many_loras]:
        model = load_reference_model(tiny_dir, many_loras[adapter] if adapter else None)
        for i in range(2):
            table[adapter, i] = greedy_reference(
                model, tokenizer, tokenizer(PROMPTS[i])["input_ids"], MAX_NEW
            ).token_ids
    return table


def _config(tiny_dir, **overrides) -> ServerConfig:
    params = dict(
        model=tiny_dir, max_batch_size=6, max_seq_len=256, max_adapters=2, max_cpu_adapters=1, max_lora_rank=16
    )
    params.update(overrides)
    return ServerConfig.of(**params)


def _generate(target: str, adapter: str, prompt: int) -> list[int]:
    with Client(target, timeout=120) as client:
        return client.generate(PROMPTS[prompt], adapter_id=adapter, max_new_tokens=MAX_NEW).token_ids


def test_many_more_adapters_than_slots_under_concurrent_traffic(tiny_dir, many_loras, references):
    """7 adapters, 2 device slots, 1 host-cache place: every output still equals PEFT's."""
    with ServerThread(_config(tiny_dir)) as server:
        with Client(server.target, timeout=120) as client:
            for name, path in many_loras.items():
                client.load_adapter(name, path)
            states = {a.adapter_id: a.state for a in client.list_adapters()}
        assert sorted(states.values()).count("device") == 2 and "disk" in states.values()
        jobs = [(adapter, i % 2) for i, adapter in enumerate(["", *many_loras] * 4)]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = list(pool.map(lambda job: _generate(server.target, *job), jobs))
        for job, tokens in zip(jobs, results, strict=True):
            assert tokens == references[job], job
        metrics = server.server.metrics.registry
        assert metrics.get_sample_value("deltaserve_adapter_evictions_total") > 0
        served = {a.adapter_id: a.requests_served for a in Client(server.target).list_adapters()}
        assert all(served[name] == 4 for name in many_loras)


def test_pinned_adapter_is_never_evicted(tiny_dir, many_loras, references):
    with ServerThread(_config(tiny_dir)) as server, Client(server.target, timeout=120) as client:
        pinned = client.load_adapter("qv8", many_loras["qv8"], pin=True)
        assert pinned.state == "pinned" and pinned.pinned
        for name in ("pattern", "extra0", "extra1"):
            client.load_adapter(name, many_loras[name])
            assert _generate(server.target, name, 0) == references[name, 0]
        states = {a.adapter_id: a.state for a in client.list_adapters()}
        assert states["qv8"] == "pinned"
        with pytest.raises(DeltaserveError) as info:  # the one other slot cannot be pinned too
            client.pin_adapter("extra1")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.pin_adapter("qv8", False).state == "device"


def test_churn_beside_running_streams(tiny_dir, many_loras, references):
    """16 streams run while adapters are loaded, unloaded and replaced: none is lost, each is served with
    the weights its adapter id had when it started, and later requests see the new weights."""
    with ServerThread(_config(tiny_dir, max_adapters=3, max_batch_size=8)) as server:
        client = Client(server.target, timeout=120)
        client.load_adapter("swap", many_loras["qv8"])
        client.load_adapter("gone", many_loras["pattern"])
        streams = []
        for i in range(16):
            adapter = ("swap", "gone", "")[i % 3]
            expected = references[{"swap": "qv8", "gone": "pattern", "": ""}[adapter], i % 2]
            streams.append(
                (client.generate_stream(PROMPTS[i % 2], adapter_id=adapter, max_new_tokens=MAX_NEW), expected)
            )
        firsts = [next(stream) for stream, _ in streams]  # every request is admitted or queued with its weights
        client.load_adapter("swap", many_loras["all16_rs"], replace=True)
        client.unload_adapter("gone")
        for name in ("extra0", "extra1"):
            client.load_adapter(name, many_loras[name])
        client.unload_adapter("extra0")
        for first, (stream, expected) in zip(firsts, streams, strict=True):
            rest = list(stream)
            assert [t for c in [first, *rest] for t in c.token_ids] == expected
            assert rest[-1].finish_reason in ("length", "eos")
        assert _generate(server.target, "swap", 0) == references["all16_rs", 0]
        with pytest.raises(DeltaserveError) as info:
            _generate(server.target, "gone", 0)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        listed = {a.adapter_id for a in client.list_adapters()}
        assert listed == {"swap", "extra1"}  # drained adapters are gone once their requests finished


def test_load_refuses_duplicates_unless_replace(tiny_dir, many_loras):
    with ServerThread(_config(tiny_dir)) as server, Client(server.target, timeout=60) as client:
        client.load_adapter("a", many_loras["qv8"])
        with pytest.raises(DeltaserveError) as info:
            client.load_adapter("a", many_loras["pattern"])
        assert info.value.code == grpc.StatusCode.ALREADY_EXISTS and "replace" in info.value.message
        assert client.load_adapter("a", many_loras["pattern"], replace=True).rank == 8


def test_adapter_dir_registers_everything_at_start_up(tiny_dir, many_loras, references, tmp_path):
    for name in ("qv8", "extra2"):
        shutil.copytree(many_loras[name], tmp_path / name)
    (tmp_path / "not-an-adapter").mkdir()
    with ServerThread(_config(tiny_dir, adapter_dir=[str(tmp_path)])) as server:
        assert {a.adapter_id for a in Client(server.target).list_adapters()} == {"qv8", "extra2"}
        assert _generate(server.target, "extra2", 1) == references["extra2", 1]


# ---- the guarded admin surface --------------------------------------------------------------------------
def test_adapter_roots_confine_paths(tiny_dir, many_loras, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    inside = shutil.copytree(many_loras["qv8"], root / "good")
    outside = shutil.copytree(many_loras["qv8"], tmp_path / "outside")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with ServerThread(_config(tiny_dir, adapter_root=[str(root)])) as server, Client(server.target) as client:
        assert client.load_adapter("good", str(inside)).state == "device"
        for path in (str(outside), str(root / "escape"), f"{root}/../outside"):
            with pytest.raises(DeltaserveError) as info:
                client.load_adapter("bad", path)
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "--adapter-root" in info.value.message
        assert [a.adapter_id for a in client.list_adapters()] == ["good"]


def _as_pickle(src: str, dst) -> str:
    path = shutil.copytree(src, dst)
    torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    return str(path)


def test_pickle_refused_unless_allowed(tiny_dir, many_loras, references, tmp_path):
    pickled = _as_pickle(many_loras["qv8"], tmp_path / "pickled")
    with ServerThread(_config(tiny_dir)) as server, Client(server.target) as client:
        with pytest.raises(DeltaserveError) as info:
            client.load_adapter("p", pickled)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "--allow-pickle" in info.value.message
    with ServerThread(_config(tiny_dir, allow_pickle=True)) as server, Client(server.target) as client:
        client.load_adapter("p", pickled)
        assert _generate(server.target, "p", 0) == references["qv8", 0]


def test_limits_on_size_rank_and_request(tiny_dir, many_loras):
    config = _config(tiny_dir, max_adapter_bytes=45_000, max_lora_rank=8, max_request_bytes=10_000)
    with ServerThread(config) as server, Client(server.target, timeout=60) as client:
        with pytest.raises(DeltaserveError) as info:  # all-linear rank 16: ~131 kB of weights
            client.load_adapter("big", many_loras["all16_rs"])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-adapter-bytes" in info.value.message
        with pytest.raises(DeltaserveError) as info:  # rank 12, ~40 kB
            client.load_adapter("wide", many_loras["extra2"])
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--max-lora-rank 8" in info.value.message
        assert client.load_adapter("fits", many_loras["extra1"]).rank == 8
        with pytest.raises(DeltaserveError) as info:
            client.generate("word " * 5000, max_new_tokens=2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.generate(PROMPTS[0], max_new_tokens=2).generated_tokens == 2
        assert [a.adapter_id for a in client.list_adapters()] == ["fits"]


def test_admin_token_guards_the_adapters_service_only(tiny_dir, many_loras):
    with ServerThread(_config(tiny_dir, admin_token="s3cret")) as server:
        for metadata in (None, [("authorization", "Bearer wrong")]):
            with Client(server.target, metadata=metadata) as client, pytest.raises(DeltaserveError) as info:
                client.list_adapters()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in info.value.message
        with Client(server.target, metadata=[("authorization", "Bearer s3cret")]) as admin:
            admin.load_adapter("qv8", many_loras["qv8"])
        with Client(server.target) as anyone:  # Generation stays open
            assert anyone.generate(PROMPTS[0], adapter_id="qv8", max_new_tokens=2).generated_tokens == 2


def test_tls(tiny_dir, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    with ServerThread(_config(tiny_dir, tls_cert=str(cert), tls_key=str(key))) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with Client(f"localhost:{server.server.port}", channel_credentials=credentials, timeout=60) as client:
            assert client.generate(PROMPTS[0], max_new_tokens=2).generated_tokens == 2
        with Client(server.target, timeout=5) as plain, pytest.raises(DeltaserveError) as info:
            plain.generate(PROMPTS[0], max_new_tokens=2)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_eviction_waits_for_in_flight_requests(tiny_dir, many_loras, references):
    """With one slot, a request for a second adapter waits until the first adapter's requests finish."""
    with ServerThread(_config(tiny_dir, max_adapters=1)) as server, Client(server.target, timeout=120) as client:
        client.load_adapter("a", many_loras["qv8"])
        client.load_adapter("b", many_loras["pattern"])
        stream = client.generate_stream(PROMPTS[0], adapter_id="a", max_new_tokens=MAX_NEW)
        first = next(stream)
        result: list[list[int]] = []
        waiter = threading.Thread(target=lambda: result.append(_generate(server.target, "b", 0)))
        waiter.start()
        rest = list(stream)
        waiter.join(timeout=120)
        assert [t for c in [first, *rest] for t in c.token_ids] == references["qv8", 0]
        assert result == [references["pattern", 0]]
