"""Configuration from one place (server/config.py): validation names the flag on every path (code, CLI, Ray
builder), flat names map onto the groups, README's flag table is what `deltaserve serve --help` offers, and
--merge-window-requests reaches the running auto-merge policy."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from deltaserve.client import Client
from deltaserve.server.cli import cluster_config, serve_config
from deltaserve.server.cluster.config import ClusterConfig, cluster_from_args
from deltaserve.server.config import ServerConfig, flag_table
from deltaserve.server.errors import ConfigError, ModelLoadError
from deltaserve.testing.helpers import PROMPTS, ServerThread

README = Path(__file__).parents[2] / "README.md"

BAD_SETTINGS = [  # one or more per group: (flat settings, what the error must say)
    ({"port": 70000}, "--port must be at most 65535, got 70000"),
    ({"http_port": -1}, "--http-port must be at least 0, got -1"),
    ({"quantize": "nf5"}, "--quantize must be one of none, nf4, int8; got 'nf5'"),
    ({"dtype": "float8"}, "--dtype must be one of"),
    ({"max_batch_size": 0}, "--max-batch-size must be at least 1, got 0"),
    ({"max_seq_len": "2048"}, "--max-seq-len must be an integer, got '2048'"),
    ({"max_adapters": 0}, "--max-resident-adapters must be at least 1, got 0"),
    ({"preload": [("only-an-id",)]}, "--preload must be ID=DIR"),
    ({"adapter_root": "/adapters"}, "--adapter-root must be a list"),
    ({"tls_cert": "cert.pem"}, "--tls-cert needs --tls-key"),
    ({"max_request_bytes": 0}, "--max-request-bytes must be at least 1, got 0"),
    ({"merge_policy": "always"}, "--merge-policy must be one of off, auto; got 'always'"),
    ({"merge_window_requests": 0}, "--merge-window-requests must be at least 1, got 0"),
    ({"shutdown_grace_seconds": -1.0}, "--shutdown-grace must be at least 0, got -1.0"),
    ({"log_level": "LOUD"}, "--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL"),
]


def _deltaserve(*args: str) -> subprocess.CompletedProcess:
    """The console script as a user runs it; a wide terminal keeps every --help entry on one line."""
    env = {**os.environ, "COLUMNS": "1000", "NO_COLOR": "1"}
    env.pop("DELTASERVE_ADMIN_TOKEN", None)
    command = [sys.executable, "-m", "deltaserve.server.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_a_bad_value_names_its_flag(settings, message):
    with pytest.raises(ConfigError) as info:
        ServerConfig.of(**settings)
    assert message in str(info.value)
    assert not isinstance(info.value, ModelLoadError)


def test_cluster_settings_are_validated_like_the_server_ones():
    with pytest.raises(ConfigError, match="--replicas must be at least 1, got 0"):
        ClusterConfig(replicas=0)
    with pytest.raises(ConfigError, match=r"--max-replicas must be at least --replicas \(3\), got 2"):
        ClusterConfig(replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="--replica-gpus must be at least 0"):
        ClusterConfig(replica_gpus=-1)


def test_of_maps_flat_names_onto_the_groups_and_keeps_the_defaults():
    config = ServerConfig.of(max_batch_size=4, merge_policy="auto", admin_token="t", preload=[("a", "/x")])
    assert config.batching.max_batch_size == 4 and config.merge.merge_policy == "auto"
    assert config.security.admin_token == "t" and config.adapters.preload == [("a", "/x")]
    assert ServerConfig.of(**config.settings()) == config
    assert ServerConfig.of() == ServerConfig()
    assert ServerConfig().batching.max_batch_size == 256 and ServerConfig().security.max_request_bytes == 4 << 20
    with pytest.raises(dataclasses.FrozenInstanceError):  # a change goes through replace(), which validates
        config.batching.max_batch_size = 0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="--max-batch-size"):
        config.replace(max_batch_size=0)
    assert config.replace(port=0).doors.port == 0 and config.doors.port == 50051


def test_of_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown setting 'max_batch'"):
        ServerConfig.of(max_batch=4)
    with pytest.raises(ConfigError, match="unknown setting 'batching'"):  # group names are not settings
        ServerConfig.of(batching=None)


def test_flag_defaults_equal_the_dataclass_defaults(monkeypatch):
    monkeypatch.delenv("DELTASERVE_ADMIN_TOKEN", raising=False)
    assert serve_config([]) == ServerConfig()
    config = serve_config(["--max-adapters", "3", "--preload", "a=/x", "--preload", "b=/y", "--allow-pickle"])
    assert config.adapters.max_adapters == 3 and config.adapters.preload == [("a", "/x"), ("b", "/y")]
    assert config.adapters.allow_pickle


def test_serve_cluster_flags_map_onto_the_cluster_and_replica_settings(monkeypatch):
    monkeypatch.delenv("DELTASERVE_ADMIN_TOKEN", raising=False)
    launch, cluster = cluster_config([])
    assert cluster == ClusterConfig() and launch.http_port == 8000 and launch.grpc_port == 50051
    argv = ["--replicas", "3", "--max-replicas", "5", "--host", "0.0.0.0", "--metrics-port", "9400"]
    launch, cluster = cluster_config([*argv, "--max-batch-size", "4", "--merge-window-requests", "7"])
    assert launch.host == "0.0.0.0" and cluster.replicas == 3
    assert cluster.autoscaling_options() == {"min_replicas": 3, "max_replicas": 5, "target_ongoing_requests": 8.0}
    server = cluster.server  # replicas bind their metrics on --host, at --metrics-port plus their rank
    assert server.doors.host == "0.0.0.0" and server.doors.metrics_port == 9400
    assert server.batching.max_batch_size == 4 and server.merge.merge_window_requests == 7


def test_the_cli_reports_a_bad_value_with_exit_status_2():
    refused = _deltaserve("serve", "--max-batch-size", "0")
    assert refused.returncode == 2
    assert "deltaserve serve: error: --max-batch-size must be at least 1, got 0" in refused.stderr
    assert "Traceback" not in refused.stderr
    not_a_number = _deltaserve("serve", "--max-seq-len", "many")
    assert not_a_number.returncode == 2 and "--max-seq-len: must be an integer, got 'many'" in not_a_number.stderr
    cluster = _deltaserve("serve-cluster", "--replicas", "0")
    assert cluster.returncode == 2
    assert "deltaserve serve-cluster: error: --replicas must be at least 1" in cluster.stderr


def test_the_merge_window_flag_is_merge_window_requests():
    assert serve_config(["--merge-window-requests", "5"]).merge.merge_window_requests == 5
    old = _deltaserve("serve", "--merge-window-steps", "5")
    assert old.returncode == 2 and "unrecognized arguments: --merge-window-steps" in old.stderr


def test_the_ray_builder_parses_text_like_the_flags():
    config = cluster_from_args(
        {
            "replicas": 3,  # YAML gives numbers as numbers
            "max_replicas": "4",
            "adapter_root": "/a,/b",
            "preload": "x=/a/x,y=/b/y",
            "allow_pickle": "true",
            "max_adapter_bytes": "none",
            "max_adapters": 2,
        }
    )
    assert config.replicas == 3 and config.autoscaling_options()["max_replicas"] == 4
    assert config.server.adapters.adapter_root == ["/a", "/b"]
    assert config.server.adapters.preload == [("x", "/a/x"), ("y", "/b/y")]
    assert config.server.adapters.allow_pickle and config.server.adapters.max_adapter_bytes is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max_batch_size": "0"}, "max_batch_size: --max-batch-size must be at least 1, got 0"),
        ({"replicas": "two"}, "replicas: --replicas must be an integer, got 'two'"),
        ({"merge_policy": "always"}, "merge_policy: --merge-policy must be one of off, auto"),
        ({"preload": "no-path"}, "preload: --preload must be ID=DIR"),
        ({"allow_pickle": "maybe"}, "allow_pickle: --allow-pickle must be true or false"),
        ({"log_level": "DEBUG"}, "unknown deltaserve application argument 'log_level'"),
        ({"merge_window_steps": "8"}, "unknown deltaserve application argument 'merge_window_steps'"),
    ],
)
def test_the_ray_builder_validates_like_the_cli(args, message):
    pytest.importorskip("ray.serve")
    from deltaserve.server.cluster.ray_serve import app_from_args

    with pytest.raises(ConfigError) as info:
        app_from_args(args)
    assert message in str(info.value)


def _help_entries(text: str) -> dict[str, tuple[tuple[str, ...], str]]:
    """{primary flag: (every spelling, help line)} from argparse's --help on a wide terminal (a long flag puts
    its help on the next line)."""
    entries, spellings = {}, ()
    for line in text.splitlines():
        match = re.match(r"^  (--\S.*?)(?:  +(.*))?$", line)
        if match:
            spellings = tuple(re.findall(r"(--[\w-]+)", match.group(1)))
            entries[spellings[0]] = (spellings, match.group(2) or "")
        elif spellings and line.startswith("    ") and not entries[spellings[0]][1]:
            entries[spellings[0]] = (spellings, line.strip())
    return entries


def _readme_rows() -> dict[str, tuple[tuple[str, ...], str]]:
    """{primary flag: (every spelling, "doc (default: X)")} from README's flag table."""
    text = README.read_text()
    table = text[text.index("<!-- serve-flags:begin") : text.index("<!-- serve-flags:end")]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if line.startswith("| `--"):
            spellings = tuple(re.findall(r"`(--[\w-]+)", cells[0]))
            rows[spellings[0]] = (spellings, f"{cells[2]} (default: {cells[1]})")
    return rows


def test_the_readme_flag_table_is_what_serve_help_offers():
    assert flag_table() in README.read_text(), "regenerate it: python -m deltaserve.server.config"
    shown = _deltaserve("serve", "--help")
    assert shown.returncode == 0
    offered = _help_entries(shown.stdout)
    assert len(offered) >= 30 and "--merge-window-requests" in offered
    assert _readme_rows() == offered


def test_merge_window_requests_from_the_command_line_reaches_the_running_policy(tiny_dir, lora_dirs):
    window = 3
    argv = ["--model", tiny_dir, "--max-batch-size", "2", "--max-seq-len", "128", "--max-lora-rank", "16"]
    config = serve_config([*argv, "--merge-policy", "auto", "--merge-window-requests", str(window)])
    with ServerThread(config) as running, Client(running.target, timeout=120) as client:
        assert running.server.merge_policy.window == window
        client.load_adapter("qv8", lora_dirs["qv8"])
        for _ in range(window - 1):
            client.generate(PROMPTS[0], adapter_id="qv8", max_new_tokens=2)
        assert client.model_info().merged_adapter_id == ""  # one request short of a full window
        client.generate(PROMPTS[0], adapter_id="qv8", max_new_tokens=2)
        assert client.model_info().merged_adapter_id == "qv8"
