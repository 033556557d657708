"""The trained example adapters (examples/adapters) through a real server on the embedded model: each does its
task on held-out prompts where the base does not, its greedy output equals PEFT's on the same (fp16) files,
and examples/demo.py runs against the live server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import ServerThread, free_port
from safetensors import safe_open

from examples import demo
from examples.tasks import TASKS
from tests.references import assert_logprobs_close, greedy_reference, load_reference_model, tokenizer_for

pytestmark = pytest.mark.slow

HELD_OUT = 20
PEFT_CHECKED = 3  # held-out prompts per adapter also compared with PEFT (its generate is the slow part)
DIRS = demo.adapter_dirs()
EXPECTED_KIND = {"json": "lora", "pirate": "prefix_tuning", "digits": "prompt_tuning"}


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(smol_dir, metrics_port):
    config = ServerConfig.of(
        model=smol_dir,
        dtype="float32",
        device="cpu",
        max_batch_size=128,
        max_seq_len=256,
        max_adapters=len(DIRS) + 1,
        metrics_port=metrics_port,
    )
    with ServerThread(config) as running:
        with Client(running.target, timeout=120) as client:
            for name, path in DIRS.items():
                client.load_adapter(name, str(path))
        yield running


@pytest.fixture(scope="module")
def answers(server):
    """{(task, prompt, adapter or ""): result}: every task's held-out prompts to its adapter and to the base, all
    in one concurrent burst (greedy, with logprobs)."""
    jobs = [
        (name, prompt, adapter) for name in DIRS for prompt in TASKS[name].held_out(HELD_OUT) for adapter in (name, "")
    ]

    def one(job):
        name, prompt, adapter = job
        return client.generate(
            messages=[{"role": "user", "content": prompt}],
            adapter_id=adapter,
            max_new_tokens=TASKS[name].max_new_tokens,
            logprobs=True,
        )

    with Client(server.target, timeout=300) as client, ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    return dict(zip(jobs, results, strict=True))


def test_the_example_adapters_are_checked_in():
    assert set(DIRS) == set(TASKS), "train them: python examples/train.py --adapter all"
    for path in DIRS.values():
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as handle:
            dtypes = {str(handle.get_tensor(key).dtype) for key in handle.keys()}  # noqa: SIM118
        assert dtypes == {"torch.float16"}, path
        assert (path / "README.md").exists(), path


def test_the_server_reports_each_kind(server):
    with Client(server.target) as client:
        listed = {info.adapter_id: info.kind for info in client.list_adapters()}
    assert listed == {name: EXPECTED_KIND[name] for name in DIRS}


@pytest.mark.parametrize("name", list(TASKS))
def test_each_adapter_does_its_task_and_the_base_does_not(answers, name):
    task = TASKS[name]
    prompts = task.held_out(HELD_OUT)
    assert len(prompts) == HELD_OUT
    adapter = sum(task.check(p, answers[name, p, name].text) for p in prompts) / HELD_OUT
    base = sum(task.check(p, answers[name, p, ""].text) for p in prompts) / HELD_OUT
    shown = [(p, answers[name, p, name].text) for p in prompts if not task.check(p, answers[name, p, name].text)]
    assert adapter >= 0.8, (adapter, shown)
    assert base <= 0.2, base


@pytest.mark.parametrize("name", list(TASKS))
def test_greedy_output_equals_peft_on_the_same_files(smol_dir, server, answers, name):
    """Token for token, with the logprobs of the raw logits within rtol 1e-4 / atol 1e-5 (fp32)."""
    tokenizer = tokenizer_for(smol_dir)
    model = load_reference_model(smol_dir, str(DIRS[name]))
    task = TASKS[name]
    with Client(server.target) as client:
        for prompt in task.held_out(HELD_OUT)[:PEFT_CHECKED]:
            prompt_ids = client.tokenize(messages=[{"role": "user", "content": prompt}]).token_ids
            reference = greedy_reference(model, tokenizer, list(prompt_ids), task.max_new_tokens)
            result = answers[name, prompt, name]
            assert list(result.token_ids) == reference.token_ids, (name, prompt, result.text)
            assert_logprobs_close(list(result.logprobs), reference.logprobs)


def test_the_demo_runs_against_a_live_server(server, metrics_port, capsys):
    assert demo.main([server.target, "--metrics", f"http://127.0.0.1:{metrics_port}/metrics"]) == 0
    out = capsys.readouterr().out
    for name in DIRS:
        assert name in out
    for prompt in demo.PROMPTS:
        assert prompt in out
    assert "decode steps in the burst" in out
    mixed = int(out.split("decode steps in the burst; ", 1)[1].split(" ", 1)[0])
    assert mixed > 0, out
