"""Structured output and tool calling on the embedded SmolLM2 and the example adapters, through real clients
(the openai SDK, LangChain's ChatOpenAI, instructor and litellm, unchanged) against one real server on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import ServerThread
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "adapters"
ADAPTERS = ("json", "pirate", "digits")
CHAT = [{"role": "user", "content": "Give me the name and age of a person as JSON."}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}}, "required": ["tz"]},
    },
}


@pytest.fixture(scope="module")
def server(smol_dir):
    config = ServerConfig.of(
        model=smol_dir, dtype="float32", device="cpu", http_port=0, max_batch_size=64, max_seq_len=512, max_adapters=4
    )
    with ServerThread(config) as running:
        with Client(running.target, timeout=120) as client:
            for name in ADAPTERS:
                client.load_adapter(name, str(EXAMPLES / name))
        yield running


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.server.http_port}/v1"


@pytest.fixture(scope="module")
def oai(base_url):
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_parse_with_a_pydantic_model(oai):
    for model in ("json", "base"):
        completion = oai.chat.completions.parse(
            model=model, messages=CHAT, response_format=Person, max_tokens=40, temperature=0
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)


def test_json_object(oai):
    completion = oai.chat.completions.create(
        model="json", messages=CHAT, response_format={"type": "json_object"}, max_tokens=60, temperature=0
    )
    choice = completion.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # max tokens: the partial text is a prefix of an object
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_guided_regex_and_choice_on_completions(oai):
    regex = oai.completions.create(
        model="base", prompt="A date: ", max_tokens=20, extra_body={"guided_regex": r"\d{4}-\d{2}-\d{2}"}
    )
    assert regex.choices[0].finish_reason == "stop"
    assert len(regex.choices[0].text) == 10 and regex.choices[0].text[4] == "-"
    choice = oai.completions.create(
        model="pirate", prompt="Yes or no? ", max_tokens=5, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert choice.choices[0].text in ("yes", "no")


def _arguments_valid(call) -> dict:
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    assert call.id.startswith("call_")
    return arguments


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tools_constrained_choices(oai, choice):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    completion = oai.chat.completions.create(
        model="json", messages=messages, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=60, temperature=1
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert len(message.tool_calls) == 1
    _arguments_valid(message.tool_calls[0])
    if isinstance(choice, dict):
        assert message.tool_calls[0].function.name == "get_time"


def test_tool_parameters_with_definitions(oai):
    """Parameters with `$defs` and local `$ref`s (pydantic's nested models, instructor's iterables), for one
    named function and for "required" over two (each rebased under the call schema)."""
    item = {
        "type": "object",
        "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["qty"],
    }
    order = {
        "type": "function",
        "function": {
            "name": "order",
            "parameters": {
                "$defs": {"Item": item},
                "type": "object",
                "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1, "maxItems": 2}
                },
                "required": ["items"],
            },
        },
    }
    messages = [{"role": "user", "content": "Order two apples."}]
    for tools, choice in (([order], {"type": "function", "function": {"name": "order"}}), ([order, TIME], "required")):
        completion = oai.chat.completions.create(
            model="json", messages=messages, tools=tools, tool_choice=choice, max_tokens=60, temperature=1, seed=3
        )
        (call,) = completion.choices[0].message.tool_calls
        if call.function.name == "order":
            jsonschema.validate(json.loads(call.function.arguments), order["function"]["parameters"])
        else:
            _arguments_valid(call)


def test_tools_auto_and_none_and_history(oai):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    for choice in ("auto", "none"):
        completion = oai.chat.completions.create(
            model="base", messages=messages, tools=[WEATHER], tool_choice=choice, max_tokens=30, temperature=0
        )
        message = completion.choices[0].message
        if message.tool_calls:  # auto: whatever the model wrote parsed as a call
            assert choice == "auto"
            for call in message.tool_calls:
                _arguments_valid(call)
        else:
            assert isinstance(message.content, str)


def test_streaming_tool_calls(oai):
    stream = oai.chat.completions.create(
        model="json",
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += part.id or ""
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_langchain(base_url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="json", base_url=base_url, api_key="unused", temperature=0, max_tokens=60, max_retries=0)
    for method in ("json_schema", "function_calling", "json_mode"):
        structured = llm.with_structured_output(Person, method=method)
        prompt = "Give me the name and age of a person as JSON with keys name and age."
        if method == "json_mode":
            # json_mode constrains to any object; the prompt names the keys, as LangChain's docs tell
            try:
                result = structured.invoke(prompt)
            except Exception as err:  # the model may write an object with other keys: a validation error
                assert "validation" in str(err).lower()
                continue
        else:
            result = structured.invoke(prompt)
        assert isinstance(result, Person)
    default = llm.with_structured_output(Person).invoke("A person as JSON.")
    assert isinstance(default, Person)
    reply = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(reply.tool_calls[0]["args"], WEATHER["function"]["parameters"])


SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["a"]},
    {"type": "object", "properties": {"b": {"type": "boolean"}, "c": {"enum": ["x", "y", "z"]}}, "required": ["c"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"type": "string", "pattern": "^[a-f0-9]{6}$"},
    {
        "type": "object",
        "properties": {
            "p": {
                "type": "object",
                "properties": {"q": {"type": "integer", "minimum": -50, "maximum": 50}},
                "required": ["q"],
            }
        },
        "required": ["p"],
    },
    {"enum": ["red", "green", "blue", 7, None]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}, "required": ["id"]},
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["u", "v"]}, "maxItems": 3}, "n": {"type": "null"}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {"s": {"type": "string", "maxLength": 6}, "o": {"type": "integer", "minimum": 1, "maximum": 9}},
    },
    {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "boolean"}}}, "maxItems": 2},
]


def test_validity_under_sampling_beside_unconstrained_rows(base_url):
    """200 constrained generations over 10 schemas at temperature 1 all parse and validate; the greedy
    unconstrained rows of the same batches equal their references computed alone."""
    from openai import AsyncOpenAI

    free_prompts = ["The sky is", "Once upon a time", "Hello, my name is", "In 1990,"]
    models = ["json", "pirate", "digits", "base"]

    async def free(client, prompt, model):
        reply = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        return reply.choices[0].text

    async def constrained(client, schema, i):
        reply = await client.completions.create(
            model=models[i % len(models)],
            prompt="JSON: ",
            max_tokens=40,
            temperature=1,
            seed=i,
            extra_body={"guided_json": schema},
        )
        return reply.choices[0]

    async def run():
        async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as client:
            references = [await free(client, p, m) for p, m in zip(free_prompts, models, strict=True)]
            jobs = [constrained(client, SCHEMAS[i % 10], i) for i in range(200)]
            jobs += [free(client, p, m) for p, m in zip(free_prompts, models, strict=True) for _ in range(2)]
            results = await asyncio.gather(*jobs)
            return references, results[:200], results[200:]

    references, choices, frees = asyncio.run(run())
    for i, choice in enumerate(choices):
        assert choice.finish_reason == "stop", (i, choice.text)
        jsonschema.validate(json.loads(choice.text), SCHEMAS[i % 10])
    assert frees == [r for r in references for _ in range(2)]


HOSTILE = [
    ("guided_json", {"enum": [f"m{i}" for i in range(10_000)]}),
    ("guided_json", json.loads("{" + '"type":"array","items":{' * 200 + '"type":"integer"' + "}" * 201)),
    ("guided_regex", "(a+)+(b*)*" * 40 + "c{1,5000}"),
    ("guided_grammar", "root ::= ( "),
]


def test_hostile_grammars_are_refused_while_a_neighbour_streams(oai, base_url):
    gaps: list[float] = []

    def neighbour():
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
            stream = client.completions.create(
                model="pirate", prompt="Tell a story:", max_tokens=120, temperature=0, stream=True
            )
            last = time.monotonic()
            for _ in stream:
                now = time.monotonic()
                gaps.append(now - last)
                last = now

    thread = threading.Thread(target=neighbour)
    thread.start()
    for field, value in HOSTILE:
        with pytest.raises(openai.BadRequestError) as caught:
            oai.completions.create(model="json", prompt="x", max_tokens=4, extra_body={field: value})
        assert caught.value.body["param"] == field, caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model="json",
            messages=CHAT,
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}},
        )
    assert caught.value.body["param"] == "response_format.json_schema.schema"
    thread.join()
    assert len(gaps) > 10 and max(gaps[1:]) < 1.0, max(gaps[1:])


def test_literal_schema_round_trip(oai):
    class Pick(BaseModel):
        colour: Literal["red", "green", "blue"]

    completion = oai.chat.completions.parse(
        model="digits",
        messages=[{"role": "user", "content": "Pick a colour."}],
        response_format=Pick,
        max_tokens=20,
        temperature=1,
    )
    assert completion.choices[0].message.parsed.colour in ("red", "green", "blue")


def test_native_grpc_constraints(server):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
    }
    with Client(server.target, timeout=120) as client:
        result = client.generate("JSON: ", adapter_id="json", json_schema=schema, max_new_tokens=20)
        jsonschema.validate(json.loads(result.text), schema)
        assert client.generate("Pick: ", choice=["left", "right"], max_new_tokens=5).text in ("left", "right")
        assert client.generate("Digits: ", regex="[0-9]{4}", adapter_id="digits", max_new_tokens=8).text.isdigit()
        chunks = list(client.generate_stream("Obj: ", json_object=True, max_new_tokens=24, ignore_eos=True))
        text = "".join(chunk.text for chunk in chunks)
        assert text.startswith("{")


# ---- instructor (its own venv: every instructor release caps jiter below what the locked openai SDK needs) ----
INSTRUCTOR_PYTHON = ROOT / ".venv-instructor" / "bin" / "python"


def test_instructor(base_url):
    """instructor 1.17 (tests/clients/instructor.lock) in TOOLS, JSON and JSON_SCHEMA modes on the json adapter
    and the base, a tool-shaped model on another adapter, a partial stream, an iterable and concurrent async
    calls over four adapters: every result validates against its pydantic model."""
    if not INSTRUCTOR_PYTHON.exists():
        pytest.skip("no .venv-instructor: `make test` builds it from tests/clients/instructor.lock")
    script = ROOT / "tests" / "clients" / "instructor_client.py"
    run = subprocess.run(
        [str(INSTRUCTOR_PYTHON), str(script), base_url], capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = {line["case"]: line for line in map(json.loads, run.stdout.splitlines())}
    # JSON mode is response_format json_object: any object, the keys asked for in the prompt only (as OpenAI's),
    # so a model that writes other keys fails instructor's validation; that is the only failure allowed.
    failed = {
        case: line["error"]
        for case, line in results.items()
        if "error" in line and not (case.startswith("JSON/") and "validation error" in line["error"])
    }
    assert not failed, failed
    for case, line in results.items():
        if "error" in line:
            continue
        value = line["value"]
        if case == "TOOLS/weather":
            jsonschema.validate(value, WEATHER["function"]["parameters"])
        elif case in ("TOOLS/iterable", "JSON_SCHEMA/async"):
            assert value and all(Person.model_validate(person) for person in value), (case, value)
        else:
            Person.model_validate(value)
    assert len(results) == 10, sorted(results)


# ---- litellm ----
def test_litellm(base_url, monkeypatch):
    """litellm's OpenAI-compatible provider, unchanged: structured output with a pydantic model, a named tool,
    a stream and concurrent async calls over the adapters."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network here: litellm's bundled price map
    import litellm

    common = {"api_base": base_url, "api_key": "unused", "temperature": 0, "max_tokens": 60, "num_retries": 0}
    reply = litellm.completion(model="openai/json", messages=CHAT, response_format=Person, **common)
    assert reply.choices[0].finish_reason == "stop"
    Person.model_validate_json(reply.choices[0].message.content)

    reply = litellm.completion(
        model="openai/pirate",
        messages=[{"role": "user", "content": "Weather in Lima?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **common,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    _arguments_valid(call)

    chunks = list(litellm.completion(model="openai/digits", messages=CHAT, stream=True, **common))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    alone = litellm.completion(model="openai/digits", messages=CHAT, **common).choices[0].message.content
    assert streamed == alone and streamed

    async def concurrent():
        calls = [
            litellm.acompletion(model=f"openai/{model}", messages=CHAT, response_format=Person, **common)
            for model in ("json", "pirate", "digits", "base")
        ]
        return await asyncio.gather(*calls)

    for reply in asyncio.run(concurrent()):
        Person.model_validate_json(reply.choices[0].message.content)
