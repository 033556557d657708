"""Ray Serve scale-out with an S3 source: two replicas of the tiny Llama on a local Ray cluster, no adapter
loaded or registered anywhere, no shared disk (each replica downloads into its own temporary cache), and a
real S3-compatible store on loopback (moto's server). Every adapter is served by the cluster, its tokens
equal PEFT's, and both replicas download adapters from the store."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
import torch
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, free_port, make_lora
from safetensors.torch import load_file, save

from tests.references import greedy_reference, load_reference_model, tokenizer_for
from tests.server.test_s3_source import monkeypatch_module, moto  # noqa: F401 (fixtures)

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow

BUCKET, PREFIX = "cluster-adapters", "lib"
NAMES = [f"ray-{i}" for i in range(6)]
MAX_NEW = 4
DOWNLOADS = r'deltaserve_adapter_source_downloads_total\{outcome="ok",source="[^"]+"\} (\S+)'


@pytest.fixture(scope="module")
def library(moto, tiny_dir, tmp_path_factory):  # noqa: F811
    import boto3

    root = tmp_path_factory.mktemp("ray-s3")
    first = make_lora(tiny_dir, str(root / NAMES[0]), seed=90, r=2, target_modules=["q_proj", "v_proj"])
    template = load_file(f"{first}/adapter_model.safetensors")
    config = (root / NAMES[0] / "adapter_config.json").read_bytes()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    folders = {}
    for i, name in enumerate(NAMES):
        generator = torch.Generator().manual_seed(300 + i)
        weights = save({k: torch.randn(v.shape, generator=generator) * 0.5 for k, v in template.items()})
        (root / name).mkdir(exist_ok=True)
        (root / name / "adapter_model.safetensors").write_bytes(weights)
        (root / name / "adapter_config.json").write_bytes(config)
        for file, body in (("adapter_config.json", config), ("adapter_model.safetensors", weights)):
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}/{file}", Body=body)
        folders[name] = str(root / name)
    return folders


@pytest.fixture(scope="module")
def cluster(library, tiny_dir):
    """Ray started after the store's environment is set, so the replicas inherit AWS_ENDPOINT_URL and keys."""
    from deltaserve.server.cluster.ray_grpc import SERVICER_FUNCTIONS
    from deltaserve.server.cluster.ray_serve import ClusterConfig, build_app

    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning")
    grpc_port, metrics_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
    )
    server = ServerConfig.of(
        model=tiny_dir,
        max_seq_len=128,
        max_batch_size=4,
        max_adapters=8,
        torch_threads=1,
        metrics_port=metrics_port,
        adapter_source=[f"s3://{BUCKET}/{PREFIX}"],
    )
    serve.run(build_app(ClusterConfig(server=server, replicas=2, replica_cpus=1)), name="deltaserve", route_prefix="/")
    yield f"127.0.0.1:{grpc_port}", metrics_port
    serve.shutdown()
    ray.shutdown()


def _replica_downloads(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(float(value) for value in re.findall(DOWNLOADS, text))


def test_two_replicas_serve_every_adapter_from_the_store(cluster, library, tiny_dir):
    target, metrics_port = cluster
    from peft import PeftModel

    tokenizer = tokenizer_for(tiny_dir)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    expected = {}
    for name in NAMES:
        model = PeftModel.from_pretrained(load_reference_model(tiny_dir), library[name]).eval()
        expected[name] = greedy_reference(model, tokenizer, ids, MAX_NEW).token_ids
    assert len({tuple(t) for t in expected.values()}) == len(NAMES)  # the adapters differ: equality means something
    with Client(target, timeout=120, metadata=[("application", "deltaserve")]) as client:
        deadline = time.monotonic() + 120
        while True:  # both replicas take requests; keep asking until each downloaded from the store
            for name in NAMES:
                assert client.generate(PROMPTS[0], adapter_id=name, max_new_tokens=MAX_NEW).token_ids == expected[name]
            downloads = [_replica_downloads(metrics_port + k) for k in range(2)]
            if all(downloads) or time.monotonic() > deadline:
                break
    assert all(count > 0 for count in downloads), downloads
    assert sum(downloads) >= len(NAMES)
