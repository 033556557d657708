"""instructor against a deltaserve server, run by .venv-instructor's python (tests/server/test_instructor.py).

Usage: instructor_client.py BASE_URL. Prints one JSON line per case: {"case", "value"} or {"case", "error"}.
It is the user's code, unchanged: instructor's OpenAI client in each of the modes OpenAI-compatible servers
are used with, a pydantic response model, its sync and async clients, a partial stream and an iterable.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Literal

import instructor
import openai
from pydantic import BaseModel, Field


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


class Weather(BaseModel):
    city: str = Field(max_length=16)
    unit: Literal["c", "f"]


MESSAGES = [{"role": "user", "content": "Give me the name and age of a person."}]
OPTIONS = {"max_tokens": 60, "temperature": 0, "max_retries": 0}


def cases(base_url: str):
    raw = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON, instructor.Mode.JSON_SCHEMA):
        for model in ("json", "base"):
            client = instructor.from_openai(raw, mode=mode)

            def create(client=client, model=model):
                return client.chat.completions.create(
                    model=model, response_model=Person, messages=MESSAGES, **OPTIONS
                ).model_dump()

            yield f"{mode.name}/{model}", create

    tools = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)

    def weather():
        messages = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
        return tools.chat.completions.create(
            model="pirate", response_model=Weather, messages=messages, **OPTIONS
        ).model_dump()

    def partial_stream():
        stream = tools.chat.completions.create_partial(
            model="json", response_model=Person, messages=MESSAGES, **OPTIONS
        )
        return [part.model_dump() for part in stream][-1]

    def iterable():
        messages = [{"role": "user", "content": "Name two people and their ages."}]
        people = tools.chat.completions.create_iterable(
            model="json", response_model=Person, messages=messages, **{**OPTIONS, "max_tokens": 120}
        )
        return [person.model_dump() for person in people]

    async def run_async():
        client = instructor.from_openai(
            openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120),
            mode=instructor.Mode.JSON_SCHEMA,
        )
        people = await asyncio.gather(
            *(
                client.chat.completions.create(model=model, response_model=Person, messages=MESSAGES, **OPTIONS)
                for model in ("json", "pirate", "digits", "base")
            )
        )
        return [person.model_dump() for person in people]

    yield "TOOLS/weather", weather
    yield "TOOLS/partial", partial_stream
    yield "TOOLS/iterable", iterable
    yield "JSON_SCHEMA/async", lambda: asyncio.run(run_async())


def main() -> None:
    for name, case in cases(sys.argv[1]):
        try:
            line = {"case": name, "value": case()}
        except Exception as error:  # the test reports every failing case, not only the first
            line = {"case": name, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
