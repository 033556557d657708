"""Weighted mixes of LoRA adapters equal PEFT's add_weighted_adapter on the same files, are served beside
other traffic without merging, and are rebuilt when a component changes."""

from __future__ import annotations

import grpc
import pytest
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread, make_lora

from tests.references import assert_logprobs_close, greedy_reference, peft_mix_model, tokenizer_for

MAX_NEW = 10


@pytest.fixture(scope="module")
def parts(tiny_dir, tmp_path_factory) -> dict[str, str]:
    """Same-rank pair (for 'linear') and a different-rank one (for 'cat'), all with list targets."""
    root = tmp_path_factory.mktemp("mix")
    return {
        "m1": make_lora(tiny_dir, str(root / "m1"), seed=31, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "m2": make_lora(tiny_dir, str(root / "m2"), seed=32, r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
        "m3": make_lora(tiny_dir, str(root / "m3"), seed=33, r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"]),
    }


CASES = [
    ("cat", ("m1", "m3"), (0.7, -0.4)),
    ("linear", ("m1", "m2"), (0.6, -0.9)),
    ("cat", ("m1", "m2", "m3"), (1.0, 0.5, 0.25)),
]


@pytest.fixture(scope="module")
def server(tiny_dir, parts):
    config = ServerConfig.of(model=tiny_dir, max_batch_size=6, max_seq_len=256, max_adapters=6, max_lora_rank=32)
    with ServerThread(config) as running:
        with Client(running.target, timeout=120) as client:
            for name, path in parts.items():
                client.load_adapter(name, path)
        yield running


@pytest.mark.parametrize(("method", "names", "weights"), CASES)
def test_mix_equals_peft_add_weighted_adapter(server, tiny_dir, parts, method, names, weights):
    tokenizer = tokenizer_for(tiny_dir)
    reference = peft_mix_model(tiny_dir, parts, names, weights, method)
    mix = dict(zip(names, weights, strict=True))
    with Client(server.target, timeout=120) as client:
        for i in range(2):
            expected = greedy_reference(reference, tokenizer, tokenizer(PROMPTS[i])["input_ids"], MAX_NEW)
            single = client.generate(
                PROMPTS[i], adapter_mix=mix, mix_method=method, max_new_tokens=MAX_NEW, logprobs=True
            )
            assert single.token_ids == expected.token_ids
            assert_logprobs_close(single.logprobs, expected.logprobs)
            component = client.generate(PROMPTS[i], adapter_id=names[0], max_new_tokens=MAX_NEW)
            assert component.token_ids != single.token_ids or i == 1  # the mix really differs from a part


@pytest.mark.parametrize(
    ("method", "options"), [("ties", {"density": 0.5, "majority_sign_method": "frequency"}), ("svd", {})]
)
def test_new_merge_methods_over_grpc_equal_peft(server, tiny_dir, parts, method, options):
    tokenizer = tokenizer_for(tiny_dir)
    names, weights = ("m1", "m2"), (0.8, -0.6)
    reference = peft_mix_model(tiny_dir, parts, names, weights, method, **options)
    expected = greedy_reference(reference, tokenizer, tokenizer(PROMPTS[0])["input_ids"], MAX_NEW)
    with Client(server.target, timeout=120) as client:
        got = client.generate(
            PROMPTS[0],
            adapter_mix=dict(zip(names, weights, strict=True)),
            mix_method=method,
            mix_density=options.get("density"),
            mix_majority_sign_method=options.get("majority_sign_method", ""),
            max_new_tokens=MAX_NEW,
            logprobs=True,
        )
    assert got.token_ids == expected.token_ids
    assert_logprobs_close(got.logprobs, expected.logprobs)


def test_mix_in_a_mixed_batch_and_invalidation(server, parts):
    from concurrent.futures import ThreadPoolExecutor

    mix = {"m1": 0.7, "m3": -0.4}

    def run(kind: str):
        with Client(server.target, timeout=120) as client:
            if kind == "mix":
                return client.generate(PROMPTS[2], adapter_mix=mix, max_new_tokens=MAX_NEW).token_ids
            return client.generate(PROMPTS[2], adapter_id=kind, max_new_tokens=MAX_NEW).token_ids

    kinds = ["mix", "", "m1", "m2", "mix", "m3"] * 2
    alone = {kind: run(kind) for kind in set(kinds)}
    with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        together = list(pool.map(run, kinds))
    assert together == [alone[kind] for kind in kinds]
    with Client(server.target, timeout=120) as client:
        mixes = [a for a in client.list_adapters() if a.adapter_id.startswith("mix|")]
        assert mixes and all(a.kind == "lora" for a in mixes)
        client.load_adapter("m3", parts["m2"], replace=True)  # a component changes: its mixes are dropped
        assert not any("m3=" in a.adapter_id for a in client.list_adapters())
        rebuilt = client.generate(PROMPTS[2], adapter_mix=mix, max_new_tokens=MAX_NEW).token_ids
        assert rebuilt != alone["mix"]
        client.load_adapter("m3", parts["m3"], replace=True)
        assert client.generate(PROMPTS[2], adapter_mix=mix, max_new_tokens=MAX_NEW).token_ids == alone["mix"]


def test_bad_mixes(server):
    def code(**kwargs) -> tuple[grpc.StatusCode, str]:
        with Client(server.target, timeout=60) as client, pytest.raises(DeltaserveError) as info:
            client.generate(PROMPTS[0], max_new_tokens=2, **kwargs)
        return info.value.code, info.value.message

    assert code(adapter_mix={"m1": 1.0}, mix_method="ties")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code(adapter_mix={"m1": 1.0}, adapter_id="m2")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code(adapter_mix={"m1": float("nan")})[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code(adapter_mix={"m1": 1.0, "nope": 1.0})[0] == grpc.StatusCode.NOT_FOUND
    status, message = code(adapter_mix={"m1": 1.0, "m3": 1.0}, mix_method="linear")
    assert status == grpc.StatusCode.FAILED_PRECONDITION and "one rank" in message
    assert code(mix_method="cat")[0] == grpc.StatusCode.INVALID_ARGUMENT
