"""The oracles themselves: a PEFT reference that lost its adapter must fail loudly, never pass as the base."""

from __future__ import annotations

import pytest
import torch
from deltaserve.testing.helpers import PROMPTS
from deltaserve.testing.kinds import make_peft_adapter

from tests.references import (
    OracleError,
    greedy_reference,
    load_reference_model,
    soft_prompt_logits,
    tokenizer_for,
)


def test_an_adapter_that_changes_nothing_is_refused_as_an_oracle(tiny_dir):
    """PEFT's default LoRA init has B = 0: its model equals the base, which is what a dropped adapter looks
    like to a test. The oracle must refuse it rather than hand back base tokens as the adapter's."""
    from peft import LoraConfig, get_peft_model

    base = load_reference_model(tiny_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).eval()
    tokenizer = tokenizer_for(tiny_dir)
    with pytest.raises(OracleError, match="LORA oracle gives the base model's logits"):
        greedy_reference(model, tokenizer, tokenizer(PROMPTS[0])["input_ids"], 2)


@pytest.mark.parametrize("name", ["prefix", "prompt", "ptuning"])
def test_soft_prompt_oracles_keep_their_prompt(tiny_dir, tmp_path, name):
    """Each soft-prompt reference, built from PEFT's get_prompt() and the base forward, differs from the base:
    the prefix cache (or the virtual embeddings) reached the model under the installed transformers."""
    path = make_peft_adapter(tiny_dir, str(tmp_path / name), name, seed=3)
    model = load_reference_model(tiny_dir, path)
    tokenizer = tokenizer_for(tiny_dir)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    base = load_reference_model(tiny_dir)
    with torch.inference_mode():
        adapted = soft_prompt_logits(model.get_base_model(), model, ids)
        plain = base(input_ids=torch.tensor([ids])).logits[0, -1]
    assert not torch.allclose(adapted, plain, atol=1e-4)
    reference = greedy_reference(model, tokenizer, ids, 4)  # raises OracleError if it equalled the base
    assert len(reference.token_ids) == 4 and len(reference.logprobs) == 4
