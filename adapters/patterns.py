"""Module-name patterns from adapter configs (LoRA's rank_pattern / alpha_pattern, IA3's feedforward_modules),
matched with bounds, because a config is hostile input: a pattern like `(a+)+$` backtracks exponentially.

Patterns are compiled with the `regex` module (the `re` syntax PEFT uses) and matched with its `timeout`
and `concurrent=True`, which releases the GIL, so a slow pattern never stalls the event loop or the engine.
One adapter's matching shares one time budget; past it the adapter is refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import regex
from deltaserve.adapters.base import AdapterFormatError

MAX_PATTERNS = 4096  # per config field: AdaLoRA writes one rank_pattern key per adapted module
MAX_PATTERN_LENGTH = 1024  # characters of one pattern
MATCH_BUDGET_SECONDS = 2.0  # all the matching one adapter's config may cost


class PatternBudget:
    """A deadline shared by every match made while parsing one adapter."""

    def __init__(self, seconds: float = MATCH_BUDGET_SECONDS) -> None:
        self.deadline = time.monotonic() + seconds

    def remaining(self, field: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AdapterFormatError(f"adapter_config.json: matching {field} took longer than {MATCH_BUDGET_SECONDS} s")
        return left


def compile_patterns(field: str, patterns: Iterable[str]) -> list[regex.Pattern]:
    """Compile a config field's patterns, refusing too many, too long or invalid ones (naming the field)."""
    patterns = list(patterns)
    if len(patterns) > MAX_PATTERNS:
        raise AdapterFormatError(f"adapter_config.json: {field} has {len(patterns)} patterns (at most {MAX_PATTERNS})")
    compiled = []
    for pattern in patterns:
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise AdapterFormatError(
                f"adapter_config.json: a {field} pattern is {len(pattern)} characters (at most {MAX_PATTERN_LENGTH})"
            )
        try:
            compiled.append(regex.compile(pattern))
        except (regex.error, RecursionError, OverflowError) as err:
            raise AdapterFormatError(
                f"adapter_config.json: {field} pattern {pattern[:80]!r} is invalid: {err}"
            ) from None
    return compiled


def matches(pattern: regex.Pattern, name: str, field: str, budget: PatternBudget, *, whole: bool = False) -> bool:
    """`pattern.fullmatch(name)` (whole) or `pattern.match(name)`, within the adapter's remaining budget."""
    method = pattern.fullmatch if whole else pattern.match
    try:
        return method(name, timeout=budget.remaining(field), concurrent=True) is not None
    except TimeoutError:
        raise AdapterFormatError(
            f"adapter_config.json: matching {field} took longer than {MATCH_BUDGET_SECONDS} s"
        ) from None
