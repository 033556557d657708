"""Oracle computations: transformers' generate for the base, PEFT for adapters, on the same files.

PEFT's soft-prompt kinds (prefix tuning, prompt tuning, P-tuning) are not run through `PeftModel.generate`:
its generation hooks look the KV cache up by keyword, and transformers 5.24 renamed that keyword from
`past_key_values` to `cache`, so PEFT 0.21's prefix silently disappeared and its prompt tuning re-injected
the virtual tokens at every step. Their references are built here from PEFT's own pieces instead
(`get_prompt()`, the base model's forward) and the cache is handed over under the name the installed
transformers uses. Every PEFT reference also has to differ from the base model, or the oracle raises.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class OracleError(AssertionError):
    """A reference computation that cannot be trusted, e.g. an adapter that the oracle silently dropped."""


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


def peft_mix_model(model_dir: str, parts: dict[str, str], names, weights, method: str, **options):
    """PEFT's own weighted mix (`add_weighted_adapter`) of the named LoRA directories, as the active adapter."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), parts[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(parts[name], adapter_name=name)
    model.add_weighted_adapter(list(names), list(weights), "mix", combination_type=method, **options)
    model.set_adapter("mix")
    return model.eval()


def cache_keyword(model) -> str:
    """The keyword the installed transformers takes a KV cache under: `cache` from 5.24, `past_key_values`
    before (5.24 still accepts the old name alone, but drops it when generation also passes the new one)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _peft_config(model):
    """The active PEFT config of a PeftModel, or None for a plain transformers model."""
    configs = getattr(model, "peft_config", None)
    return configs[model.active_adapter] if configs else None


def _is_soft_prompt(model) -> bool:
    config = _peft_config(model)
    return config is not None and config.is_prompt_learning


@torch.inference_mode()
def greedy_reference(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **generate_kwargs) -> Reference:
    """Greedy tokens with the log-softmax of the raw logits at each step: `generate` for the base and
    weight-delta adapters, `soft_prompt_greedy` for PEFT's soft-prompt kinds."""
    if _is_soft_prompt(model):
        if generate_kwargs:
            raise OracleError(f"no soft-prompt reference for generate options {sorted(generate_kwargs)}")
        token_ids, logprobs = soft_prompt_greedy(model.get_base_model(), model, prompt_ids, max_new_tokens)
        reference = Reference(token_ids, logprobs)
    else:
        reference = _generate_greedy(model, tokenizer, prompt_ids, max_new_tokens, **generate_kwargs)
    if _peft_config(model) is not None:
        assert_adapter_changes_logits(model, prompt_ids)
    return reference


def _generate_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **generate_kwargs) -> Reference:
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


def _soft_prompt_prefill(model, soft_model, ids: list[int]):
    """The first forward with the soft prompt of PEFT model `soft_model` in front of `ids`, computed by `model`
    (the base, or a composition built on it): a prefix model's `get_prompt()` is the KV cache (positions start
    after it), a prompt-tuning or P-tuning model's virtual embeddings are prepended. Returns (the logits at the
    positions of `ids` [len(ids), vocab], the KV cache the forward filled, the attended length)."""
    from transformers import DynamicCache

    config = _peft_config(soft_model)
    tokens = torch.tensor([ids])
    prompt = soft_model.get_prompt(1)
    length = config.num_virtual_tokens + len(ids)
    mask = torch.ones(1, length, dtype=torch.long)
    if config.peft_type.value == "PREFIX_TUNING":
        cache, inputs = prompt, {"input_ids": tokens}
    else:
        cache = DynamicCache(config=model.config)
        inputs = {"inputs_embeds": torch.cat([prompt, model.get_input_embeddings()(tokens)], dim=1)}
    logits = model(**inputs, attention_mask=mask, use_cache=True, **{cache_keyword(model): cache}).logits
    if cache.get_seq_length() != length:  # the model ignored the cache it was handed
        raise OracleError(f"the KV cache holds {cache.get_seq_length()} entries after the prefill, not {length}")
    return logits[0, -len(ids) :].float(), cache, length


def soft_prompt_logits(model, soft_model, ids: list[int]) -> torch.Tensor:
    """Next-token logits [vocab] after `ids` with `soft_model`'s soft prompt in front (see _soft_prompt_prefill)."""
    return _soft_prompt_prefill(model, soft_model, ids)[0][-1]


@torch.inference_mode()
def prompt_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    """The logits [len(prompt_ids), vocab] at every prompt position (a soft prompt in front where the model has
    one): position i predicts prompt token i + 1."""
    if _is_soft_prompt(model):
        return _soft_prompt_prefill(model.get_base_model(), model, prompt_ids)[0]
    return model(input_ids=torch.tensor([prompt_ids])).logits[0].float()


@torch.inference_mode()
def soft_prompt_greedy(model, soft_model, prompt_ids: list[int], max_new: int) -> tuple[list[int], list[float]]:
    """Greedy decoding as `generate` does it, one token per forward on the growing KV cache (LLM.int8 picks
    outlier columns over each matmul's whole input, so recomputing the sequence would not match), stopping
    after an EOS token. The cache is carried here, so no generation hook can drop or repeat the soft prompt."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    logits, cache, length = _soft_prompt_prefill(model, soft_model, prompt_ids)
    logits = logits[-1]
    tokens, logprobs = [], []
    while True:
        step = logits.log_softmax(-1)
        token = int(step.argmax())
        tokens.append(token)
        logprobs.append(step[token].item())
        if token in eos or len(tokens) == max_new:
            return tokens, logprobs
        length += 1
        mask = torch.ones(1, length, dtype=torch.long)
        out = model(input_ids=torch.tensor([[token]]), attention_mask=mask, **{cache_keyword(model): cache})
        logits = out.logits[0, -1].float()


@torch.inference_mode()
def assert_adapter_changes_logits(model, prompt_ids: list[int], atol: float = 1e-6) -> None:
    """Every adapter the tests build has non-zero random weights, so its PEFT oracle must give other logits
    than the base for the same prompt. Equal logits mean the oracle lost the adapter: fail loudly."""
    import peft
    import transformers

    if _is_soft_prompt(model):
        adapted = soft_prompt_logits(model.get_base_model(), model, prompt_ids)
    else:
        adapted = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float()
    with model.disable_adapter():
        base = model.get_base_model()(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float()
    if torch.allclose(adapted, base, rtol=0, atol=atol):
        kind = _peft_config(model).peft_type.value
        raise OracleError(
            f"the PEFT {kind} oracle gives the base model's logits: the adapter was dropped "
            f"(transformers {transformers.__version__}, peft {peft.__version__})"
        )


def reference_model(model_dir: str, name: str, dirs: dict[str, str]):
    """The oracle for adapter `name` of `dirs` ('' for the base): PEFT on the base, or for a bottleneck adapter
    the AdapterHub definition by hooks."""
    from deltaserve.testing.kinds import BOTTLENECK_PRESETS, BottleneckReference

    if name in BOTTLENECK_PRESETS:
        return BottleneckReference(load_reference_model(model_dir), dirs[name]).model
    return load_reference_model(model_dir, dirs[name] if name else None)


def reference_table(model_dir: str, dirs: dict[str, str], prompts: list[str], max_new: int) -> dict:
    """{(adapter or '', prompt index): Reference} for the base and every adapter, each run alone."""
    tokenizer = tokenizer_for(model_dir)
    table = {}
    for name in ["", *dirs]:
        model = reference_model(model_dir, name, dirs)
        for i, prompt in enumerate(prompts):
            table[name, i] = greedy_reference(model, tokenizer, tokenizer(prompt)["input_ids"], max_new)
    return table


def tokenizer_for(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


def assert_logprobs_close(actual: list[float], expected: list[float], rtol: float = 1e-4, atol: float = 1e-5):
    assert len(actual) == len(expected)
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=rtol, atol=atol)
