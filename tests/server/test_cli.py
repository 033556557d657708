"""The `deltaserve` console script as a user runs it: `serve` in a subprocess, the client subcommands
against it, and a clean exit 0 on SIGTERM that lets in-flight requests finish."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from deltaserve.client import Client
from deltaserve.testing.helpers import PROMPTS

pytestmark = pytest.mark.slow
DELTASERVE = shutil.which("deltaserve") or os.path.join(os.path.dirname(sys.executable), "deltaserve")


class ServeProcess:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [DELTASERVE, "serve", "--port", "0", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.log: list[str] = []
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 300
        for line in self.proc.stderr:
            self.log.append(line)
            match = re.search(r"deltaserve serving .* on [\d.]+:(\d+)", line)
            if match:
                threading.Thread(target=self._drain, daemon=True).start()
                return int(match.group(1))
            assert time.monotonic() < deadline, "server did not start"
        raise AssertionError("server exited before serving:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _cli(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DELTASERVE, "--target", target, *args], capture_output=True, text=True, timeout=120)


def test_cli_commands_and_graceful_sigterm(tiny_dir, lora_dirs):
    server = ServeProcess(
        "--model",
        tiny_dir,
        "--max-batch-size",
        "4",
        "--max-seq-len",
        "512",
        "--preload",
        f"pre={lora_dirs['qv8']}",
    )
    try:
        info = _cli(server.target, "info")
        assert info.returncode == 0 and "max_seq_len: 512" in info.stdout
        loaded = _cli(server.target, "adapters", "load", "cli", lora_dirs["pattern"])
        assert loaded.returncode == 0, loaded.stderr
        listing = _cli(server.target, "adapters", "list")
        assert "pre" in listing.stdout and "cli" in listing.stdout and "lora" in listing.stdout
        expected = Client(server.target).generate(PROMPTS[0], adapter_id="cli", max_new_tokens=8)
        generated = _cli(server.target, "generate", PROMPTS[0], "--adapter", "cli", "--max-new-tokens", "8")
        assert generated.returncode == 0 and generated.stdout.rstrip("\n") == expected.text
        assert "finish=" in generated.stderr
        streamed = _cli(server.target, "generate", PROMPTS[0], "--adapter", "cli", "--max-new-tokens", "8", "--stream")
        assert streamed.stdout.rstrip("\n") == expected.text
        pinned = _cli(server.target, "adapters", "pin", "cli")
        assert pinned.returncode == 0 and "pinned" in pinned.stdout
        assert "device" in _cli(server.target, "adapters", "unpin", "cli").stdout
        assert "merged" in _cli(server.target, "adapters", "merge", "cli").stdout
        merged_text = _cli(server.target, "generate", PROMPTS[0], "--adapter", "cli", "--max-new-tokens", "8")
        assert merged_text.stdout.rstrip("\n") == expected.text
        assert "unmerged cli" in _cli(server.target, "adapters", "unmerge").stdout
        replaced = _cli(server.target, "adapters", "load", "cli", lora_dirs["qv8"], "--replace")
        assert replaced.returncode == 0, replaced.stderr
        exists = _cli(server.target, "adapters", "load", "cli", lora_dirs["qv8"])
        assert exists.returncode == 1 and "ALREADY_EXISTS" in exists.stderr
        missing = _cli(server.target, "generate", "hi", "--adapter", "nope")
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
        assert _cli(server.target, "adapters", "unload", "cli").returncode == 0

        # SIGTERM with a request in flight: it finishes, then the server exits 0.
        with Client(server.target, timeout=120) as client:
            stream = client.generate_stream(PROMPTS[1], max_new_tokens=150, min_new_tokens=150)
            first = next(stream)
            assert server.proc.poll() is None
            server.proc.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert rest[-1].finish_reason == "length"
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 150
        assert server.proc.wait(timeout=60) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def test_readme_serve_command_on_the_embedded_model():
    """`deltaserve serve` with no --model serves the embedded SmolLM2 (as the README's command does)."""
    server = ServeProcess()
    try:
        with Client(server.target, timeout=300) as client:
            client.wait_ready(60)
            assert client.model_info().model_name == "SmolLM2-135M-Instruct"
            result = client.generate(messages=[{"role": "user", "content": "Say hello."}], max_new_tokens=8)
            assert result.generated_tokens >= 1 and result.text
        assert server.terminate() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
