"""The merge path: merged output equals unmerged, other traffic stays correct while merged, the base is
restored bit for bit, and what cannot be merged is refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread

from tests.references import assert_logprobs_close, greedy_reference, load_reference_model, tokenizer_for

MAX_NEW = 10
MERGED = "all16_rs"  # all-linear (not the tied lm_head), rsLoRA


@pytest.fixture(scope="module")
def references(tiny_dir, lora_dirs):
    tokenizer = tokenizer_for(tiny_dir)
    table = {}
    for adapter in ("", "qv8", "pattern", MERGED):
        model = load_reference_model(tiny_dir, lora_dirs[adapter] if adapter else None)
        for i in range(3):
            table[adapter, i] = greedy_reference(model, tokenizer, tokenizer(PROMPTS[i])["input_ids"], MAX_NEW)
    return table


@pytest.fixture
def server(tiny_dir, lora_dirs):
    config = ServerConfig.of(model=tiny_dir, max_batch_size=6, max_seq_len=256, max_adapters=4, max_lora_rank=16)
    with ServerThread(config) as running:
        with Client(running.target, timeout=120) as client:
            for name in ("qv8", "pattern", MERGED, "head"):
                client.load_adapter(name, lora_dirs[name])
        yield running


def _generate(target: str, adapter: str, prompt: int):
    with Client(target, timeout=120) as client:
        return client.generate(PROMPTS[prompt], adapter_id=adapter, max_new_tokens=MAX_NEW, logprobs=True)


def _weights(server) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in server.server.runner.model.named_parameters()}


def test_merged_equals_unmerged_and_unmerge_restores_exactly(server, references):
    before = _weights(server)
    base_before = [_generate(server.target, "", i) for i in range(3)]
    unmerged = [_generate(server.target, MERGED, i) for i in range(3)]
    with Client(server.target, timeout=120) as client:
        info = client.merge_adapter(MERGED)
        assert info.state == "merged" and client.model_info().merged_adapter_id == MERGED
        assert any(not torch.equal(before[n], p) for n, p in server.server.runner.model.named_parameters())
        for i in range(3):
            merged = _generate(server.target, MERGED, i)
            assert merged.token_ids == unmerged[i].token_ids == references[MERGED, i].token_ids
            assert_logprobs_close(merged.logprobs, unmerged[i].logprobs)
        assert client.unmerge_adapter() == MERGED
        assert client.model_info().merged_adapter_id == ""
        assert {a.adapter_id: a.state for a in client.list_adapters()}[MERGED] == "device"
    for name, param in server.server.runner.model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} was not restored bit for bit"
    for i in range(3):
        assert _generate(server.target, "", i).logprobs == base_before[i].logprobs  # exact


def test_mixed_traffic_while_merged(server, references):
    """Base, the merged adapter and two others in one concurrent run: each equals its reference."""
    Client(server.target, timeout=120).merge_adapter(MERGED)
    jobs = [(adapter, i % 3) for i, adapter in enumerate(["", MERGED, "qv8", "pattern"] * 4)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: _generate(server.target, *job), jobs))
    for job, result in zip(jobs, results, strict=True):
        assert result.token_ids == references[job].token_ids, job
        assert_logprobs_close(result.logprobs, references[job].logprobs)
    metrics = server.server.metrics.registry
    assert metrics.get_sample_value("deltaserve_merge_switches_total") == 1
    assert metrics.get_sample_value("deltaserve_merged_adapter_info", {"adapter": MERGED}) == 1


def test_switching_the_merged_adapter(server, references):
    with Client(server.target, timeout=120) as client:
        client.merge_adapter(MERGED)
        client.merge_adapter("qv8")  # unmerges the first one, then merges this one
        states = {a.adapter_id: a.state for a in client.list_adapters()}
        assert states["qv8"] == "merged" and states[MERGED] == "device"
        for adapter in ("", MERGED, "qv8"):
            assert _generate(server.target, adapter, 0).token_ids == references[adapter, 0].token_ids
        client.unmerge_adapter()


def test_merge_refusals(server, lora_dirs):
    def code(call) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(DeltaserveError) as info:
            call()
        return info.value.code, info.value.message

    with Client(server.target, timeout=60) as client:
        assert code(client.unmerge_adapter)[0] == grpc.StatusCode.FAILED_PRECONDITION
        assert code(lambda: client.merge_adapter("nope"))[0] == grpc.StatusCode.NOT_FOUND
        status, message = code(lambda: client.merge_adapter("head"))
        assert status == grpc.StatusCode.FAILED_PRECONDITION and "embeddings" in message
        assert {a.adapter_id: a.state for a in client.list_adapters()}["head"] != "merged"
        client.merge_adapter(MERGED)
        status, message = code(lambda: client.unload_adapter(MERGED))
        assert status == grpc.StatusCode.FAILED_PRECONDITION and "unmerge" in message
        status, _ = code(lambda: client.load_adapter(MERGED, lora_dirs["qv8"], replace=True))
        assert status == grpc.StatusCode.FAILED_PRECONDITION
        assert code(lambda: client.pin_adapter(MERGED, False))[0] == grpc.StatusCode.FAILED_PRECONDITION
        client.unmerge_adapter()
        assert client.unload_adapter(MERGED) == 0


def test_quantized_base_refuses_to_merge(tiny_dir, lora_dirs):
    pytest.importorskip("bitsandbytes")
    config = ServerConfig.of(
        model=tiny_dir,
        quantize="nf4",
        device="cpu",
        max_batch_size=2,
        max_seq_len=128,
        max_adapters=2,
        max_lora_rank=16,
    )
    with ServerThread(config) as server, Client(server.target, timeout=120) as client:
        client.load_adapter("qv8", lora_dirs["qv8"])
        before = client.generate(PROMPTS[0], max_new_tokens=6, logprobs=True).logprobs
        with pytest.raises(DeltaserveError) as info:
            client.merge_adapter("qv8")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "lossy" in info.value.message
        assert client.generate(PROMPTS[0], max_new_tokens=6, logprobs=True).logprobs == before
        assert {a.adapter_id: a.state for a in client.list_adapters()}["qv8"] == "device"


def test_auto_policy_merges_single_adapter_traffic_and_unmerges_mixed(tiny_dir, lora_dirs, references):
    config = ServerConfig.of(
        model=tiny_dir,
        max_batch_size=6,
        max_seq_len=256,
        max_adapters=4,
        max_lora_rank=16,
        merge_policy="auto",
        merge_window_requests=4,
    )
    with ServerThread(config) as server, Client(server.target, timeout=120) as client:
        for name in ("qv8", MERGED):
            client.load_adapter(name, lora_dirs[name])
        switches = lambda: server.server.metrics.registry.get_sample_value("deltaserve_merge_switches_total")  # noqa: E731
        # Single-adapter traffic: merged after one window of requests, then stays merged (no flapping).
        for i in range(6):
            result = _generate(server.target, MERGED, i % 3)
            assert result.token_ids == references[MERGED, i % 3].token_ids
        assert client.model_info().merged_adapter_id == MERGED
        assert switches() == 1
        # Mixed traffic: unmerged, and outputs stay equal to their references throughout.
        jobs = [(adapter, i % 3) for i, adapter in enumerate(["", "qv8", MERGED] * 4)]
        for job in jobs:
            assert _generate(server.target, *job).token_ids == references[job].token_ids, job
        assert client.model_info().merged_adapter_id == ""
        assert switches() == 2


def test_auto_policy_leaves_unmergeable_kinds_alone(tiny_dir, tmp_path):
    """All traffic on a prefix-tuning adapter: the policy must not merge (or pin) what is not a W + BA delta."""
    from deltaserve.testing.kinds import make_peft_adapter

    prefix = make_peft_adapter(tiny_dir, str(tmp_path / "prefix"), "prefix", seed=5)
    config = ServerConfig.of(
        model=tiny_dir, max_batch_size=4, max_seq_len=128, max_adapters=2, merge_policy="auto", merge_window_requests=2
    )
    with ServerThread(config) as server, Client(server.target, timeout=120) as client:
        client.load_adapter("prefix", prefix)
        first = client.generate(PROMPTS[0], adapter_id="prefix", max_new_tokens=4)
        for _ in range(4):
            assert client.generate(PROMPTS[0], adapter_id="prefix", max_new_tokens=4).token_ids == first.token_ids
        assert client.model_info().merged_adapter_id == ""
        assert not client.list_adapters()[0].pinned
