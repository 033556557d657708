"""The detokenizer's held-back tail against the definition, on random texts and stop strings (including the
repetitive ones that make a naive scan slow)."""

from __future__ import annotations

import random

from deltaserve.server.engine.detokenizer import IncrementalDetokenizer


def _definition(text: str, stops: tuple[str, ...]) -> int:
    """The longest k < len(stop) such that the text ends with stop[:k], over every stop string."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def test_held_back_tail_matches_its_definition():
    rng = random.Random(7)
    for _ in range(3000):
        alphabet = rng.choice(["ab", "abc", "a", "xyz!"])
        stops = tuple("".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 4)))
        detokenizer = IncrementalDetokenizer(tokenizer=None, stop=stops)
        detokenizer.text = "".join(rng.choices(alphabet, k=rng.randint(0, 20)))
        assert detokenizer._held_back() == _definition(detokenizer.text, stops), (detokenizer.text, stops)
