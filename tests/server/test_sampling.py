"""Sampling controls through a real server: seeds, top-k/top-p, repetition penalty against transformers,
stop strings, min_new_tokens, and the sampler's own processors."""

from __future__ import annotations

import pytest
import torch
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.server.engine.sampling import RowState, SamplingParams, _process_row, sample
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


def test_min_new_tokens_masks_eos():
    eos = torch.tensor([2, 7])
    row = RowState(SamplingParams(max_new_tokens=5, min_new_tokens=3), None, [], generated=1)
    logits = torch.zeros(10)
    logits[2], logits[7] = 100.0, 90.0  # EOS ids are by far the most likely tokens
    tokens = sample(logits[None], [row], eos).tokens
    assert tokens[0] not in (2, 7)
    row.generated = 3
    tokens = sample(logits[None], [row], eos).tokens
    assert tokens[0] == 2


def test_rows_are_processed_independently_in_one_batch():
    """Masked, penalised, sampled and plain rows side by side: each gets what it would alone."""
    eos = torch.tensor([2])
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    logits[:, 2] = 50.0
    rows = [
        RowState(SamplingParams(max_new_tokens=5, min_new_tokens=2), None, [], 0),
        RowState(SamplingParams(max_new_tokens=5, repetition_penalty=1e6, min_new_tokens=2), None, [4, 5], 1),
        RowState(SamplingParams(max_new_tokens=5), None, [], 0),
        RowState(SamplingParams(max_new_tokens=5, temperature=0.5, seed=1), torch.Generator().manual_seed(1), [], 0),
    ]
    tokens = sample(logits, rows, eos).tokens
    alone = [sample(logits[i : i + 1].clone(), [row], eos).tokens[0] for i, row in enumerate(rows[:3])]
    assert tokens[:3] == alone
    assert tokens[0] != 2 and tokens[1] not in (2, 4, 5) and tokens[2] == 2
    assert _process_row(logits[1].clone(), rows[1])[4] < logits[1, 4]  # the penalty lowers a seen token


def test_logprobs_are_raw_model_logprobs_even_when_sampling():
    logits = torch.randn(2, 50)
    rows = [
        RowState(
            SamplingParams(max_new_tokens=4, temperature=0.7, top_k=5, logprobs=True),
            torch.Generator().manual_seed(1),
            [],
            0,
        ),
        RowState(SamplingParams(max_new_tokens=4, logprobs=True), None, [], 0),
    ]
    sampled = sample(logits, rows, torch.tensor([], dtype=torch.long))
    tokens, logprobs = sampled.tokens, sampled.logprobs
    expected = logits.log_softmax(-1)
    assert logprobs == pytest.approx([expected[0, tokens[0]].item(), expected[1, tokens[1]].item()])
    assert tokens[1] == logits[1].argmax().item()


def test_a_row_with_non_finite_logits_fails_alone():
    """NaN logits in one row, and a repetition penalty that turns another row's sampled distribution into
    inf/inf: both rows fail, the others get exactly the tokens they get alone."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    logits[1, 7] = float("nan")
    rows = [
        RowState(SamplingParams(max_new_tokens=4), None, [], 0),
        RowState(SamplingParams(max_new_tokens=4), None, [], 0),
        RowState(SamplingParams(max_new_tokens=4, temperature=1.0, repetition_penalty=1e-40), _gen(4), [3], 0),
        RowState(SamplingParams(max_new_tokens=4, temperature=0.8, seed=5), _gen(5), [], 0),
    ]
    sampled = sample(logits.clone(), rows, torch.tensor([], dtype=torch.long))
    assert sampled.failed == {1, 2}
    assert sampled.tokens[0] == sample(logits[:1].clone(), rows[:1], torch.tensor([], dtype=torch.long)).tokens[0]
    alone = sample(logits[3:].clone(), [RowState(rows[3].params, _gen(5), [], 0)], torch.tensor([], dtype=torch.long))
    assert sampled.tokens[3] == alone.tokens[0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
