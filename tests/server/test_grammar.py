"""The grammar service on the embedded tokenizer: size bounds before compiling, the shared cache, the compile
time limit, and matchers that only ever allow outputs of their grammar."""

from __future__ import annotations

import asyncio
import json
import random
import re

import jsonschema
import pytest
import torch
from deltaserve.server.engine.grammar import GrammarError, GrammarKind, GrammarService, GrammarSpec
from deltaserve.server.engine.sampling import allowed_from_bitmask, token_bitmask_words
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tokenizer(smol_dir):
    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def service(tokenizer):
    service = GrammarService(tokenizer, len(tokenizer) + 64, (tokenizer.eos_token_id,))  # logits wider than vocab
    yield service
    service.close()


def _nested(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps({"enum": list(range(10_000))}), param="s"), "enum"),
        (GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(_nested(200)), param="s"), "deeper"),
        (GrammarSpec(GrammarKind.JSON_SCHEMA, '{"type": "string", "maxLength": 99999}', param="s"), "maxLength"),
        (GrammarSpec(GrammarKind.JSON_SCHEMA, "{nope", param="s"), "not valid JSON"),
        (GrammarSpec(GrammarKind.JSON_SCHEMA, "x" * 70_000, param="s"), "bytes"),
        (GrammarSpec(GrammarKind.REGEX, "(a{1,2000})+", param="s"), "repetition"),
        (GrammarSpec(GrammarKind.CHOICE, choices=(), param="s"), "at least one"),
        (GrammarSpec(GrammarKind.GRAMMAR, "root ::= (", param="s"), "cannot be compiled"),
    ],
)
def test_refusals_name_the_field(service, spec, needle):
    with pytest.raises(GrammarError) as caught:
        asyncio.run(service.compiled(spec))
    assert caught.value.param == "s" and needle in str(caught.value), str(caught.value)


def test_cache_is_shared_and_compiles_once(service):
    spec = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(_nested(12)), param="s")

    async def both():
        return await asyncio.gather(service.compiled(spec), service.compiled(spec))

    first, second = asyncio.run(both())
    assert first is second
    assert asyncio.run(service.compiled(GrammarSpec(GrammarKind.JSON_SCHEMA, spec.source, param="t"))) is first


def test_overrunning_compile_is_refused_and_stays_refused(tokenizer):
    service = GrammarService(tokenizer, len(tokenizer), (tokenizer.eos_token_id,), timeout_s=1e-4)
    spec = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(_nested(28)), param="guided_json")
    try:
        for _ in range(2):  # the second time the compile has finished: its result is discarded
            with pytest.raises(GrammarError, match="took longer than"):
                asyncio.run(service.compiled(spec))
    finally:
        service.close()


SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z]{3}$"},
        "n": {"type": "integer", "minimum": 0, "maximum": 50},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["id", "n"],
}


@pytest.mark.parametrize(
    ("spec", "valid"),
    [
        (
            GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA)),
            lambda t: jsonschema.validate(json.loads(t), SCHEMA),
        ),
        (GrammarSpec(GrammarKind.CHOICE, choices=("alpha", "beta")), lambda t: t in ("alpha", "beta") or 1 / 0),
        (GrammarSpec(GrammarKind.REGEX, r"[0-9]{2}-[a-c]+"), lambda t: (t[2] == "-" and t[:2].isdigit()) or 1 / 0),
        (
            GrammarSpec(GrammarKind.GRAMMAR, 'root ::= "a" ("b" | "c")* "d"'),
            lambda t: re.fullmatch("a[bc]*d", t) or 1 / 0,
        ),
    ],
    ids=["schema", "choice", "regex", "grammar"],
)
def test_random_walks_through_the_mask_are_valid(service, tokenizer, spec, valid):
    """Tokens drawn uniformly among those the bitmask allows always spell a valid output, ended by EOS."""
    vocab = service.vocab_size
    rng = random.Random(0)
    for _ in range(5):
        matcher = asyncio.run(service.matcher(spec))
        tokens = []
        while not matcher.is_terminated() and len(tokens) < 200:
            bitmask = torch.zeros(1, token_bitmask_words(vocab), dtype=torch.int32)
            matcher.fill_next_token_bitmask(bitmask, 0)
            allowed = allowed_from_bitmask(bitmask, vocab)[0].nonzero()[:, 0].tolist()
            assert allowed and max(allowed) < vocab
            # prefer ending tokens sometimes so the walk finishes within the budget
            token = tokenizer.eos_token_id if tokenizer.eos_token_id in allowed else rng.choice(allowed)
            assert matcher.accept_token(token)
            tokens.append(token)
        assert matcher.is_terminated() and tokens[-1] == tokenizer.eos_token_id
        valid(tokenizer.decode(tokens[:-1]))
