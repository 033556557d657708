"""A real S3-compatible store on loopback (moto's standalone server, a subprocess) holds 50 adapters; the
server starts with only `--adapter-source s3://...` and serves every name on first use, through s3fs and
the standard AWS environment (AWS_ENDPOINT_URL, keys). A missing name, a corrupt object and a store that
stops each fail only their own requests."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread, free_port, make_lora
from safetensors.torch import load_file, save

from tests.references import greedy_reference, load_reference_model, tokenizer_for

pytestmark = pytest.mark.slow

BUCKET, PREFIX, NAMES = "adapters", "library", [f"task-{i:02d}" for i in range(50)]
MAX_NEW = 4


@pytest.fixture(scope="module")
def moto(monkeypatch_module):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.1)
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch_module.setenv(key, value)
    yield process
    process.kill()
    process.wait(10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def library(moto, tiny_dir, tmp_path_factory) -> dict[str, str]:
    """50 real PEFT LoRA folders (one saved by PEFT, the others with its keys and config and fresh random
    values), uploaded to the store; returns name -> local folder (for the PEFT references)."""
    import boto3

    root = tmp_path_factory.mktemp("library")
    first = make_lora(tiny_dir, str(root / NAMES[0]), seed=70, r=2, target_modules=["q_proj", "v_proj"])
    template = load_file(os.path.join(first, "adapter_model.safetensors"))
    config = (root / NAMES[0] / "adapter_config.json").read_bytes()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    folders = {}
    for i, name in enumerate(NAMES):
        generator = torch.Generator().manual_seed(100 + i)
        tensors = {k: torch.randn(v.shape, generator=generator) * 0.5 for k, v in template.items()}
        weights = save(tensors)
        folder = root / name
        folder.mkdir(exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        (folder / "adapter_config.json").write_bytes(config)
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}/adapter_config.json", Body=config)
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}/adapter_model.safetensors", Body=weights)
        folders[name] = str(folder)
    broken = json.loads(config)
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/corrupt/adapter_config.json", Body=json.dumps(broken).encode())
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/corrupt/adapter_model.safetensors", Body=b"\x10\x00" + os.urandom(500))
    return folders


@pytest.fixture(scope="module")
def server(library, tiny_dir, tmp_path_factory):
    config = ServerConfig.of(
        model=tiny_dir,
        max_batch_size=8,
        max_seq_len=128,
        max_adapters=8,
        adapter_source=[f"s3://{BUCKET}/{PREFIX}"],
        adapter_cache_dir=str(tmp_path_factory.mktemp("cache")),
        adapter_refresh_s=3600.0,
        adapter_download_timeout_s=20.0,
    )
    with ServerThread(config) as running:
        yield running


def _downloads(server, outcome: str = "ok") -> float:
    source = f"s3://{BUCKET}/{PREFIX}"
    return server.server.metrics.source_downloads.labels(source, outcome)._value.get()


def test_ten_simultaneous_first_requests_cause_one_download(server):
    before = _downloads(server)
    with ThreadPoolExecutor(10) as pool, Client(server.target, timeout=60) as client:
        outputs = list(
            pool.map(lambda _: client.generate(PROMPTS[0], adapter_id=NAMES[7], max_new_tokens=MAX_NEW), range(10))
        )
    assert len({tuple(o.token_ids) for o in outputs}) == 1
    assert _downloads(server) - before == 1


def test_200_zipf_requests_over_50_names_all_served_and_equal_peft(server, library, tiny_dir):
    rng = random.Random(5)
    weights = [1 / (rank + 1) for rank in range(len(NAMES))]
    picks = rng.choices(NAMES, weights=weights, k=200)
    picks[:50] = NAMES  # every name at least once, in a shuffled order
    rng.shuffle(picks)
    with ThreadPoolExecutor(8) as pool, Client(server.target, timeout=120) as client:
        outputs = list(
            pool.map(
                lambda item: (
                    item[1],
                    client.generate(PROMPTS[item[0] % 4], adapter_id=item[1], max_new_tokens=MAX_NEW),
                ),
                enumerate(picks),
            )
        )
    assert len(outputs) == 200 and all(len(o.token_ids) == MAX_NEW for _, o in outputs)
    listed = {a.adapter_id: a for a in Client(server.target).list_adapters()}
    assert set(NAMES) <= set(listed) and all(listed[n].source.startswith("s3://") for n in NAMES)
    assert len({listed[n].content_hash for n in NAMES}) == len(NAMES)
    tokenizer = tokenizer_for(tiny_dir)
    from peft import PeftModel

    sampled = random.Random(9).sample(NAMES, 5)
    for name in sampled:
        model = PeftModel.from_pretrained(load_reference_model(tiny_dir), library[name]).eval()
        for i, (picked, output) in enumerate(outputs):
            if picked == name:
                ids = tokenizer(PROMPTS[i % 4])["input_ids"]
                assert output.token_ids == greedy_reference(model, tokenizer, ids, MAX_NEW).token_ids
                break


def test_missing_and_corrupt_names_fail_alone(server):
    with Client(server.target, timeout=60) as client:
        with pytest.raises(DeltaserveError) as info:
            client.generate(PROMPTS[0], adapter_id="no-such-task", max_new_tokens=2)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(DeltaserveError) as info:
            client.generate(PROMPTS[0], adapter_id="corrupt", max_new_tokens=2)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "corrupt" in info.value.message and server.server.adapter_cache.directory not in info.value.message
        assert len(client.generate(PROMPTS[0], adapter_id=NAMES[3], max_new_tokens=2).token_ids) == 2
        assert len(client.generate(PROMPTS[0], max_new_tokens=2).token_ids) == 2


def test_a_stopped_store_fails_only_new_names(server, moto, library):
    with Client(server.target, timeout=60) as client:
        loaded = client.generate(PROMPTS[1], adapter_id=NAMES[1], max_new_tokens=MAX_NEW).token_ids
        moto.kill()
        moto.wait(10)
        server.server.registry.unload(NAMES[2])  # a name the server knew: it must be fetched again
        for name in (NAMES[2], "never-seen"):
            with pytest.raises(DeltaserveError) as info:
                client.generate(PROMPTS[1], adapter_id=name, max_new_tokens=2)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value.message
        assert client.generate(PROMPTS[1], adapter_id=NAMES[1], max_new_tokens=MAX_NEW).token_ids == loaded
        assert len(client.generate(PROMPTS[1], max_new_tokens=2).token_ids) == 2
