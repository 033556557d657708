"""The batched sampler alone: each stage against transformers' logits processors or a written-out formula, a
row's result independent of its batch, per-row failures, and the counter-based draws' distribution."""

from __future__ import annotations

import math

import pytest
import torch
from deltaserve.server.engine.sampling import Sampler, SamplingParams, sequence_seed, uniforms
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 300
EOS = (2,)


def _sampler() -> Sampler:
    return Sampler(VOCAB, torch.device("cpu"), EOS)


def _logits(rows: int, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def _params(**kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=8, **kwargs)


MIXED = [
    _params(),
    _params(temperature=0.8, top_p=0.95, seed=11),
    _params(temperature=0.8, top_k=50, repetition_penalty=1.1, seed=12),
    _params(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
    _params(temperature=1.0, min_p=0.1, seed=13, logprobs=True, top_logprobs=5),
    _params(logit_bias=((7, 30.0), (9, -100.0)), logprobs=True),
    _params(temperature=1.3, seed=14, allowed_token_ids=(3, 4, 5, 6)),
    _params(temperature=0.7, top_k=5, top_p=0.5, min_p=0.05, seed=15, min_new_tokens=3),
]
PROMPT = [5, 6, 7, 8, 40, 41]


def _run(params: list[SamplingParams], logits_by_step: list[torch.Tensor], order: list[int] | None = None):
    """Sample every step with a fresh sampler; `order` places the rows in the batch (logits rows follow)."""
    sampler = _sampler()
    order = order or list(range(len(params)))
    rows = [sampler.new_row(params[i], PROMPT) for i in order]
    tokens = []
    for logits in logits_by_step:
        sampled = sampler.sample(logits[order].clone(), rows)
        assert not sampled.failed
        back = {row: sampled.tokens[position] for position, row in enumerate(order)}
        tokens.append([back[i] for i in range(len(params))])
    return tokens


def test_a_row_gets_the_same_tokens_alone_in_any_batch_at_any_place():
    steps = [_logits(len(MIXED), seed) for seed in range(6)]
    together = _run(MIXED, steps)
    reversed_order = _run(MIXED, steps, list(reversed(range(len(MIXED)))))
    assert together == reversed_order
    for i, params in enumerate(MIXED):
        alone = _run([params], [step[i : i + 1] for step in steps])
        assert [step[i] for step in together] == [step[0] for step in alone], f"row {i} depends on its batch"
    # inside a bigger batch of other rows, at another position
    padded = [_params(temperature=1.0, seed=99 + j) for j in range(5)] + MIXED
    bigger = _run(padded, [torch.cat([_logits(5, 100 + s), step]) for s, step in enumerate(steps)])
    assert [step[5:] for step in bigger] == together


def test_seeded_rows_differ_by_seed_and_unseeded_rows_are_fresh():
    steps = [_logits(1, seed, scale=1.0) for seed in range(12)]
    runs = {tuple(t[0] for t in _run([_params(temperature=1.0, seed=seed)], steps)) for seed in range(4)}
    assert len(runs) > 1
    fresh = {tuple(t[0] for t in _run([_params(temperature=1.0)], steps)) for _ in range(4)}
    assert len(fresh) > 1


def _hf_probabilities(logits: torch.Tensor, params: SamplingParams, seen: list[int]) -> torch.Tensor:
    """transformers' processors in generate's order, then softmax."""
    ids = torch.tensor([seen])
    scores = logits[None].clone()
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    if params.min_p:
        scores = MinPLogitsWarper(params.min_p)(ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize(
    ("params", "vocab", "scale"),
    [
        (_params(temperature=0.8, top_p=0.9), VOCAB, 2.0),
        (_params(temperature=0.8, top_k=50, repetition_penalty=1.1), VOCAB, 2.0),
        (_params(temperature=1.2, top_k=20, top_p=0.7), VOCAB, 2.0),
        (_params(temperature=1.0, min_p=0.05), VOCAB, 2.0),
        (_params(temperature=0.6), VOCAB, 2.0),
        # a nucleus wider than the first candidates (and than the second): drawn again from more of them
        (_params(temperature=1.0, top_p=0.95), 6000, 0.3),
        (_params(temperature=1.0, top_p=0.5, min_p=0.5), 6000, 1.0),
    ],
)
def test_draws_follow_transformers_warped_distribution(params, vocab, scale):
    """Counter-based draws (one batched step, a row each) from one step's logits: every drawn token is one that
    transformers keeps, and the frequencies match its probabilities (total variation below 0.03; a kept set
    too wide for frequencies is checked for coverage)."""
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * scale
    expected = _hf_probabilities(logits, params, PROMPT)
    draws = 20_000 if vocab <= VOCAB else 3_000  # one row per draw: keep the wide case's batch small
    sampler = Sampler(vocab, torch.device("cpu"), EOS)
    rows = [sampler.new_row(SamplingParams(**{**params.__dict__, "seed": i}), PROMPT) for i in range(draws)]
    tokens = torch.tensor(sampler.sample(logits.expand(draws, -1).clone(), rows).tokens)
    assert bool((expected[tokens] > 0).all()), "a token outside transformers' kept set was drawn"
    kept = int((expected > 0).sum())
    if kept <= 500:
        observed = torch.bincount(tokens, minlength=vocab).float() / draws
        assert 0.5 * (observed - expected).abs().sum() < 0.03
    else:  # too many tokens for frequencies: the draws cover the kept set as a uniform-ish draw would
        assert len(set(tokens.tolist())) > 0.8 * min(kept, draws) * (1 - math.exp(-draws / kept))


def test_penalties_and_bias_match_their_formulas():
    logits = _logits(1, seed=8)[0]
    params = _params(repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.3, logit_bias=((11, 5.0),))
    sampler = _sampler()
    row = sampler.new_row(params, PROMPT)
    generated = []
    for step in range(4):
        tokens = sampler.sample(logits[None].clone(), [row]).tokens
        seen = set(PROMPT) | set(generated)
        expected = logits.clone()
        for token in seen:  # transformers' repetition penalty over prompt and output
            value = expected[token]
            expected[token] = value * 1.5 if value < 0 else value / 1.5
        for token in set(generated):  # OpenAI's presence and frequency penalties over the output
            expected[token] -= 0.7 + 0.3 * generated.count(token)
        expected[11] += 5.0
        assert tokens[0] == int(expected.argmax()), f"step {step}"
        generated.append(tokens[0])
    assert len(set(generated)) > 1, "the penalties never changed the choice: the check would be vacuous"


def test_min_new_tokens_masks_eos_and_stop_tokens_and_ignore_eos_keeps_it():
    logits = torch.zeros(1, VOCAB)
    logits[0, 2], logits[0, 7], logits[0, 9] = 100.0, 90.0, 80.0
    sampler = _sampler()
    row = sampler.new_row(_params(min_new_tokens=2, stop_token_ids=(7,)), [])
    assert row.stop_ids == {2, 7}
    assert sampler.sample(logits.clone(), [row]).tokens == [9]
    assert sampler.sample(logits.clone(), [row]).tokens == [9]
    assert sampler.sample(logits.clone(), [row]).tokens == [2]  # two tokens generated: EOS allowed again
    assert sampler.new_row(_params(ignore_eos=True), []).stop_ids == frozenset()


def test_logprobs_are_raw_and_top_logprobs_are_the_most_likely():
    logits = _logits(2, seed=4)
    sampler = _sampler()
    rows = [
        sampler.new_row(_params(temperature=0.7, top_k=5, logprobs=True, top_logprobs=4, seed=1), []),
        sampler.new_row(_params(logprobs=True, top_logprobs=2, repetition_penalty=2.0), PROMPT),
    ]
    sampled = sampler.sample(logits.clone(), rows)
    expected = logits.log_softmax(-1)
    for i, token in enumerate(sampled.tokens):
        assert sampled.logprobs[i] == pytest.approx(expected[i, token].item(), rel=1e-5)
        values, ids = expected[i].topk(rows[i].params.top_logprobs)
        assert [t for t, _ in sampled.top_logprobs[i]] == ids.tolist()
        assert [v for _, v in sampled.top_logprobs[i]] == pytest.approx(values.tolist(), rel=1e-5)


def test_a_row_with_non_finite_logits_or_no_allowed_token_fails_alone():
    logits = _logits(4, seed=3)
    logits[1, 7] = float("nan")
    logits[2, 4] = float("inf")
    params = [_params(), _params(temperature=1.0, seed=2), _params(), _params(temperature=0.8, top_p=0.9, seed=5)]
    sampler = _sampler()
    rows = [sampler.new_row(p, []) for p in params]
    sampled = sampler.sample(logits.clone(), rows)
    assert sampled.failed == {1, 2}
    assert sampled.tokens[0] == int(logits[0].argmax())
    alone = _run([params[3]], [logits[3:]])
    assert sampled.tokens[3] == alone[0][0]
    blocked = sampler.new_row(_params(allowed_token_ids=(5,), logit_bias=((5, float("-inf")),)), [])
    assert sampler.sample(_logits(1).clone(), [blocked]).failed == {0}


def test_penalty_buffers_are_reused_and_reset():
    sampler = _sampler()
    first = sampler.new_row(_params(frequency_penalty=1.0), PROMPT)
    sampler.sample(_logits(1).clone(), [first])
    buffer_row = first.penalty_row
    sampler.release(first)
    assert first.penalty_row == -1
    second = sampler.new_row(_params(frequency_penalty=1.0), [])
    assert second.penalty_row == buffer_row
    assert float(sampler._penalties.offset[second.penalty_row].abs().sum()) == 0.0


def test_uniforms_are_uniform_and_sequence_seeds_differ():
    u = uniforms(torch.arange(50_000) * 7919, torch.full((50_000,), 3))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    histogram = torch.histc(u.float(), bins=10, min=0, max=1) / 50_000
    assert float((histogram - 0.1).abs().max()) < 0.01
    assert len({sequence_seed(42, i) for i in range(8)}) == 8 and sequence_seed(42, 0) == 42


def test_seeds_across_the_whole_uint64_range_draw():
    sampler = _sampler()
    rows = [sampler.new_row(_params(temperature=1.0, seed=seed), []) for seed in (0, 2**63 - 1, 2**63, 2**64 - 1)]
    sampled = sampler.sample(_logits(4).clone(), rows)
    assert not sampled.failed and rows[2].seed != rows[3].seed
