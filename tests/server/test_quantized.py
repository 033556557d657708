"""A bitsandbytes NF4 or INT8 base (CPU): the server's LoRA outputs equal PEFT's on the same quantized base."""

from __future__ import annotations

import pytest
import torch
from deltaserve.client import Client
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import PROMPTS, ServerThread

from tests.references import assert_logprobs_close, greedy_reference, load_reference_model, tokenizer_for

bitsandbytes = pytest.importorskip("bitsandbytes")


# The reference logprobs come from generate's own incremental logits, so a single request's matmuls see
# the same inputs as the server's (LLM.int8 picks outlier columns over each matmul's whole input).
LOGPROB_ATOL = {"nf4": 1e-4, "int8": 1e-4}


def _bnb_config(quantize: str):
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_base_with_lora_matches_peft(tiny_dir, lora_dirs, quantize):
    quant = _bnb_config(quantize)
    tokenizer = tokenizer_for(tiny_dir)
    config = ServerConfig.of(
        model=tiny_dir,
        quantize=quantize,
        device="cpu",
        max_batch_size=4,
        max_seq_len=128,
        max_adapters=2,
        max_lora_rank=16,
    )
    with ServerThread(config) as running, Client(running.target, timeout=120) as client:
        assert client.model_info().quantization == quantize
        client.load_adapter("qv8", lora_dirs["qv8"])
        for adapter in ("", "qv8"):
            reference_model = load_reference_model(
                tiny_dir,
                lora_dirs["qv8"] if adapter else None,
                quantization_config=quant,
                device_map={"": "cpu"},
            )
            for prompt in PROMPTS[:2]:
                expected = greedy_reference(reference_model, tokenizer, tokenizer(prompt)["input_ids"], 8)
                result = client.generate(prompt, adapter_id=adapter, max_new_tokens=8, logprobs=True)
                assert result.token_ids == expected.token_ids
                assert_logprobs_close(result.logprobs, expected.logprobs, rtol=1e-4, atol=LOGPROB_ATOL[quantize])


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_base_with_other_kinds_matches_peft(tiny_dir, tmp_path, quantize):
    """DoRA's norms need the dequantized weight; IA3 and prefix tuning act around the quantized layers.
    PEFT's own DoRA fails on bitsandbytes 8-bit layers, so on INT8 there is no oracle for DoRA."""
    from deltaserve.testing.kinds import make_peft_adapter

    quant = _bnb_config(quantize)
    tokenizer = tokenizer_for(tiny_dir)
    kinds = ["dora", "ia3", "prefix"] if quantize == "nf4" else ["ia3", "prefix"]
    dirs = {name: make_peft_adapter(tiny_dir, str(tmp_path / name), name, seed=60 + i) for i, name in enumerate(kinds)}
    config = ServerConfig.of(
        model=tiny_dir, quantize=quantize, device="cpu", max_batch_size=4, max_seq_len=128, max_adapters=4
    )
    with ServerThread(config) as running, Client(running.target, timeout=120) as client:
        for name, path in dirs.items():
            client.load_adapter(name, path)
        for name, path in dirs.items():
            reference_model = load_reference_model(tiny_dir, path, quantization_config=quant, device_map={"": "cpu"})
            expected = greedy_reference(reference_model, tokenizer, tokenizer(PROMPTS[0])["input_ids"], 8)
            result = client.generate(PROMPTS[0], adapter_id=name, max_new_tokens=8, logprobs=True)
            assert result.token_ids == expected.token_ids, name
            assert_logprobs_close(result.logprobs, expected.logprobs, rtol=1e-4, atol=LOGPROB_ATOL[quantize])
