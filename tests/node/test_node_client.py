"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader reading protos/deltaserve/v1/deltaserve.proto at run
time) against a real server: its results must equal the Python client's for the same greedy requests."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import pytest
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread

NODE_DIR = pathlib.Path(__file__).resolve().parent
MISSING = "no-such-adapter"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """The command that runs client.js, after `npm ci` into tests/node/node_modules if it is not there yet."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js client test (CI has Node 20)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        try:
            installed = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=300
            )
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci took over 5 minutes (is the npm registry reachable?)")
        if installed.returncode != 0:
            pytest.skip(f"npm ci failed (is the npm registry reachable?): {installed.stderr.strip()[-500:]}")
    return [node, str(NODE_DIR / "client.js")]


@pytest.fixture(scope="module")
def server(tiny_dir, lora_dirs):
    config = ServerConfig.of(model=tiny_dir, max_batch_size=4, max_seq_len=128, max_adapters=2, max_lora_rank=16)
    with ServerThread(config) as running:
        Client(running.target).load_adapter("qv8", lora_dirs["qv8"])
        yield running


REQUESTS = [
    {"adapter_id": "qv8", "prompt": PROMPTS[0], "max_new_tokens": 10, "logprobs": True},
    {"prompt": PROMPTS[1], "max_new_tokens": 8, "logprobs": True},
    {"adapter_id": "qv8", "messages": [{"role": "user", "content": "Hi there!"}], "max_new_tokens": 6},
    {"adapter_id": "qv8", "prompt": PROMPTS[3], "max_new_tokens": 12, "min_new_tokens": 12, "repetition_penalty": 1.2},
]


def _python_call(request: dict) -> dict:
    options = dict(request)
    prompt = options.pop("prompt", None)
    if "messages" in options:
        options["messages"] = [(m["role"], m["content"]) for m in options["messages"]]
    return {"prompt": prompt, **options}


def test_node_client_equals_python_client(node_client, server):
    plan = json.dumps({"requests": REQUESTS, "missing_adapter": MISSING})
    run = subprocess.run([*node_client, server.target, plan], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    with Client(server.target, timeout=60) as client:
        for request, unary, chunks in zip(REQUESTS, result["generate"], result["stream"], strict=True):
            options = _python_call(request)
            expected = client.generate(options.pop("prompt"), **options)
            assert unary["text"] == expected.text
            assert unary["token_ids"] == expected.token_ids
            assert unary["logprobs"] == expected.logprobs  # float32 read by both sides, compared exactly
            assert unary["finish_reason"] == "FINISH_REASON_" + expected.finish_reason.upper()
            assert unary["prompt_tokens"] == expected.prompt_tokens
            assert unary["generated_tokens"] == expected.generated_tokens
            assert unary["adapter_id"] == expected.adapter_id
            assert "".join(chunk["text"] for chunk in chunks) == expected.text
            assert [t for chunk in chunks for t in chunk["token_ids"]] == expected.token_ids
            assert [lp for chunk in chunks for lp in chunk["logprobs"]] == expected.logprobs
            assert all(chunk["finish_reason"] == "FINISH_REASON_UNSPECIFIED" for chunk in chunks[:-1])
            assert chunks[-1]["finish_reason"] == unary["finish_reason"]
    assert result["generate"][0]["text"] != result["generate"][1]["text"]
    assert result["missing"]["code"] == 5  # NOT_FOUND
    assert repr(MISSING) in result["missing"]["details"]
