"""A real Prometheus (Debian's `prometheus` package) scraping a live deltaserve: PromQL answers through the
HTTP API, and every expression of the Grafana dashboard parsed by it and naming only exported series."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "deltaserve.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
# Values for the Grafana variables the dashboard uses.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$adapter": ".*", "$replica": ".*"}


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: `make test` installs Debian's prometheus package")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


class Prometheus:
    def __init__(self, binary: str, scrape_target: str, workdir: Path, config_text: str | None = None) -> None:
        """Scrapes `scrape_target` every second as job `deltaserve`, or runs `config_text` when given."""
        config = workdir / "prometheus.yml"
        config.write_text(
            config_text
            or "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: deltaserve\n    static_configs:\n      - targets: ['{scrape_target}']\n"
        )
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait(lambda: self._get("/-/ready", raw=True) is not None, "prometheus did not become ready")

    def _get(self, path: str, raw: bool = False):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                body = response.read().decode()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def query(self, expr: str) -> dict:
        """An instant query; returns the API's whole answer (status, data or error)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as err:  # 400 with a JSON body for parse errors
            return json.loads(err.read().decode())

    def scalar(self, expr: str) -> float | None:
        answer = self.query(expr)
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    @staticmethod
    def wait(condition, message: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, message
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def stack(tiny_dir, lora_dirs, tmp_path_factory):
    """deltaserve with /metrics, and a real Prometheus scraping it every second."""
    binary = _binary("prometheus")
    metrics_port = free_port()
    config = ServerConfig.of(
        model=tiny_dir, max_batch_size=4, max_seq_len=128, max_adapters=2, max_lora_rank=16, metrics_port=metrics_port
    )
    with ServerThread(config) as server:
        Client(server.target).load_adapter("qv8", lora_dirs["qv8"])
        prometheus = Prometheus(binary, f"127.0.0.1:{metrics_port}", tmp_path_factory.mktemp("prometheus"))
        try:
            prometheus.wait(lambda: prometheus.scalar('up{job="deltaserve"}') == 1, "the target is not up")
            yield server, prometheus
        finally:
            prometheus.stop()


def test_promql_answers_about_live_traffic(stack):
    server, prometheus = stack
    n, tokens = 6, 4
    with Client(server.target, timeout=60) as client:
        for i in range(n):
            client.generate(PROMPTS[i % 4], adapter_id="qv8", max_new_tokens=tokens, min_new_tokens=tokens)
            time.sleep(0.3)  # spread the traffic over several scrapes
    prometheus.wait(
        lambda: prometheus.scalar('sum(deltaserve_generated_tokens_total{adapter="qv8"})') == n * tokens,
        "Prometheus never saw the exact token count",
    )
    assert prometheus.scalar('sum(deltaserve_requests_total{adapter="qv8"})') == n
    rate = prometheus.scalar('sum(rate(deltaserve_requests_total{adapter="qv8"}[1m]))')
    assert rate is not None and rate > 0
    ttft_p50 = prometheus.scalar(
        'histogram_quantile(0.5, sum by (le) (rate(deltaserve_time_to_first_token_seconds_bucket{adapter="qv8"}[1m])))'
    )
    slowest = server.server.metrics.registry.get_sample_value(
        "deltaserve_request_duration_seconds_sum", {"adapter": "qv8"}
    )
    assert ttft_p50 is not None and math.isfinite(ttft_p50) and 0 < ttft_p50 <= max(slowest, 0.001)
    assert prometheus.scalar('deltaserve_adapters_resident{tier="device"}') == 1


def _exported_series(server) -> set[str]:
    """Every series name the server exports, from /metrics (families without samples included; counters
    are typed under their _total name there)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.config.doors.metrics_port}/metrics") as response:
        text = response.read().decode()
    names = set()
    suffixes = {"counter": ("",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        names.update(name + suffix for suffix in suffixes.get(kind, ("",)))
    return names


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", []) if target.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        match = re.fullmatch(r"label_values\((\w+), *\w+\)", query or "")
        if match:
            exprs.append(match.group(1))
    return exprs


def test_dashboard_expressions_parse_and_name_exported_series(stack):
    server, prometheus = stack
    exprs = _dashboard_expressions()
    assert len(exprs) > 20
    exported = _exported_series(server)
    for expr in exprs:
        concrete = expr
        for variable, value in GRAFANA_VARIABLES.items():
            concrete = concrete.replace(variable, value)
        assert "$" not in concrete, f"unknown Grafana variable in {expr!r}"
        answer = prometheus.query(concrete)
        assert answer["status"] == "success", (expr, answer.get("error"))
        unknown = set(re.findall(r"\bdeltaserve_\w+", concrete)) - exported
        assert not unknown, f"{expr!r} names series deltaserve does not export: {unknown}"


def test_shipped_prometheus_config_is_valid():
    promtool = _binary("promtool")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
