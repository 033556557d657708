"""Sampling controls through a real server: seeds, top-k/top-p, repetition penalty against transformers,
stop strings, min_new_tokens, and the sampler's own processors."""

from __future__ import annotations

import pytest
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread

from tests.references import greedy_reference, load_reference_model, tokenizer_for


@pytest.fixture(scope="module")
def client(tiny_dir):
    with ServerThread(ServerConfig.of(model=tiny_dir, max_batch_size=4, max_seq_len=256)) as running:
        with Client(running.target, timeout=60) as client:
            yield client


def test_seeded_sampling_is_reproducible_and_seed_dependent(client):
    def run(seed):
        return client.generate(PROMPTS[0], max_new_tokens=16, temperature=1.5, seed=seed).token_ids

    assert run(7) == run(7)
    assert len({tuple(run(seed)) for seed in range(4)}) > 1


def test_top_k_one_equals_greedy(client):
    greedy = client.generate(PROMPTS[1], max_new_tokens=10).token_ids
    assert client.generate(PROMPTS[1], max_new_tokens=10, temperature=2.0, top_k=1, seed=3).token_ids == greedy


def test_tiny_top_p_equals_greedy(client):
    greedy = client.generate(PROMPTS[2], max_new_tokens=10).token_ids
    assert client.generate(PROMPTS[2], max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5).token_ids == greedy


def test_repetition_penalty_matches_transformers(client, tiny_dir):
    tokenizer = tokenizer_for(tiny_dir)
    model = load_reference_model(tiny_dir)
    changed = 0
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt)["input_ids"]
        plain = greedy_reference(model, tokenizer, ids, 12)
        for penalty in (0.3, 1.8):  # below 1 favours seen tokens, above 1 avoids them
            expected = greedy_reference(model, tokenizer, ids, 12, repetition_penalty=penalty)
            result = client.generate(prompt, max_new_tokens=12, repetition_penalty=penalty)
            assert result.token_ids == expected.token_ids
            changed += expected.token_ids != plain.token_ids
    assert changed > 0, "the penalty never changed the output: the comparison would be vacuous"


def test_stop_string_cuts_the_text(client):
    full = client.generate(PROMPTS[3], max_new_tokens=24)
    assert len(full.text) > 12
    stop = full.text[6:10]
    cut_at = full.text.find(stop)
    stopped = client.generate(PROMPTS[3], max_new_tokens=24, stop=[stop, "\x00never"])
    assert stopped.finish_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.text == full.text[:cut_at]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    streamed = list(client.generate_stream(PROMPTS[3], max_new_tokens=24, stop=[stop]))
    assert "".join(c.text for c in streamed) == stopped.text
