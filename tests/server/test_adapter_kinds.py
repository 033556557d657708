"""Every adapter kind through a real gRPC server: each alone against PEFT (or the AdapterHub definition for
bottlenecks), all of them mixed in one continuously batched run, stacks against their reference composition,
and the refusals."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.app import ServerConfig
from safetensors.torch import load_file, save_file

from tests.helpers import PROMPTS, ServerThread
from tests.kinds import (
    BOTTLENECK_PRESETS,
    PEFT_KINDS,
    BottleneckReference,
    make_bottleneck,
    make_peft_adapter,
)
from tests.references import assert_logprobs_close, greedy_reference, load_reference_model, tokenizer_for

MAX_NEW = 10
EXPECTED_KIND = {
    "dora": "dora",
    "adalora": "adalora",
    "ia3": "ia3",
    "prefix": "prefix_tuning",
    "prefix_projected": "prefix_tuning",
    "prompt": "prompt_tuning",
    "ptuning": "p_tuning",
    "lora16": "lora",
    "houlsby": "bottleneck",
    "pfeiffer": "bottleneck",
    "parallel": "bottleneck",
}


@pytest.fixture(scope="module")
def kind_dirs(tmp_path_factory, tiny_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kinds")
    dirs = {name: make_peft_adapter(tiny_dir, str(root / name), name, seed=10 + i) for i, name in enumerate(PEFT_KINDS)}
    for i, preset in enumerate(BOTTLENECK_PRESETS):
        dirs[preset] = make_bottleneck(tiny_dir, str(root / preset), preset, seed=40 + i)
    return dirs


def reference_model(model_dir: str, name: str, dirs: dict[str, str]):
    if name in BOTTLENECK_PRESETS:
        return BottleneckReference(load_reference_model(model_dir), dirs[name]).model
    return load_reference_model(model_dir, dirs[name] if name else None)


@pytest.fixture(scope="module")
def references(tiny_dir, kind_dirs):
    tokenizer = tokenizer_for(tiny_dir)
    table = {}
    for name in ["", *kind_dirs]:
        model = reference_model(tiny_dir, name, kind_dirs)
        for i, prompt in enumerate(PROMPTS):
            table[name, i] = greedy_reference(model, tokenizer, tokenizer(prompt)["input_ids"], MAX_NEW)
    return table


@pytest.fixture(scope="module")
def server(tiny_dir, kind_dirs):
    config = ServerConfig(
        model=tiny_dir, max_batch_size=8, max_seq_len=128, max_adapters=len(kind_dirs) + 3, max_lora_rank=16
    )
    with ServerThread(config) as running:
        with Client(running.target, timeout=120) as client:
            for name, path in kind_dirs.items():
                client.load_adapter(name, path)
        yield running


def _generate(target: str, prompt_index: int, **adapter):
    with Client(target, timeout=120) as client:
        return client.generate(PROMPTS[prompt_index], max_new_tokens=MAX_NEW, logprobs=True, **adapter)


def test_every_kind_changes_the_output(references, kind_dirs):
    """Guards the comparisons below against passing vacuously."""
    for name in kind_dirs:
        assert any(references[name, i].token_ids != references["", i].token_ids for i in range(len(PROMPTS))), name


def test_list_reports_each_kind(server, kind_dirs):
    with Client(server.target) as client:
        listed = {info.adapter_id: info for info in client.list_adapters()}
    for name in kind_dirs:
        assert listed[name].kind == EXPECTED_KIND[name]
    assert listed["prefix"].virtual_tokens == 5 and listed["prompt"].virtual_tokens == 6
    # AdaLoRA serves the ranks that survived pruning, as the saved rank_pattern lists them.
    pattern = json.loads(open(f"{kind_dirs['adalora']}/adapter_config.json").read())["rank_pattern"]
    assert sum(map(sum, pattern.values())) < PEFT_KINDS["adalora"][1]["init_r"] * len(pattern)
    assert listed["adalora"].rank == max(map(sum, pattern.values()))
    assert listed["lora16"].mergeable and not listed["dora"].mergeable and not listed["ia3"].mergeable


@pytest.mark.parametrize("name", list(EXPECTED_KIND))
def test_each_kind_alone_equals_its_reference(server, references, name):
    for i in range(len(PROMPTS)):
        result = _generate(server.target, i, adapter_id=name)
        assert result.token_ids == references[name, i].token_ids, (name, i)
        assert_logprobs_close(result.logprobs, references[name, i].logprobs)


def test_every_kind_in_one_mixed_batch(server, references, kind_dirs):
    """All kinds and the base at once, more requests than rows: each row gets exactly what it gets alone."""
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in ["", *kind_dirs]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _generate(server.target, job[1], adapter_id=job[0]), jobs))
    for (name, i), result in zip(jobs, results, strict=True):
        assert result.token_ids == references[name, i].token_ids, (name, i)
        assert_logprobs_close(result.logprobs, references[name, i].logprobs, rtol=1e-4, atol=1e-5)
