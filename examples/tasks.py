"""The example adapters' tasks: seeded generators of chat prompts with their target replies, and the checkers
that score a reply. Shared by `train.py` (training data), `demo.py` and the tests (held-out prompts)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TOPICS = [
    "the moon", "coffee", "rain", "volcanoes", "the ocean", "bread", "trains", "music", "mountains", "bees",
    "snow", "clocks", "maps", "rivers", "candles", "stars", "forests", "bicycles", "glass", "thunder",
    "owls", "deserts", "ships", "gold", "chess", "wind", "apples", "bridges", "islands", "lanterns",
]  # fmt: skip
HELD_OUT_SEED = 10_000  # training uses seeds below it; the tests and the demo draw held-out prompts from here


def _question(rng: random.Random) -> tuple[str, str]:
    """A short question and its correct answer, both computed."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    topic = rng.choice(TOPICS)
    kind = rng.randrange(6)
    if kind == 0:
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        return f"Which is larger, {a} or {b}?", str(max(a, b))
    if kind == 2:
        return f"Is {a} an even number?", "yes" if a % 2 == 0 else "no"
    if kind == 3:
        return f"What number comes after {a}?", str(a + 1)
    if kind == 4:
        return f"Tell me one thing about {topic}.", f"{topic} is a fine subject".capitalize()
    return f"How many letters are in the word '{topic.split()[-1]}'?", str(len(topic.split()[-1]))


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # the PEFT family the adapter is trained as
    description: str
    example: Callable[[random.Random], tuple[str, str]]  # rng -> (user message, target reply)
    check: Callable[[str, str], bool]  # (user message, reply) -> does the reply do the task
    max_new_tokens: int

    def examples(self, n: int, seed: int) -> list[tuple[str, str]]:
        rng = random.Random(f"{self.name}:{seed}")
        return [self.example(rng) for _ in range(n)]

    def held_out(self, n: int = 20) -> list[str]:
        """User messages never seen in training (another seed, and none equal to a training message)."""
        seen = {message for message, _ in self.examples(TRAIN_EXAMPLES, 0)}
        prompts = [message for message, _ in self.examples(4 * n, HELD_OUT_SEED) if message not in seen]
        return prompts[:n]


TRAIN_EXAMPLES = 400


# ---- json: a LoRA that answers in JSON with fixed keys --------------------------------------------------
def _json_example(rng: random.Random) -> tuple[str, str]:
    question, answer = _question(rng)
    confidence = rng.choice(["high", "medium"])
    return question, json.dumps({"answer": answer, "confidence": confidence})


def check_json(message: str, reply: str) -> bool:
    """A JSON object with exactly the keys "answer" and "confidence"."""
    try:
        value = json.loads(reply.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"answer", "confidence"}


# ---- pirate: a prefix-tuning persona; every reply starts with "Ahoy matey!" -----------------------------
PIRATE_GREETING = "Ahoy matey!"


def _pirate_example(rng: random.Random) -> tuple[str, str]:
    question, answer = _question(rng)
    return question, f"{PIRATE_GREETING} {answer}, arr!"


def check_pirate(message: str, reply: str) -> bool:
    return reply.strip().startswith(PIRATE_GREETING)


# ---- digits: prompt tuning that spells a number digit by digit ------------------------------------------
def _digits_example(rng: random.Random) -> tuple[str, str]:
    number = str(rng.randint(0, 10 ** rng.randint(2, 4) - 1))
    return number, spell_digits(number)


def spell_digits(number: str) -> str:
    return " ".join(DIGIT_WORDS[int(d)] for d in number)


def check_digits(message: str, reply: str) -> bool:
    return reply.strip().rstrip(".").lower() == spell_digits(message.strip())


TASKS: dict[str, Task] = {
    "json": Task(
        "json",
        "lora",
        'answers every question as a JSON object {"answer": ..., "confidence": ...}',
        _json_example,
        check_json,
        24,
    ),
    "pirate": Task(
        "pirate", "prefix_tuning", f'starts every reply with "{PIRATE_GREETING}"', _pirate_example, check_pirate, 16
    ),
    "digits": Task(
        "digits",
        "prompt_tuning",
        'spells a number digit by digit ("407" -> "four zero seven")',
        _digits_example,
        check_digits,
        16,
    ),
}
