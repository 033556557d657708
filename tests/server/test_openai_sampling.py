"""The sampling fields real clients send, through the official `openai` SDK and the native client against one
live server: n and best_of (the prompt computed once), logprobs and top_logprobs, echo and prompt scoring,
token-id and batched prompts, logit_bias, presence/frequency penalties, stop_token_ids, ignore_eos, and a
seeded request's independence from its batch. Expected values come from PEFT/transformers or from the same
server's other door for the same request."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread

from tests.references import assert_logprobs_close, load_reference_model, prompt_logits, tokenizer_for

LONG_PROMPT = " ".join(PROMPTS)  # several KV-cache blocks: the n sequences share the full ones


@pytest.fixture(scope="module")
def server(tiny_dir, lora_dirs):
    config = ServerConfig.of(
        model=tiny_dir,
        http_port=0,
        adapter_root=[os.path.dirname(lora_dirs["qv8"])],
        max_batch_size=8,
        max_seq_len=256,
        max_adapters=3,
        max_lora_rank=16,
    )
    with ServerThread(config) as running:
        with Client(running.target) as client:
            client.load_adapter("qv8", lora_dirs["qv8"])
            client.load_adapter("pattern", lora_dirs["pattern"])
        yield running


@pytest.fixture(scope="module")
def oai(server):
    url = f"http://127.0.0.1:{server.server.http_port}/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def native(server):
    with Client(server.target, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return tokenizer_for(tiny_dir)


@pytest.fixture(scope="module")
def qv8_model(tiny_dir, lora_dirs):
    return load_reference_model(tiny_dir, lora_dirs["qv8"])


class PrefillCounter:
    """Counts the prompt items the engine's prefill forwards compute (wrapping the runner's method)."""

    def __init__(self, runner) -> None:
        self.runner, self.original, self.items = runner, runner.prefill, 0

    def __enter__(self) -> PrefillCounter:
        def counting(chunks, batch, **options):
            self.items += sum(len(chunk.token_ids) for chunk in chunks)
            return self.original(chunks, batch, **options)

        self.runner.prefill = counting
        return self

    def __exit__(self, *exc_info) -> None:
        self.runner.prefill = self.original


def test_n_choices_compute_the_prompt_once_and_follow_their_seeds(oai, native, server, tokenizer):
    prompt_len = len(tokenizer(LONG_PROMPT)["input_ids"])
    assert prompt_len > 20  # more than one full block
    options = dict(model="qv8", prompt=LONG_PROMPT, max_tokens=12, temperature=1.0, seed=7)
    with PrefillCounter(server.server.runner) as counter:
        reply = oai.completions.create(n=3, **options)
    # The first sequence computes the prompt; the others take its full blocks and compute the last partial one.
    block = server.server.engine.config.block_size
    assert counter.items == prompt_len + 2 * (prompt_len - (prompt_len - 1) // block * block)
    texts = [choice.text for choice in sorted(reply.choices, key=lambda c: c.index)]
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert len(set(texts)) > 1, "three sampled sequences came out the same"
    assert texts == [c.text for c in oai.completions.create(n=3, **options).choices]  # the same seed again
    alone = native.generate(LONG_PROMPT, adapter_id="qv8", max_new_tokens=12, temperature=1.0, seed=7)
    assert texts[0] == alone.text  # sequence 0 keeps the request's seed
    assert reply.usage.prompt_tokens == prompt_len
    assert 3 <= reply.usage.completion_tokens <= 36


def test_native_n_equals_openai_n_unary_and_streamed(oai, native):
    options = dict(max_new_tokens=10, temperature=1.0, seed=21)
    result = native.generate(PROMPTS[3], adapter_id="pattern", n=3, **options)
    reply = oai.completions.create(model="pattern", prompt=PROMPTS[3], n=3, max_tokens=10, temperature=1.0, seed=21)
    assert [s.text for s in result.sequences] == [c.text for c in reply.choices]
    assert [s.index for s in result.sequences] == [0, 1, 2] and result.text == result.sequences[0].text
    streamed = {0: "", 1: "", 2: ""}
    for chunk in native.generate_stream(PROMPTS[3], adapter_id="pattern", n=3, **options):
        streamed[chunk.index] += chunk.text
    assert list(streamed.values()) == [s.text for s in result.sequences]


def test_best_of_returns_the_most_likely_of_its_sequences(oai):
    options = dict(model="pattern", prompt=PROMPTS[1], max_tokens=8, temperature=1.2, seed=3)
    every = oai.completions.create(n=4, logprobs=0, **options).choices
    ranked = sorted(every, key=lambda c: math.fsum(c.logprobs.token_logprobs), reverse=True)
    best = oai.completions.create(n=2, best_of=4, **options).choices
    assert [c.text for c in best] == [c.text for c in ranked[:2]]
    assert all(c.logprobs is None for c in best)  # ranked internally, not returned unasked


def test_streamed_n_choices_equal_the_unary_ones(oai):
    options = dict(model="qv8", prompt=PROMPTS[2], max_tokens=10, temperature=0.9, seed=11, n=2)
    unary = {c.index: c.text for c in oai.completions.create(**options).choices}
    streamed = {0: "", 1: ""}
    finished = set()
    for chunk in oai.completions.create(stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == unary and finished == {0, 1}
    chat = oai.chat.completions.create(
        model="qv8", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=6, temperature=1.0, seed=2, n=3
    )
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_logprobs_and_top_logprobs_equal_peft(oai, native, tokenizer, qv8_model):
    reply = oai.completions.create(model="qv8", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=5)
    result = native.generate(PROMPTS[0], adapter_id="qv8", max_new_tokens=6, logprobs=True, top_logprobs=5)
    assert reply.choices[0].text == result.text
    prompt_ids = tokenizer(PROMPTS[0])["input_ids"]
    expected = prompt_logits(qv8_model, prompt_ids + result.token_ids).log_softmax(-1)[len(prompt_ids) - 1 : -1]
    for step, (token, top) in enumerate(zip(result.token_ids, result.top_logprobs, strict=True)):
        values, ids = expected[step].topk(5)
        assert token == ids[0]  # greedy: the most likely token
        assert [t for t, _ in top] == ids.tolist()
        assert_logprobs_close([v for _, v in top], values.tolist())
        listed = reply.choices[0].logprobs.top_logprobs[step]
        assert_logprobs_close(sorted(listed.values(), reverse=True)[:5], values.tolist()[: len(listed)])
    chat = oai.chat.completions.create(
        model="qv8",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=4,
        temperature=0.8,
        seed=5,
        logprobs=True,
        top_logprobs=5,
    )
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 5
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6  # the most likely comes first
        assert bytes(entry.bytes).decode(errors="replace") == entry.token or "\ufffd" in entry.token


def test_echo_scores_token_id_prompts_like_peft(oai, tokenizer, qv8_model):
    """lm-evaluation-harness's loglikelihood request: token-id prompts, echo, logprobs 1, nothing generated."""
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS[:3]]
    reply = oai.completions.create(model="qv8", prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice, ids in zip(reply.choices, prompts, strict=True):
        logprobs = choice.logprobs
        assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
        assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
        expected = prompt_logits(qv8_model, ids).log_softmax(-1)
        chosen = [expected[p - 1, ids[p]].item() for p in range(1, len(ids))]
        assert_logprobs_close(logprobs.token_logprobs[1:], chosen)
        for p in range(1, len(ids)):  # the most likely token's log-probability is listed at each position
            assert max(logprobs.top_logprobs[p].values()) == pytest.approx(expected[p - 1].max().item(), rel=1e-4)
    echoed = oai.completions.create(model="qv8", prompt=PROMPTS[0], max_tokens=3, echo=True, temperature=0)
    plain = oai.completions.create(model="qv8", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text


def test_logit_bias_steers_and_bans_tokens(oai, native):
    greedy = native.generate(PROMPTS[3], max_new_tokens=6)
    forced = 1234
    biased = native.generate(PROMPTS[3], max_new_tokens=6, logit_bias={forced: 100.0})
    assert biased.token_ids == [forced] * 6 != greedy.token_ids
    banned = native.generate(PROMPTS[3], max_new_tokens=6, logit_bias={greedy.token_ids[0]: -100.0})
    assert banned.token_ids[0] != greedy.token_ids[0]
    over_http = oai.completions.create(
        model="base", prompt=PROMPTS[3], max_tokens=6, temperature=0, logit_bias={str(forced): 100}
    )
    assert over_http.choices[0].text == biased.text


def test_presence_and_frequency_penalties_equal_their_formula_on_peft_logits(oai, native, tokenizer, qv8_model):
    """Three tokens biased far above the rest: greedy alone repeats one, the penalties rotate through them."""
    prompt_ids = tokenizer(PROMPTS[2])["input_ids"]
    presence, frequency, bias = 1.0, 0.7, {101: 15.0, 202: 15.0, 303: 15.0}
    generated: list[int] = []
    for _ in range(10):  # the reference: logit bias, then OpenAI's penalties over the output, on PEFT's logits
        logits = prompt_logits(qv8_model, prompt_ids + generated)[-1].clone()
        for token, value in bias.items():
            logits[token] += value
        for token in set(generated):
            logits[token] -= presence + frequency * generated.count(token)
        generated.append(int(logits.argmax()))
    options = dict(presence_penalty=presence, frequency_penalty=frequency)
    result = native.generate(PROMPTS[2], adapter_id="qv8", max_new_tokens=10, logit_bias=bias, **options)
    plain = native.generate(PROMPTS[2], adapter_id="qv8", max_new_tokens=10, logit_bias=bias)
    assert result.token_ids == generated != plain.token_ids
    reply = oai.completions.create(
        model="qv8",
        prompt=PROMPTS[2],
        max_tokens=10,
        temperature=0,
        logit_bias={str(token): value for token, value in bias.items()},
        **options,
    )
    assert reply.choices[0].text == result.text


def test_stop_token_ids_end_and_ignore_eos_continues(oai, native, tokenizer):
    greedy = native.generate(PROMPTS[0], max_new_tokens=8)
    stop = greedy.token_ids[3]
    stopped = native.generate(PROMPTS[0], max_new_tokens=8, stop_token_ids=[stop])
    first = greedy.token_ids.index(stop)
    assert stopped.token_ids == greedy.token_ids[: first + 1] and stopped.finish_reason == "eos"
    eos = tokenizer.eos_token_id
    ends = native.generate(PROMPTS[0], max_new_tokens=8, logit_bias={eos: 100.0})
    assert ends.token_ids == [eos] and ends.finish_reason == "eos"
    kept = oai.completions.create(
        model="base",
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"ignore_eos": True},
    )
    assert kept.usage.completion_tokens == 8 and kept.choices[0].finish_reason == "length"


def test_a_seeded_request_is_independent_of_its_batch(native, server):
    """The same seeded request, with every sampling control on, alone and inside busy mixed batches (other
    adapters, greedy and sampled rows, penalties), at different places: the same tokens each time."""
    probe = dict(
        adapter_id="qv8",
        max_new_tokens=16,
        temperature=0.9,
        top_p=0.9,
        top_k=40,
        min_p=0.02,
        repetition_penalty=1.1,
        presence_penalty=0.3,
        seed=1234,
        logprobs=True,
    )
    alone = native.generate(PROMPTS[1], **probe)
    others = [
        dict(adapter_id="pattern", max_new_tokens=20, temperature=1.0, seed=i) if i % 2 else dict(max_new_tokens=18)
        for i in range(7)
    ]

    def run(job):
        with Client(server.target, timeout=120) as client:
            return client.generate(job[0], **job[1])

    for place in (0, 3, 7):
        jobs = [(PROMPTS[i % 4], options) for i, options in enumerate(others)]
        jobs.insert(place, (PROMPTS[1], probe))
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs))
        assert results[place].token_ids == alone.token_ids, f"the seeded row changed at place {place}"
        assert_logprobs_close(results[place].logprobs, alone.logprobs)
    unseeded = {tuple(native.generate(PROMPTS[1], max_new_tokens=8, temperature=1.0).token_ids) for _ in range(3)}
    assert len(unseeded) > 1
    assert torch.isfinite(torch.tensor(alone.logprobs)).all()
