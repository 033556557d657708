"""lm-evaluation-harness's `local-completions` model, unchanged, against a live server on the embedded model:
loglikelihood (token-id prompts, echo, logprobs 1) and generate_until requests for the base and for the
example `json` LoRA, through lm-eval's own HTTP client. Its results equal the same computation done with
transformers/PEFT directly on the same token ids."""

from __future__ import annotations

import math

import pytest
import torch
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import ServerThread

from examples import demo
from tests.references import greedy_reference, load_reference_model, prompt_logits, tokenizer_for

pytestmark = pytest.mark.slow

PAIRS = [  # (context, continuation): what a multiple-choice task asks lm-eval to score
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Berlin"),
    ("The opposite of hot is", " cold"),
    ("2 + 2 =", " 4"),
    ("The sky is", " blue and full of clouds"),
]
UNTIL = [("Write one word for a colour:", ["\n", "."]), ("Count: one, two,", ["\n"])]
MAX_GEN = 12


@pytest.fixture(scope="module")
def url(smol_dir):
    config = ServerConfig.of(model=smol_dir, dtype="float32", device="cpu", http_port=0, max_seq_len=256)
    with ServerThread(config) as running:
        from deltaserve.client import Client

        with Client(running.target, timeout=120) as client:
            client.load_adapter("json", str(demo.adapter_dirs()["json"]))
        yield f"http://127.0.0.1:{running.server.http_port}/v1/completions"


def _harness(url: str, model: str, tokenizer_dir: str):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=url,
        model=model,
        tokenizer=tokenizer_dir,
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        batch_size=3,  # several prompts in one completions request
        max_retries=1,
        max_gen_toks=MAX_GEN,
    )


def _instances(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


@pytest.mark.parametrize("adapter", ["", "json"])
def test_local_completions_loglikelihood_and_generate_until_equal_peft(url, smol_dir, adapter):
    harness = _harness(url, adapter or "base", smol_dir)
    model = load_reference_model(smol_dir, str(demo.adapter_dirs()["json"]) if adapter else None)
    scored = harness.loglikelihood(_instances("loglikelihood", PAIRS))
    assert len({round(logprob, 3) for logprob, _ in scored}) == len(PAIRS), "the scores do not tell pairs apart"
    for (context, continuation), (logprob, greedy) in zip(PAIRS, scored, strict=True):
        context_ids, continuation_ids = harness._encode_pair(context, continuation)
        ids = context_ids + continuation_ids
        expected = prompt_logits(model, ids).log_softmax(-1)[len(context_ids) - 1 : -1]  # predicts the continuation
        chosen = expected.gather(1, torch.tensor(continuation_ids)[:, None])[:, 0]
        assert logprob == pytest.approx(math.fsum(chosen.tolist()), rel=1e-4, abs=1e-4), (context, continuation)
        assert greedy == bool((expected.argmax(-1) == torch.tensor(continuation_ids)).all())
    generations = harness.generate_until(
        _instances("generate_until", [(text, {"until": until, "max_gen_toks": MAX_GEN}) for text, until in UNTIL])
    )
    tokenizer = tokenizer_for(smol_dir)
    for (text, until), generated in zip(UNTIL, generations, strict=True):
        reference = greedy_reference(model, tokenizer, harness.tok_encode(text), MAX_GEN)
        expected_text = tokenizer.decode(reference.token_ids, skip_special_tokens=True)
        for stop in until:
            expected_text = expected_text.split(stop)[0]
        assert generated == expected_text, text
