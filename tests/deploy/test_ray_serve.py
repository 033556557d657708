"""deltaserve on Ray Serve (server/cluster/ray_serve.py), on a local Ray cluster started by the test: two replicas of
the tiny Llama, eight real PEFT LoRA adapters. Every answer must equal a single deltaserve server's for the
same request, and repeat requests for an adapter must land on the replica that loaded it."""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread, free_port, make_lora
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.server.test_tgis import TgisClient

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow

ADAPTERS = [f"lora{i}" for i in range(8)]
MAX_SEQ_LEN = 128
METRICS_PORT = [0]  # set by the `deployed` fixture
SMALL_METRICS_PORT = [0]  # set by the `small` fixture
RAY_METRICS_PORT = [0]  # set by the `ray_cluster` fixture
DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")
LORA_LOADS = r'deltaserve_adapter_loads_total\{kind="lora",result="ok"\} (\S+)'
RESIDENT = r"deltaserve_adapters_resident\{tier=\"[a-z]+\"\} (\S+)"
LONG, LONG_TOKENS = "long", 110  # requests long enough to be in flight when a replica is killed
GRPC_OPTIONS = {"max_new_tokens": 8, "logprobs": True}
LONG_OPTIONS = {"max_new_tokens": 60, "logprobs": True}
MIX = {"lora0": 0.7, "lora3": 0.3}
TGIS_REQUEST = {
    "adapter_id": "lora2",
    "requests": [{"text": PROMPTS[0]}, {"text": PROMPTS[1]}],
    "params": {"method": "GREEDY", "stopping": {"max_new_tokens": 8}},
}


def _post(
    base_url: str, model: str, prompt: str, max_tokens: int = 8, min_tokens: int = 0
) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, JSON answer, headers) of one greedy completion (min_tokens: no EOS before that many)."""
    fields = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "min_tokens": min_tokens}
    body = json.dumps(fields).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        status, raw, headers = err.code, err.read(), err.headers
    return status, json.loads(raw), {k.lower(): v for k, v in headers.items()}


def _complete(
    base_url: str, model: str, prompt: str, max_tokens: int = 8, min_tokens: int = 0
) -> tuple[str, dict[str, str]]:
    status, answer, headers = _post(base_url, model, prompt, max_tokens, min_tokens)
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
    return ServerConfig.of(
        model=tiny_dir,
        max_seq_len=MAX_SEQ_LEN,
        max_batch_size=4,
        max_adapters=8,
        adapter_root=[os.path.dirname(next(iter(adapter_dirs.values())))],
        preload=sorted(adapter_dirs.items()),
    )


@pytest.fixture(scope="module")
def reference(tiny_dir, adapter_dirs) -> dict:
    """What one plain deltaserve server (same adapters) answers: (model, prompt) -> HTTP completion text, and
    ("grpc", ...) / ("tgis", ...) keys for the gRPC calls the cluster must answer the same way."""
    config = _server_config(tiny_dir, adapter_dirs).replace(http_port=0)
    with ServerThread(config) as server:
        url = f"http://127.0.0.1:{server.server.http_port}"
        answers = {(model, p): _complete(url, model, p)[0] for model in ["base", *ADAPTERS] for p in PROMPTS[:2]}
        for model in ADAPTERS:
            answers[(model, LONG)] = _complete(url, model, PROMPTS[2], LONG_TOKENS, LONG_TOKENS)[0]
        with Client(server.target) as client:
            for adapter in ["", *ADAPTERS[:4]]:
                answers[("grpc", adapter)] = client.generate(PROMPTS[1], adapter_id=adapter, **GRPC_OPTIONS)
            answers[("grpc", "mix")] = client.generate(PROMPTS[1], adapter_mix=MIX, **GRPC_OPTIONS)
            answers[("grpc", "tokens")] = client.tokenize(PROMPTS[1])
            answers[("grpc", "info")] = client.model_info()
            for adapter in ADAPTERS[:3]:
                answers[("grpc-long", adapter)] = client.generate(PROMPTS[2], adapter_id=adapter, **LONG_OPTIONS)
        tgis = TgisClient(server.target)
        try:
            answers[("tgis", "lora2")] = tgis.ok("Generate", TGIS_REQUEST)
        finally:
            tgis.close()
        return answers


@dataclass
class Cluster:
    url: str  # Ray Serve's HTTP proxy
    grpc_target: str  # Ray Serve's gRPC proxy


@pytest.fixture(scope="module")
def ray_cluster(tiny_dir, adapter_dirs):
    """A local Ray cluster with Serve's HTTP and gRPC proxies; yields (http url, grpc target)."""
    from deltaserve.server.cluster.ray_grpc import SERVICER_FUNCTIONS

    started = time.monotonic()
    RAY_METRICS_PORT[0] = free_port()  # Ray's own metrics (Ray Serve's included), as `ray start --metrics-export-port`
    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning", _metrics_export_port=RAY_METRICS_PORT[0])
    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
    )
    print(f"ray + serve start-up: {time.monotonic() - started:.1f} s")
    yield Cluster(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def deployed(ray_cluster, tiny_dir, adapter_dirs) -> Cluster:
    """The `deltaserve` application: two replicas, each holding up to 8 adapters."""
    from deltaserve.server.cluster.ray_serve import ClusterConfig, build_app

    METRICS_PORT[0] = free_port()  # replica k serves its metrics on this port + k
    server = _server_config(tiny_dir, adapter_dirs).replace(metrics_port=METRICS_PORT[0], torch_threads=1)
    config = ClusterConfig(server=server, replicas=2, max_adapters_per_replica=8, replica_cpus=1)
    serve.run(build_app(config), name="deltaserve", route_prefix="/")
    return ray_cluster


@pytest.fixture
def cluster(deployed) -> str:
    return deployed.url


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


def test_the_ingress_bounds_bodies_and_a_replica_s_loopback_takes_no_adapters(cluster, adapter_dirs):
    """A body over --max-request-bytes is refused (413) before it is parsed; the replica's own loopback gRPC
    server, which any process on the node could reach, refuses adapter administration."""
    from ray import serve

    oversized = {"model": "base", "prompt": "x" * (5 << 20), "max_tokens": 1}
    status, answer = _admin(cluster, "/v1/completions", oversized)
    assert status == 413 and "--max-request-bytes" in answer["error"]["message"]
    stats = serve.get_deployment_handle("DeltaserveReplica", app_name="deltaserve").stats.remote().result()
    with Client(f"127.0.0.1:{stats['loopback_port']}", timeout=30) as client:
        with pytest.raises(DeltaserveError) as info:
            client.load_adapter("sneaked", adapter_dirs["lora0"])
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert client.generate(PROMPTS[0], max_new_tokens=2).generated_tokens == 2  # generation stays open


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


def _same_generation(got, expected) -> None:
    """Equal tokens and text; logprobs within 1e-4 relative (another batch may round fp32 sums differently)."""
    assert got.text == expected.text
    assert list(got.token_ids) == list(expected.token_ids)
    assert got.finish_reason == expected.finish_reason
    assert len(got.logprobs) == len(expected.logprobs) > 0
    for a, b in zip(got.logprobs, expected.logprobs, strict=True):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), (got.logprobs, expected.logprobs)


def _wait_until_running(port: int, timeout: float = 30.0) -> None:
    """Until the replica serving /metrics on `port` reports a request decoding."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        if re.search(r"^deltaserve_requests_running (?!0\.0$)", text, re.MULTILINE):
            return
        time.sleep(0.01)
    raise AssertionError(f"no request started decoding on the replica with metrics port {port}")


def _served_by_replica() -> dict[int, set[str]]:
    """Adapters with finished requests, per replica of the `deltaserve` app (each replica's own /metrics)."""
    served = {}
    for port in (METRICS_PORT[0], METRICS_PORT[0] + 1):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        served[port] = set(re.findall(r'deltaserve_requests_total\{adapter="(lora\d)"', text))
    return served


def test_grpc_through_the_serve_proxy_matches_a_single_server(deployed, reference):
    # An unmodified deltaserve client, no Ray metadata: the ingress routes by the request's adapter_id.
    with Client(deployed.grpc_target, timeout=120) as client:
        client.wait_ready(60)  # the standard health service, answered through the proxy
        with grpc.insecure_channel(deployed.grpc_target) as channel:  # server reflection, as grpcurl uses it
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"deltaserve.v1.Generation", "deltaserve.v1.Adapters", "fmaas.GenerationService"} <= services
        for adapter in ["", *ADAPTERS[:4]]:
            got = client.generate(PROMPTS[1], adapter_id=adapter, **GRPC_OPTIONS)
            _same_generation(got, reference[("grpc", adapter)])
        chunks = list(client.generate_stream(PROMPTS[1], adapter_id="lora1", **GRPC_OPTIONS))
        expected = reference[("grpc", "lora1")]
        assert len(chunks) > 1
        assert "".join(chunk.text for chunk in chunks) == expected.text
        assert [t for chunk in chunks for t in chunk.token_ids] == list(expected.token_ids)
        assert chunks[-1].finish_reason == expected.finish_reason
        _same_generation(client.generate(PROMPTS[1], adapter_mix=MIX, **GRPC_OPTIONS), reference[("grpc", "mix")])
        assert client.tokenize(PROMPTS[1]) == reference[("grpc", "tokens")]
        assert client.model_info() == reference[("grpc", "info")]

        # Bad requests: the single server's status and message, through the proxy; nothing else breaks.
        half_missing = {"lora0": 1.0, "nope": 1.0}
        refused = [
            (lambda: client.generate(PROMPTS[0], adapter_id="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
            (lambda: list(client.generate_stream(PROMPTS[0], adapter_id="nope")), grpc.StatusCode.NOT_FOUND, "nope"),
            (lambda: client.generate(PROMPTS[0], temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
            (lambda: client.generate(PROMPTS[0], adapter_mix=half_missing), grpc.StatusCode.NOT_FOUND, "nope"),
            (lambda: client.merge_adapter("lora0"), grpc.StatusCode.UNIMPLEMENTED, "MergeAdapter"),
            (lambda: client.load_adapter("x", "/tmp", pin=True), grpc.StatusCode.FAILED_PRECONDITION, "pin"),
        ]
        for call, code, named in refused:
            with pytest.raises(DeltaserveError) as err:
                call()
            assert err.value.code == code, err.value
            assert named in err.value.message, err.value
        _same_generation(client.generate(PROMPTS[1], adapter_id="lora2", **GRPC_OPTIONS), reference[("grpc", "lora2")])

    # gRPC traffic kept the HTTP traffic's affinity: still no adapter served by both replicas.
    served = _served_by_replica()
    assert not served[METRICS_PORT[0]] & served[METRICS_PORT[0] + 1], served


def test_grpc_adapter_admin_changes_the_shared_catalog(deployed, reference, adapter_dirs):
    with Client(deployed.grpc_target, timeout=120) as client:
        info = client.load_adapter("grpc-extra", adapter_dirs["lora2"])
        assert (info.adapter_id, info.state) == ("grpc-extra", "disk")
        assert "grpc-extra" in [a.adapter_id for a in client.list_adapters()]
        got = client.generate(PROMPTS[1], adapter_id="grpc-extra", **GRPC_OPTIONS)
        _same_generation(got, reference[("grpc", "lora2")])
        for call, code in [
            (lambda: client.load_adapter("grpc-extra", adapter_dirs["lora1"]), grpc.StatusCode.ALREADY_EXISTS),
            (lambda: client.load_adapter("outside", "/etc"), grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(DeltaserveError) as err:
                call()
            assert err.value.code == code, err.value
        client.unload_adapter("grpc-extra")
        with pytest.raises(DeltaserveError) as err:
            client.generate(PROMPTS[1], adapter_id="grpc-extra")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_a_tgis_client_through_the_serve_proxy_matches_a_single_server(deployed, reference):
    tgis = TgisClient(deployed.grpc_target)  # vllm-tgis-adapter's own stubs, in their own process
    try:
        assert tgis.ok("Generate", TGIS_REQUEST) == reference[("tgis", "lora2")]
        code, details = tgis.error("Generate", {**TGIS_REQUEST, "adapter_id": "nope"})
        assert code == "NOT_FOUND" and "nope" in details
    finally:
        tgis.close()


def test_a_streamed_completion_through_the_cluster_equals_the_single_server(cluster, reference):
    body = {"model": "lora3", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        f"{cluster}/v1/completions", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts = [json.loads(event)["choices"][0]["text"] for event in events[:-1]]
    assert len(texts) > 1
    assert "".join(texts) == reference[("lora3", PROMPTS[0])]


def test_one_prometheus_config_scrapes_every_replica_and_ray_serve_multiplexing(deployed, tmp_path):
    """deploy/ray/prometheus.yml as shipped, with this test's ports: each replica's deltaserve series (one
    `instance` per replica) and Ray Serve's multiplexing series come back from one real Prometheus."""
    import yaml

    from tests.deploy.test_prometheus import Prometheus, _binary

    binary = _binary("prometheus")
    with open(os.path.join(DEPLOY, "ray", "prometheus.yml")) as file:
        config = yaml.safe_load(file)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    replicas = [f"127.0.0.1:{METRICS_PORT[0] + rank}" for rank in (0, 1)]
    jobs["deltaserve"]["static_configs"] = [{"targets": replicas}]
    # What the Ray head writes to its service discovery file (with the dashboard on): the nodes' export ports.
    discovery = tmp_path / "prom_metrics_service_discovery.json"
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{RAY_METRICS_PORT[0]}"]}]))
    jobs["ray"]["file_sd_configs"] = [{"files": [str(discovery)]}]
    prometheus = Prometheus(binary, "", tmp_path, config_text=yaml.safe_dump(config))
    try:
        per_replica = 'sum by (instance) (deltaserve_requests_total{job="deltaserve", adapter=~"lora.*"})'
        prometheus.wait(lambda: len(prometheus.query(per_replica)["data"]["result"]) == 2, "replicas not scraped")
        assert {series["metric"]["instance"] for series in prometheus.query(per_replica)["data"]["result"]} == set(
            replicas
        )
        resident = 'ray_serve_num_multiplexed_models{job="ray", application="deltaserve"}'
        prometheus.wait(lambda: len(prometheus.query(resident)["data"]["result"]) == 2, "no Ray Serve series", 90)
        for series in prometheus.query(resident)["data"]["result"]:
            assert float(series["value"][1]) >= 1, series  # each replica holds adapters (Ray Serve's own count)
        loads = 'sum(ray_serve_multiplexed_models_load_counter_total{application="deltaserve"})'
        assert prometheus.scalar(loads) >= len(ADAPTERS)
        for title, expr in _replica_row_expressions():
            if "unload" in expr:  # no adapter was evicted in this application: Ray exports no unload series yet
                continue
            answer = prometheus.query(expr)
            assert answer["status"] == "success", (title, answer)
            # rate() needs two scrapes of a series: wait for them rather than query once.
            prometheus.wait(
                lambda expr=expr: len(prometheus.query(expr)["data"]["result"]) == 2,
                f"{title}: {expr} should give one series per replica",
                timeout=30,
            )
    finally:
        prometheus.stop()


def _replica_row_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for the dashboard's "Replicas (Ray Serve)" row."""
    from tests.deploy.test_prometheus import DASHBOARD, GRAFANA_VARIABLES

    panels = json.loads(DASHBOARD.read_text())["panels"]
    start = next(i for i, panel in enumerate(panels) if panel["title"] == "Replicas (Ray Serve)")
    end = next((i for i in range(start + 1, len(panels)) if panels[i]["type"] == "row"), len(panels))
    found = []
    for panel in panels[start + 1 : end]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    assert len(found) >= 8, found
    return found


def test_a_killed_replica_is_restarted_and_only_its_in_flight_requests_fail(cluster, reference):
    home = {adapter: _complete(cluster, adapter, PROMPTS[0])[1]["x-deltaserve-replica"] for adapter in ADAPTERS}
    victim = home[ADAPTERS[0]]
    actor = ray.get_actor(f"SERVE_REPLICA::deltaserve#DeltaserveReplica#{victim}", namespace="serve")

    def long_request(adapter: str) -> tuple[int, dict, dict[str, str]]:
        # Every long request runs all its steps (no early EOS), so those on the victim are in flight together.
        return _post(cluster, adapter, PROMPTS[2], LONG_TOKENS, LONG_TOKENS)

    # The victim's metrics port: a replica that served ADAPTERS[0] (both, if a mix loaded it on both).
    ports = [port for port, adapters in _served_by_replica().items() if ADAPTERS[0] in adapters]
    with ThreadPoolExecutor(len(ADAPTERS)) as pool:
        futures = {adapter: pool.submit(long_request, adapter) for adapter in ADAPTERS}
        for port in ports:  # killed mid-decode, whatever the machine's speed
            _wait_until_running(port)
        ray.kill(actor, no_restart=True)
        results = {adapter: future.result() for adapter, future in futures.items()}

    failed = [adapter for adapter, (status, _, _) in results.items() if status != 200]
    assert failed, "no request was in flight on the killed replica: the test proves nothing"
    for adapter, (status, answer, headers) in results.items():
        if status == 200:
            assert answer["choices"][0]["text"] == reference[(adapter, LONG)], adapter
            assert headers["x-deltaserve-replica"] != victim
        else:
            assert status == 503, answer
            assert answer["error"]["code"] == "unavailable"
            # It was in flight on the killed replica (routing is a preference: an adapter that an earlier mix
            # loaded on both replicas may run on either, so the adapter's first home does not say which).
            assert actor._actor_id.hex() in answer["error"]["message"], f"{adapter} failed elsewhere: {answer}"

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


@pytest.fixture(scope="module")
def small(ray_cluster, tiny_dir, adapter_dirs) -> Client:
    """A second application, `small`: one adapter per replica and autoscaling 1..2 replicas on queue depth (one
    request in flight per replica is the target). Reached over gRPC with Ray's `application` metadata."""
    from deltaserve.server.cluster.ray_serve import ClusterConfig, build_app

    SMALL_METRICS_PORT[0] = free_port()
    server = _server_config(tiny_dir, adapter_dirs).replace(metrics_port=SMALL_METRICS_PORT[0])
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 1,
        "downscale_delay_s": 600,
    }
    config = ClusterConfig(
        server=server.replace(torch_threads=1), max_adapters_per_replica=1, replica_cpus=1, autoscaling=autoscaling
    )
    serve.run(build_app(config), name="small", route_prefix="/small")
    with Client(ray_cluster.grpc_target, timeout=120, metadata=[("application", "small")]) as client:
        yield client


def _small_replicas() -> dict[str, int]:
    return serve.status().applications["small"].deployments["DeltaserveReplica"].replica_states


def test_adapters_evicted_while_in_use_finish_their_requests(small, reference):
    # Three adapters at once on at most two replicas that each keep one: Ray Serve's LRU evicts adapters that
    # requests on the replica still use. Those requests must finish with their adapter (no NOT_FOUND).
    adapters = ADAPTERS[:3]
    for _ in range(3):
        with ThreadPoolExecutor(len(adapters)) as pool:
            results = pool.map(lambda a: small.generate(PROMPTS[2], adapter_id=a, **LONG_OPTIONS), adapters)
            for adapter, got in zip(adapters, results, strict=True):
                _same_generation(got, reference[("grpc-long", adapter)])
    loads = 0
    for port in range(SMALL_METRICS_PORT[0], SMALL_METRICS_PORT[0] + _small_replicas().get("RUNNING", 1)):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        loads += sum(float(n) for n in re.findall(LORA_LOADS, text))
        # Idle again, each replica holds no more adapters than Ray Serve's LRU allows it (evictions deferred
        # while in use were carried out when their last request ended).
        assert sum(float(n) for n in re.findall(RESIDENT, text)) <= 1, text
    assert loads > len(adapters), "no adapter was evicted and loaded again: the test proves nothing"


def test_autoscaling_adds_a_replica_when_requests_queue(small):
    deadline = time.monotonic() + 120
    with ThreadPoolExecutor(4) as pool:
        while _small_replicas().get("RUNNING", 0) < 2 and time.monotonic() < deadline:
            list(pool.map(lambda a: small.generate(PROMPTS[2], adapter_id=a, max_new_tokens=40), ADAPTERS[:4]))
    assert _small_replicas().get("RUNNING", 0) == 2, _small_replicas()


def test_the_serve_config_files_validate_and_build(tmp_path):
    import yaml
    from deltaserve.server.cluster.ray_grpc import SERVICER_FUNCTIONS
    from deltaserve.server.cluster.ray_serve import app_from_args
    from ray.serve.schema import ServeDeploySchema

    deploy = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")
    with open(os.path.join(deploy, "ray", "serve.yaml")) as file:
        config = yaml.safe_load(file)
    with open(os.path.join(deploy, "kubernetes", "rayservice.yaml")) as file:
        kuberay = yaml.safe_load(yaml.safe_load(file)["spec"]["serveConfigV2"])
    for each in (config, kuberay):
        ServeDeploySchema.model_validate(each)
        args = dict(each["applications"][0]["args"], adapter_dir=str(tmp_path), adapter_root=str(tmp_path))
        assert each["applications"][0]["import_path"] == "deltaserve.server.cluster.ray_serve:app_from_args"
        app_from_args(args)  # every argument is understood
        assert each["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS
