"""deltaserve on Ray Serve (server/ray_serve.py), on a local Ray cluster started by the test: two replicas of
the tiny Llama, eight real PEFT LoRA adapters. Every answer must equal a single deltaserve server's for the
same request, and repeat requests for an adapter must land on the replica that loaded it."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from deltaserve.server.app import ServerConfig

from tests.helpers import PROMPTS, ServerThread, make_lora

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow

ADAPTERS = [f"lora{i}" for i in range(8)]
MAX_SEQ_LEN = 128
METRICS_PORT = [0]  # set by the cluster fixture
LONG, LONG_TOKENS = "long", 110  # requests long enough to be in flight when a replica is killed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(base_url: str, model: str, prompt: str, max_tokens: int = 8) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, JSON answer, headers) of one greedy completion."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        status, raw, headers = err.code, err.read(), err.headers
    return status, json.loads(raw), {k.lower(): v for k, v in headers.items()}


def _complete(base_url: str, model: str, prompt: str, max_tokens: int = 8) -> tuple[str, dict[str, str]]:
    status, answer, headers = _post(base_url, model, prompt, max_tokens)
    assert status == 200, answer
    return answer["choices"][0]["text"], headers


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ray-loras")
    return {
        name: make_lora(
            tiny_dir, str(root / name), seed=100 + i, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        )
        for i, name in enumerate(ADAPTERS)
    }


def _server_config(tiny_dir: str, adapter_dirs: dict[str, str]) -> ServerConfig:
    return ServerConfig(
        model=tiny_dir,
        max_seq_len=MAX_SEQ_LEN,
        max_batch_size=4,
        max_adapters=8,
        adapter_root=[os.path.dirname(next(iter(adapter_dirs.values())))],
        preload=sorted(adapter_dirs.items()),
    )


@pytest.fixture(scope="module")
def reference(tiny_dir, adapter_dirs) -> dict[tuple[str, str], str]:
    """(model, prompt) -> text from one plain deltaserve server (HTTP front door, same adapters)."""
    config = _server_config(tiny_dir, adapter_dirs)
    config.http_port = 0
    with ServerThread(config) as server:
        url = f"http://127.0.0.1:{server.server.http_port}"
        answers = {(model, p): _complete(url, model, p)[0] for model in ["base", *ADAPTERS] for p in PROMPTS[:2]}
        for model in ADAPTERS:
            answers[(model, LONG)] = _complete(url, model, PROMPTS[2], LONG_TOKENS)[0]
        return answers


@pytest.fixture(scope="module")
def cluster(tiny_dir, adapter_dirs):
    from deltaserve.server.ray_serve import ClusterConfig, build_app

    started = time.monotonic()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    server = _server_config(tiny_dir, adapter_dirs)
    server.metrics_port = METRICS_PORT[0] = _free_port()  # replica k serves its metrics on this port + k
    config = ClusterConfig(
        server=server,
        replicas=2,
        max_adapters_per_replica=8,
        replica_cpus=1,
        torch_threads=1,
    )
    serve.run(build_app(config), name="deltaserve", route_prefix="/")
    print(f"ray + serve start-up: {time.monotonic() - started:.1f} s")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_outputs_match_a_single_server_and_requests_follow_their_adapter(cluster, reference):
    # The adapters really change the output, so equality below is not vacuous.
    differing = [a for a in ADAPTERS if reference[(a, PROMPTS[0])] != reference[("base", PROMPTS[0])]]
    assert len(differing) >= 6, differing

    # First request per adapter, all at once: Ray Serve places each adapter on some replica.
    with ThreadPoolExecutor(8) as pool:
        first = dict(zip(ADAPTERS, pool.map(lambda a: _complete(cluster, a, PROMPTS[0]), ADAPTERS), strict=True))
    home = {}
    for adapter, (text, headers) in first.items():
        assert text == reference[(adapter, PROMPTS[0])], adapter
        home[adapter] = headers["x-deltaserve-replica"]
    assert len(set(home.values())) == 2, f"the traffic should spread over both replicas: {home}"

    time.sleep(2)  # replicas report their resident adapters to the controller; routers learn it by long poll
    for _ in range(2):
        for adapter in ADAPTERS:
            for prompt in PROMPTS[:2]:
                text, headers = _complete(cluster, adapter, prompt)
                assert text == reference[(adapter, prompt)], (adapter, prompt)
                assert headers["x-deltaserve-replica"] == home[adapter], f"{adapter} left its replica"
                assert headers["x-deltaserve-adapter-loads"] == "1", f"{adapter} was loaded again"
    for prompt in PROMPTS[:2]:
        assert _complete(cluster, "base", prompt)[0] == reference[("base", prompt)]

    # Each replica's own deltaserve metrics show the same affinity: an adapter's requests on one replica only.
    ports = [METRICS_PORT[0], METRICS_PORT[0] + 1]
    served = {}
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        served[port] = set(re.findall(r'deltaserve_requests_total\{adapter="(lora\d)"', text))
    assert served[ports[0]] | served[ports[1]] == set(ADAPTERS), served
    assert not served[ports[0]] & served[ports[1]], served
    assert sorted(len(s) for s in served.values()) == sorted(list(home.values()).count(r) for r in set(home.values()))


def _admin(base_url: str, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{base_url}{path}", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_registering_replacing_and_unregistering_reach_every_replica(cluster, reference, adapter_dirs):
    prompt = PROMPTS[0]
    assert (
        _admin(cluster, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": adapter_dirs["lora0"]})[0] == 200
    )
    assert _complete(cluster, "extra", prompt)[0] == reference[("lora0", prompt)]
    models = json.loads(urllib.request.urlopen(f"{cluster}/v1/models", timeout=30).read())
    assert "extra" in [card["id"] for card in models["data"]]

    status, _ = _admin(cluster, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": adapter_dirs["lora1"]})
    assert status == 409  # registered already: replacing needs load_inplace
    replace = {"lora_name": "extra", "lora_path": adapter_dirs["lora1"], "load_inplace": True}
    assert _admin(cluster, "/v1/load_lora_adapter", replace)[0] == 200
    for _ in range(4):  # whichever replica answers, it serves the new weights
        assert _complete(cluster, "extra", prompt)[0] == reference[("lora1", prompt)]

    assert _admin(cluster, "/v1/unload_lora_adapter", {"lora_name": "extra"})[0] == 200
    for _ in range(4):
        status, answer, _ = _post(cluster, "extra", prompt)
        assert status == 404, answer
        assert answer["error"]["code"] == "model_not_found"
    outside = {"lora_name": "elsewhere", "lora_path": "/etc"}
    assert _admin(cluster, "/v1/load_lora_adapter", outside)[0] == 403  # paths stay under the allowed roots


def test_a_killed_replica_is_restarted_and_only_its_in_flight_requests_fail(cluster, reference):
    home = {adapter: _complete(cluster, adapter, PROMPTS[0])[1]["x-deltaserve-replica"] for adapter in ADAPTERS}
    victim = home[ADAPTERS[0]]
    survivors = [adapter for adapter in ADAPTERS if home[adapter] != victim]
    actor = ray.get_actor(f"SERVE_REPLICA::deltaserve#DeltaserveReplica#{victim}", namespace="serve")

    def long_request(adapter: str) -> tuple[int, dict, dict[str, str]]:
        return _post(cluster, adapter, PROMPTS[2], LONG_TOKENS)

    with ThreadPoolExecutor(len(ADAPTERS)) as pool:
        futures = {adapter: pool.submit(long_request, adapter) for adapter in ADAPTERS}
        time.sleep(0.3)
        ray.kill(actor, no_restart=True)
        results = {adapter: future.result() for adapter, future in futures.items()}

    failed = [adapter for adapter, (status, _, _) in results.items() if status != 200]
    assert failed, "no request was in flight on the killed replica: the test proves nothing"
    for adapter, (status, answer, _) in results.items():
        if status == 200:
            assert answer["choices"][0]["text"] == reference[(adapter, LONG)], adapter
        else:
            assert status == 503, answer
            assert answer["error"]["code"] == "unavailable"
            assert home[adapter] == victim, f"{adapter} failed but its replica was not killed"
    assert not set(failed) & set(survivors)

    deadline = time.monotonic() + 60
    for adapter in failed:  # retried, they succeed (on the survivor or on the restarted replica)
        while True:
            status, answer, _ = long_request(adapter)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == 200, answer
        assert answer["choices"][0]["text"] == reference[(adapter, LONG)], adapter

    while True:  # Ray Serve replaces the dead replica
        replicas = serve.status().applications["deltaserve"].deployments["DeltaserveReplica"].replica_states
        if replicas.get("RUNNING", 0) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert replicas.get("RUNNING", 0) == 2, replicas


def test_the_serve_config_files_validate_and_build(tmp_path):
    import yaml
    from deltaserve.server.ray_serve import app_from_args
    from ray.serve.schema import ServeDeploySchema

    deploy = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")
    with open(os.path.join(deploy, "ray", "serve.yaml")) as file:
        config = yaml.safe_load(file)
    with open(os.path.join(deploy, "kubernetes", "rayservice.yaml")) as file:
        kuberay = yaml.safe_load(yaml.safe_load(file)["spec"]["serveConfigV2"])
    for each in (config, kuberay):
        ServeDeploySchema.model_validate(each)
        args = dict(each["applications"][0]["args"], adapter_dir=str(tmp_path), adapter_root=str(tmp_path))
        assert each["applications"][0]["import_path"] == "deltaserve.server.ray_serve:app_from_args"
        app_from_args(args)  # every argument is understood
