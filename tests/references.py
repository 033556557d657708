"""Oracle computations: transformers' generate for the base, PEFT for adapters, on the same files."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass(frozen=True)
class Reference:
    token_ids: list[int]
    logprobs: list[float]  # log-softmax of the raw logits at each generated token


def load_reference_model(model_dir: str, adapter_dir: str | None = None, **load_kwargs):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **load_kwargs)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


@torch.inference_mode()
def greedy_reference(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **generate_kwargs) -> Reference:
    """Greedy tokens from `generate`, with the log-softmax of the raw logits it produced at each step."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    generated = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = [
        step[0].float().log_softmax(-1)[token].item() for step, token in zip(out.logits, generated, strict=True)
    ]
    return Reference(generated, logprobs)


def tokenizer_for(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


def assert_logprobs_close(actual: list[float], expected: list[float], rtol: float = 1e-4, atol: float = 1e-5):
    assert len(actual) == len(expected)
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=rtol, atol=atol)
