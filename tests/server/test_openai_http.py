"""The OpenAI-compatible HTTP front door, driven by the official `openai` package against a live server on
loopback. Every expected output comes from the same server's gRPC API (the repo's own client) for the same
request: the HTTP layer must be a translation, never a second generation path."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
import openai
import pytest
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.cli import add_serve_subcommand
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread
from transformers import AutoTokenizer

MAX_SEQ_LEN = 128
TOKEN = "test-admin-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(tiny_dir, lora_dirs):
    config = ServerConfig.of(
        model=tiny_dir,
        http_port=0,
        admin_token=TOKEN,
        adapter_root=[os.path.dirname(lora_dirs["qv8"])],
        max_batch_size=4,
        max_seq_len=MAX_SEQ_LEN,
        max_adapters=3,
        max_lora_rank=16,
        max_request_bytes=64 * 1024,
    )
    with ServerThread(config) as running:
        with Client(running.target, metadata=AUTH) as client:
            client.load_adapter("qv8", lora_dirs["qv8"])
            client.load_adapter("pattern", lora_dirs["pattern"])
        yield running


@pytest.fixture(scope="module")
def base_url(server) -> str:
    assert server.server.http_port, "port 0 must be resolved to the bound port"
    return f"http://127.0.0.1:{server.server.http_port}/v1"


@pytest.fixture(scope="module")
def oai(base_url):
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.target, timeout=60, metadata=AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def base_name(grpc_client) -> str:
    return grpc_client.model_info().model_name


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> dict:
        return json.loads(self.text)


def _http(url: str, body: dict | bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    """A raw HTTP call (GET without a body), for what the openai package does not send."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode())
    except urllib.error.HTTPError as err:
        return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode())


def _adapter(model: str, base_name: str) -> str:
    return "" if model in ("", "base", base_name) else model


def _assert_still_serving(oai, grpc_client) -> None:
    reply = oai.completions.create(model="qv8", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    assert grpc_client.generate(PROMPTS[0], max_new_tokens=3).generated_tokens == 3


# ---- completions and chat equal the gRPC path ------------------------------------------------------------
@pytest.mark.parametrize("model", ["base", "", "BASE_NAME", "qv8", "pattern"])
def test_completion_equals_grpc(oai, grpc_client, base_name, tokenizer, model):
    model = base_name if model == "BASE_NAME" else model
    reply = oai.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=1)
    expected = grpc_client.generate(PROMPTS[1], adapter_id=_adapter(model, base_name), max_new_tokens=12, logprobs=True)
    choice = reply.choices[0]
    assert choice.text == expected.text
    assert choice.logprobs.token_logprobs == expected.logprobs
    assert choice.logprobs.tokens == [tokenizer.decode([token]) for token in expected.token_ids]
    # greedy: the chosen token is the most likely one, so the top-1 list is the chosen token
    assert choice.logprobs.top_logprobs == [
        {t: lp} for t, lp in zip(choice.logprobs.tokens, expected.logprobs, strict=True)
    ]
    offsets = [sum(len(t) for t in choice.logprobs.tokens[:i]) for i in range(len(expected.token_ids))]
    assert choice.logprobs.text_offset == offsets
    assert choice.finish_reason == {"length": "length", "eos": "stop"}[expected.finish_reason]
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.generated_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.generated_tokens
    assert reply.model == (model or base_name) and reply.object == "text_completion" and reply.id.startswith("cmpl-")


def test_adapters_change_the_output(oai):
    """So that the equality checks above cannot pass with the adapter silently dropped."""
    texts = {
        model: oai.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12, temperature=0).choices[0].text
        for model in ("base", "qv8", "pattern")
    }
    assert len(set(texts.values())) == 3


@pytest.mark.parametrize("model", ["base", "qv8"])
def test_chat_equals_grpc(oai, grpc_client, base_name, model):
    reply = oai.chat.completions.create(
        model=model, messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=1
    )
    expected = grpc_client.generate(
        messages=CHAT, adapter_id=_adapter(model, base_name), max_new_tokens=10, logprobs=True
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    content = choice.logprobs.content
    # The second request reads the first one's prompt blocks from the prefix cache and computes only the rest,
    # with other matrix shapes: the same tokens, log-probabilities equal to fp32 rounding.
    assert [entry.logprob for entry in content] == pytest.approx(expected.logprobs, rel=1e-5)
    assert [[top.logprob for top in entry.top_logprobs] for entry in content] == [[e.logprob] for e in content]
    # exact bytes per token, even where a token holds part of a UTF-8 character
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.generated_tokens
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_chat_content_parts_and_max_completion_tokens(oai, grpc_client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    reply = oai.chat.completions.create(model="qv8", messages=parts, max_completion_tokens=6, temperature=0)
    expected = grpc_client.generate(
        messages=[{"role": "user", "content": "Hello\nthere"}], adapter_id="qv8", max_new_tokens=6
    )
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == 6


def test_stream_completion_equals_grpc(oai, grpc_client):
    chunks = list(
        oai.completions.create(
            model="pattern",
            prompt=PROMPTS[2],
            max_tokens=16,
            temperature=0,
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    expected = grpc_client.generate(PROMPTS[2], adapter_id="pattern", max_new_tokens=16, logprobs=True)
    *text_chunks, usage_chunk = chunks
    assert len(text_chunks) > 1
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == expected.text
    assert [lp for chunk in text_chunks for lp in chunk.choices[0].logprobs.token_logprobs] == expected.logprobs
    offsets = [o for chunk in text_chunks for o in chunk.choices[0].logprobs.text_offset]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(chunk.choices[0].finish_reason is None for chunk in text_chunks[:-1])
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == expected.prompt_tokens
    assert usage_chunk.usage.completion_tokens == expected.generated_tokens
    assert len({chunk.id for chunk in chunks}) == 1


def test_stream_chat_equals_grpc(oai, grpc_client):
    chunks = list(oai.chat.completions.create(model="qv8", messages=CHAT, max_tokens=12, temperature=0, stream=True))
    expected = grpc_client.generate(messages=CHAT, adapter_id="qv8", max_new_tokens=12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings(oai, grpc_client, as_list):
    free = grpc_client.generate(PROMPTS[3], adapter_id="qv8", max_new_tokens=24)
    stop = free.text[len(free.text) // 2 :][:3]  # a piece of the free run's own output
    assert stop.strip(), "the free run should give a non-blank piece to stop at"
    expected = grpc_client.generate(PROMPTS[3], adapter_id="qv8", max_new_tokens=24, stop=[stop])
    reply = oai.completions.create(
        model="qv8", prompt=PROMPTS[3], max_tokens=24, temperature=0, stop=[stop] if as_list else stop
    )
    choice = reply.choices[0]
    assert choice.text == expected.text == free.text[: free.text.index(stop)]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop
    assert reply.usage.completion_tokens == expected.generated_tokens
    streamed = oai.completions.create(
        model="qv8", prompt=PROMPTS[3], max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected.text


def test_seeded_sampling_equals_grpc(oai, grpc_client):
    options = dict(temperature=0.9, top_p=0.8, seed=1234)
    reply = oai.completions.create(model="pattern", prompt=PROMPTS[0], max_tokens=10, **options)
    expected = grpc_client.generate(PROMPTS[0], adapter_id="pattern", max_new_tokens=10, **options)
    assert reply.choices[0].text == expected.text


def test_concurrent_mixed_adapters_equal_grpc(base_url, grpc_client):
    """Requests for different adapters share batches; each must still equal its own gRPC run."""
    jobs = [(model, PROMPTS[i % 4]) for i, model in enumerate(["base", "qv8", "pattern"] * 3)]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
            calls = [
                client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
                for model, prompt in jobs
            ]
            return await asyncio.gather(*calls)

    replies = asyncio.run(run_all())
    for (model, prompt), reply in zip(jobs, replies, strict=True):
        expected = grpc_client.generate(prompt, adapter_id="" if model == "base" else model, max_new_tokens=10)
        assert reply.choices[0].text == expected.text, model


def test_ignored_fields_are_harmless(oai, grpc_client):
    reply = oai.completions.create(
        model="qv8", prompt=PROMPTS[0], max_tokens=5, temperature=0, user="someone", n=1, echo=False, best_of=1
    )
    assert reply.choices[0].text == grpc_client.generate(PROMPTS[0], adapter_id="qv8", max_new_tokens=5).text


# ---- models --------------------------------------------------------------------------------------------
def test_models_list(oai, grpc_client, base_name):
    cards = {card.id: card for card in oai.models.list().data}
    adapters = {info.adapter_id for info in grpc_client.list_adapters() if info.state != "unloading"}
    assert set(cards) == {base_name} | adapters
    assert {"qv8", "pattern"} <= adapters
    for card in cards.values():
        assert card.object == "model" and card.owned_by == "deltaserve" and card.created > 0
    assert cards[base_name].model_extra["parent"] is None
    assert cards[base_name].model_extra["max_model_len"] == MAX_SEQ_LEN
    assert cards["qv8"].model_extra["parent"] == base_name
    assert oai.models.retrieve("qv8").id == "qv8"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


# ---- errors --------------------------------------------------------------------------------------------
BAD_COMPLETIONS = {
    "n above --max-n": (dict(n=17), "n"),
    "n zero": (dict(n=0), "n"),
    "negative temperature": (dict(temperature=-0.5), "temperature"),
    "temperature not a number": (dict(extra_body={"temperature": "hot"}), "temperature"),
    "top_p zero": (dict(top_p=0.0), "top_p"),
    "max_tokens zero": (dict(max_tokens=0), "max_tokens"),
    "max_tokens beyond context": (dict(max_tokens=MAX_SEQ_LEN), "max_tokens"),
    "prompt beyond context": (dict(prompt="word " * (MAX_SEQ_LEN + 10)), "prompt"),
    "empty prompt": (dict(prompt=""), "prompt"),
    "token id outside the vocabulary": (dict(prompt=[1, 10**6]), "prompt"),
    "too many prompts": (dict(prompt=["a"] * 257), "prompt"),
    "an empty prompt in a list": (dict(prompt=["a", ""]), "prompt[1]"),
    "empty stop": (dict(stop=[""]), "stop"),
    "best_of below n": (dict(n=3, best_of=2), "best_of"),
    "best_of above --max-n": (dict(best_of=17), "best_of"),
    "suffix": (dict(suffix="tail"), "suffix"),
    "logit_bias token outside the vocabulary": (dict(logit_bias={"999999": 5}), "logit_bias"),
    "logit_bias key not a token id": (dict(logit_bias={"hello": 5}), "logit_bias"),
    "logit_bias beyond 100": (dict(logit_bias={"42": 500}), "logit_bias"),
    "presence_penalty beyond 2": (dict(presence_penalty=2.5), "presence_penalty"),
    "logprobs 21": (dict(logprobs=21), "logprobs"),
    "min_p above 1": (dict(extra_body={"min_p": 1.5}), "min_p"),
    "stop_token_ids outside the vocabulary": (dict(extra_body={"stop_token_ids": [10**7]}), "stop_token_ids"),
    "unknown field": (dict(extra_body={"frobnicate": True}), "frobnicate"),
    "negative min_tokens": (dict(extra_body={"min_tokens": -1}), "min_tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMPLETIONS))
def test_bad_completion_is_400(oai, case):
    overrides, param = BAD_COMPLETIONS[case]
    request = dict(model="qv8", prompt="hi", max_tokens=4, temperature=0) | overrides
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            reply = oai.completions.create(stream=stream, **request)
            list(reply) if stream else None
        error = info.value.body
        assert error["param"] == param, error
        assert error["type"] == "invalid_request_error"
        assert param.split(".")[-1] in error["message"] or param == "prompt", error


BAD_CHATS = {
    "tool with a bad name": (
        dict(tools=[{"type": "function", "function": {"name": "no spaces", "parameters": {}}}]),
        "tools[0].function.name",
    ),
    "top_logprobs 21": (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    "image part": (
        dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "messages[0].content",
    ),
    "no messages": (dict(messages=[]), "messages"),
    "message without role": (dict(messages=[{"content": "hi"}]), "messages.0.role"),
    "unknown response format": (dict(response_format={"type": "xml"}), "response_format.type"),
    "frequency_penalty below -2": (dict(frequency_penalty=-3.0), "frequency_penalty"),
    "tool_choice naming no tool": (
        dict(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        "tool_choice",
    ),
    "guided_regex refused by the compiler": (dict(extra_body={"guided_regex": "a{1,99999}"}), "guided_regex"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHATS))
def test_bad_chat_is_400(oai, case):
    overrides, param = BAD_CHATS[case]
    request = dict(model="qv8", messages=CHAT, max_tokens=4, temperature=0) | overrides
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(**request)
    assert info.value.body["param"] == param, info.value.body


def test_unknown_model_is_404(oai, grpc_client, base_name):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as info:
            reply = oai.completions.create(model="missing", prompt="hi", max_tokens=3, stream=stream)
            list(reply) if stream else None
        assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
        assert "'missing'" in info.value.body["message"] and base_name in info.value.body["message"]
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(model="missing", messages=CHAT, max_tokens=3, stream=stream)
    _assert_still_serving(oai, grpc_client)


def test_malformed_bodies(base_url, oai, grpc_client):
    url = f"{base_url}/completions"
    not_json = _http(url, b"{oops")
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    missing = _http(url, {"model": "qv8"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    too_big = _http(url, {"model": "qv8", "prompt": "x" * 100_000})
    assert too_big.status_code == 413 and "bytes" in too_big.json()["error"]["message"]
    nowhere = _http(f"{base_url}/nowhere")
    assert nowhere.status_code == 404 and "error" in nowhere.json()
    bad_timeout = _http(url, {"prompt": "hi"}, {"x-request-timeout": "soon"})
    assert bad_timeout.status_code == 400 and "x-request-timeout" in bad_timeout.json()["error"]["message"]
    _assert_still_serving(oai, grpc_client)


def test_bad_requests_do_not_disturb_a_running_stream(oai, grpc_client):
    reference = grpc_client.generate(PROMPTS[2], adapter_id="qv8", max_new_tokens=40)
    stream = oai.completions.create(model="qv8", prompt=PROMPTS[2], max_tokens=40, temperature=0, stream=True)
    pieces = [next(stream).choices[0].text]
    for overrides, _ in BAD_COMPLETIONS.values():
        with pytest.raises(openai.BadRequestError):
            oai.completions.create(**(dict(model="qv8", prompt="hi", max_tokens=4, temperature=0) | overrides))
    pieces += [chunk.choices[0].text for chunk in stream]
    assert "".join(pieces) == reference.text


@pytest.mark.parametrize(
    "overrides",
    [
        dict(temperature=1e-40),
        dict(temperature=1e39, extra_body={"min_tokens": 3}),
        dict(extra_body={"repetition_penalty": 1e39}),
    ],
    ids=["tiny temperature", "temperature overflowing float32", "infinite repetition_penalty"],
)
def test_overflowing_sampling_values_are_400_not_a_batch_failure(oai, grpc_client, overrides):
    """Non-finite sampling values, and temperatures so small that logits / temperature overflow, are refused up
    front (shared validation, gRPC too): the two temperatures once failed the sampling step of the whole batch."""
    reference = grpc_client.generate(PROMPTS[2], adapter_id="qv8", max_new_tokens=30)
    stream = oai.completions.create(model="qv8", prompt=PROMPTS[2], max_tokens=30, temperature=0, stream=True)
    pieces = [next(stream).choices[0].text]
    request = dict(model="base", prompt="hi", max_tokens=4, temperature=0.8) | overrides
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(**request)
    assert info.value.body["param"] in ("temperature", "repetition_penalty") and "finite" in info.value.body["message"]
    pieces += [chunk.choices[0].text for chunk in stream]
    assert "".join(pieces) == reference.text
    with pytest.raises(DeltaserveError) as grpc_info:
        grpc_client.generate("hi", max_new_tokens=4, temperature=1e-40)
    assert grpc_info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_smallest_allowed_temperature_is_served(oai):
    from deltaserve.server.frontends.core import MIN_TEMPERATURE

    reply = oai.completions.create(model="base", prompt="hi", max_tokens=3, temperature=MIN_TEMPERATURE, seed=1)
    assert reply.usage.completion_tokens == 3


def test_chat_template_refusal_is_400(tiny_dir, tmp_path):
    """Templates raise on messages they do not take (Mistral's "roles must alternate"); that is the
    request's fault, not an internal error."""
    strict = tmp_path / "strict"
    shutil.copytree(tiny_dir, strict)
    tokenizer = AutoTokenizer.from_pretrained(strict)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}assistant:"
    )
    tokenizer.save_pretrained(strict)
    with ServerThread(ServerConfig.of(model=str(strict), max_seq_len=64, http_port=0)) as running:
        url = f"http://127.0.0.1:{running.server.http_port}/v1"
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="base", messages=CHAT, max_tokens=3)
            assert info.value.body["param"] == "messages" and "System role not supported" in info.value.body["message"]
            user_only = client.chat.completions.create(model="base", messages=CHAT[1:], max_tokens=3, temperature=0)
        assert user_only.usage.completion_tokens == 3
        with Client(running.target, timeout=60) as grpc_client, pytest.raises(DeltaserveError) as grpc_info:
            grpc_client.generate(messages=CHAT, max_new_tokens=3)
        assert grpc_info.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---- adapter admin over HTTP ---------------------------------------------------------------------------
def test_admin_endpoints_need_the_token(base_url, lora_dirs, grpc_client):
    body = {"lora_name": "sneaky", "lora_path": lora_dirs["all16_rs"]}
    for headers in ({}, {"authorization": "Bearer wrong"}):
        for endpoint in ("load_lora_adapter", "unload_lora_adapter"):
            reply = _http(f"{base_url}/{endpoint}", body, headers)
            assert reply.status_code == 401, reply.text
            assert reply.json()["error"]["type"] == "authentication_error"
            assert reply.headers["www-authenticate"] == "Bearer"
    assert "sneaky" not in {info.adapter_id for info in grpc_client.list_adapters()}


def test_load_generate_unload_over_http(base_url, oai, grpc_client, lora_dirs, tmp_path):
    auth = {"authorization": f"Bearer {TOKEN}"}

    def post(endpoint: str, body: dict) -> Reply:
        return _http(f"{base_url}/{endpoint}", body, auth)

    loaded = post("load_lora_adapter", {"lora_name": "http-lora", "lora_path": lora_dirs["all16_rs"]})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["id"] == "http-lora" and loaded.json()["kind"] == "lora" and loaded.json()["rank"] == 16
    try:
        assert "http-lora" in {card.id for card in oai.models.list().data}
        reply = oai.completions.create(model="http-lora", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        expected = grpc_client.generate(PROMPTS[0], adapter_id="http-lora", max_new_tokens=8)
        assert reply.choices[0].text == expected.text

        again = post("load_lora_adapter", {"lora_name": "http-lora", "lora_path": lora_dirs["all16_rs"]})
        assert again.status_code == 409 and "already loaded" in again.json()["error"]["message"]
        outside = post("load_lora_adapter", {"lora_name": "outside", "lora_path": str(tmp_path)})
        assert outside.status_code == 403 and "--adapter-root" in outside.json()["error"]["message"]
        missing = post("load_lora_adapter", {"lora_name": "missing", "lora_path": lora_dirs["qv8"] + "-nope"})
        assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]
        reserved = post("load_lora_adapter", {"lora_name": "base", "lora_path": lora_dirs["qv8"]})
        assert reserved.status_code == 400 and reserved.json()["error"]["param"] == "lora_name"
    finally:
        unloaded = post("unload_lora_adapter", {"lora_name": "http-lora"})
    assert unloaded.status_code == 200 and unloaded.json()["draining_requests"] == 0
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="http-lora", prompt=PROMPTS[0], max_tokens=8)
    with pytest.raises(DeltaserveError) as info:
        grpc_client.generate(PROMPTS[0], adapter_id="http-lora", max_new_tokens=2)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert post("unload_lora_adapter", {"lora_name": "http-lora"}).status_code == 404
    assert "http-lora" not in {card.id for card in oai.models.list().data}


# ---- cancellation: client gone, deadline ---------------------------------------------------------------
@pytest.fixture(scope="module")
def one_row(tiny_dir):
    """One cache row: a request that is not cancelled would keep every later one waiting."""
    with ServerThread(ServerConfig.of(model=tiny_dir, max_batch_size=1, max_seq_len=512, http_port=0)) as running:
        yield running


def _cancelled(running) -> float:
    labels = {"adapter": "base", "status": "cancelled"}
    return running.server.metrics.registry.get_sample_value("deltaserve_requests_total", labels) or 0.0


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


LONG = dict(model="base", prompt=PROMPTS[0], max_tokens=480, extra_body={"min_tokens": 480})


def test_disconnect_mid_stream_cancels(one_row):
    before = _cancelled(one_row)
    url = f"http://127.0.0.1:{one_row.server.http_port}/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
        stream = client.completions.create(stream=True, **LONG)
        received = [next(stream) for _ in range(3)]
        stream.close()
        assert all(chunk.choices[0].finish_reason is None for chunk in received)
        follow_up = client.completions.create(model="base", prompt=PROMPTS[1], max_tokens=5)
        assert follow_up.usage.completion_tokens == 5
    _wait_until(lambda: one_row.server.engine.num_running == 0)
    assert _cancelled(one_row) == before + 1


def test_disconnect_while_waiting_for_a_whole_answer_cancels(one_row):
    before = _cancelled(one_row)
    url = f"http://127.0.0.1:{one_row.server.http_port}/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=0.5) as client:
        with pytest.raises(openai.APITimeoutError):
            client.completions.create(**LONG)
    _wait_until(lambda: _cancelled(one_row) == before + 1)
    _wait_until(lambda: one_row.server.engine.num_running == 0)


def test_deadline_header_gives_504(one_row):
    before = _cancelled(one_row)
    url = f"http://127.0.0.1:{one_row.server.http_port}/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(extra_headers={"x-request-timeout": "0.3"}, **LONG)
        assert info.value.status_code == 504 and "x-request-timeout" in info.value.body["message"]
        stream = client.completions.create(stream=True, extra_headers={"x-request-timeout": "0.3"}, **LONG)
        with pytest.raises(openai.APIError) as info:
            list(stream)
        assert info.value.body["code"] == "deadline_exceeded"
        assert client.completions.create(model="base", prompt=PROMPTS[1], max_tokens=4).usage.completion_tokens == 4
    _wait_until(lambda: _cancelled(one_row) == before + 2)


# ---- status mapping ------------------------------------------------------------------------------------
def test_http_status_follows_the_grpc_status_of_each_core_error():
    from deltaserve.adapters import AdapterFormatError, AdapterLimitError, UnsupportedAdapterError
    from deltaserve.server import errors
    from deltaserve.server.frontends.openai.errors import error_body

    expected = {
        errors.InvalidRequestError("x"): 400,
        AdapterFormatError("x"): 400,
        UnsupportedAdapterError("x"): 400,
        errors.AdapterNotFoundError("x"): 404,
        errors.AdapterExistsError("x"): 409,
        errors.PermissionDeniedError("x"): 403,
        errors.CapacityError("x"): 429,
        AdapterLimitError("x"): 429,
        errors.EngineStoppedError("x"): 503,
        TimeoutError(): 504,
        RuntimeError("a bug"): 500,
    }
    for err, status in expected.items():
        got, body = error_body(err)
        assert got == status, err
        assert set(body) == {"message", "type", "param", "code"} and body["message"], body


def test_resource_exhausted_is_429_and_unavailable_is_503(tiny_dir, lora_dirs):
    config = ServerConfig.of(model=tiny_dir, max_batch_size=1, max_seq_len=64, http_port=0, max_adapter_bytes=1000)
    with ServerThread(config) as running:
        url = f"http://127.0.0.1:{running.server.http_port}/v1"
        too_big = _http(f"{url}/load_lora_adapter", {"lora_name": "big", "lora_path": lora_dirs["qv8"]})
        assert too_big.status_code == 429 and too_big.json()["error"]["code"] == "resource_exhausted"
        running.server.engine.stop(0)  # what a shutdown does first: no new work is admitted
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
            with pytest.raises(openai.APIStatusError) as info:
                client.completions.create(model="base", prompt="hi", max_tokens=2)
        assert info.value.status_code == 503 and "shutting down" in info.value.body["message"]


# ---- configuration -------------------------------------------------------------------------------------
def test_cli_flag_reaches_the_config():
    from deltaserve.client.cli import build_parser

    args = build_parser(add_serve_subcommand).parse_args(["serve", "--http-port", "8000"])
    assert args.http_port == 8000
    assert ServerConfig().doors.http_port is None, "the HTTP front door is off unless asked for"


def test_https_with_the_grpc_certificate(tiny_dir, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), *subject],
        check=True,
        capture_output=True,
    )
    config = ServerConfig.of(model=tiny_dir, max_seq_len=64, http_port=0, tls_cert=str(cert), tls_key=str(key))
    with ServerThread(config) as running:
        port = running.server.http_port
        trusted = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert)))
        with openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key="unused", http_client=trusted) as client:
            reply = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as plain:
            with pytest.raises(openai.APIConnectionError):
                plain.completions.create(model="base", prompt=PROMPTS[0], max_tokens=3)


@pytest.mark.slow
def test_embedded_model_chat_over_http(smol_dir):
    """The real SmolLM2 with its own chat template: the HTTP chat answer is the gRPC one."""
    with ServerThread(ServerConfig.of(max_batch_size=2, max_seq_len=256, http_port=0)) as running:
        url = f"http://127.0.0.1:{running.server.http_port}/v1"
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as client:
            name = client.models.list().data[0].id
            reply = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
        with Client(running.target, timeout=120) as grpc_client:
            assert name == grpc_client.model_info().model_name
            expected = grpc_client.generate(messages=messages, max_new_tokens=12)
    assert expected.text and reply.choices[0].message.content == expected.text
