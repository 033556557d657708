"""Every decoder family docs/models.md lists as tested, through a real server: the base against transformers'
generate, PEFT LoRAs (and on some families prefix tuning, IA3, prompt tuning and bottleneck adapters) against
their oracles, alone and all mixed in one concurrent batch; and the models and adapters that are refused.

Each family is a tiny random model built from its config with the embedded model's real tokenizer. The
settings that make a family what it is are small enough to matter on short prompts (sliding windows of 4-5
tokens, softcaps of 2 and 10, Llama-3 rope scaling past 16 positions); the first test checks that each one
changes the model's output, so that matching transformers cannot pass by accident. The server prefills in
chunks of 4 tokens into 4-token blocks, so chunks that attend over earlier ones, windows and softcaps meet.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
import transformers
from deltaserve.client import Client, DeltaserveError
from deltaserve.server.app import Server
from deltaserve.server.config import ServerConfig
from deltaserve.server.errors import ModelLoadError
from deltaserve.server.model.runner import ModelRunner
from deltaserve.testing.helpers import PROMPTS, ServerThread, make_lora, make_tiny_llama, tiny_config
from deltaserve.testing.kinds import BOTTLENECK_PRESETS, make_bottleneck, make_peft_adapter

from tests.references import assert_logprobs_close, reference_table

MAX_NEW = 12
_LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
# family (transformers' config class prefix) -> the config settings that exercise what is particular to it
FAMILIES: dict[str, dict] = {
    "Llama": dict(rope_parameters=_LLAMA3_ROPE),
    "Mistral": dict(sliding_window=4),
    "Qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),  # also q/k/v biases
    "Qwen3": dict(head_dim=16),  # per-head q/k norms
    "Gemma2": dict(
        head_dim=16,
        sliding_window=4,  # alternating sliding and full layers
        query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=10.0,
        tie_word_embeddings=False,  # tied to embeddings scaled by sqrt(hidden), a random head only echoes its input
    ),
    "Gemma3Text": dict(
        head_dim=16,
        sliding_window=4,
        sliding_window_pattern=2,
        query_pre_attn_scalar=16,  # q/k norms, scaled embeddings, one rope per layer type
        final_logit_softcapping=10.0,
        tie_word_embeddings=False,
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
            "sliding_attention": dict(rope_type="default", rope_theta=1e4),
        },
    ),
    "Phi3": dict(sliding_window=5, partial_rotary_factor=0.5),  # fused qkv_proj and gate_up_proj
    "Granite": dict(embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0),
    "Olmo2": {},  # post-norms, q/k norms over all heads
    "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # sparse mixture of experts
}
# family -> settings that switch its particular features off: each must change the output
FEATURES_OFF: dict[str, list[dict]] = {
    "Llama": [dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))],
    "Mistral": [dict(sliding_window=None)],
    "Qwen2": [dict(use_sliding_window=False)],
    "Gemma2": [dict(sliding_window=4096), dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None)],
    "Gemma3Text": [
        dict(sliding_window=4096),
        dict(final_logit_softcapping=None),
        dict(
            rope_parameters={
                "full_attention": dict(rope_type="default", rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=1e4),
            }
        ),
    ],
    "Phi3": [dict(sliding_window=None)],
    "Granite": [dict(embedding_multiplier=1.0), dict(logits_scaling=1.0)],
}
# family -> adapter kinds served on it besides the two LoRAs (testing.kinds names)
EXTRA_KINDS: dict[str, tuple[str, ...]] = {
    "Gemma2": ("prefix", "ia3", "prompt"),  # prompt tuning: virtual tokens skip Gemma's embedding scale
    "Gemma3Text": ("prompt",),
    "Phi3": ("prefix", "ia3", "houlsby"),
    "Granite": ("prompt",),  # the embedding multiplier applies to virtual tokens too
    "Mixtral": ("prefix", "ia3", "houlsby"),
}
# PEFT's "all-linear" on Mixtral also targets the experts' 3-D parameters, which deltaserve refuses (see below)
LORA_TARGETS = {"Mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# IA3 on modules the family has (Phi-3's projections are fused; Mixtral's experts are not linear layers)
IA3_TARGETS = {
    "Phi3": dict(target_modules=["qkv_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "Mixtral": dict(target_modules=["k_proj", "v_proj", "o_proj"], feedforward_modules=["o_proj"]),
}


def _last_logits(family: str, **settings) -> torch.Tensor:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **settings)).eval()
    ids = torch.randint(3, 40000, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits[0, -1]


@pytest.mark.parametrize("family", sorted(FEATURES_OFF))
def test_each_familys_particular_settings_change_its_output(family):
    """Guards the comparisons below against passing vacuously: without the setting, the model computes
    something else on a 14-token prompt."""
    expected = _last_logits(family, **FAMILIES[family])
    for settings in FEATURES_OFF[family]:
        assert not torch.allclose(_last_logits(family, **{**FAMILIES[family], **settings}), expected), settings


def _make_adapters(family: str, model_dir: str, root) -> dict[str, str]:
    dirs = {
        "lora": make_lora(
            model_dir,
            str(root / "lora"),
            seed=5,
            r=8,
            lora_alpha=16,
            target_modules=LORA_TARGETS.get(family, "all-linear"),
        ),
        # A second LoRA on the attention output and the LM head (which sees other positions than the body).
        "lora_head": make_lora(
            model_dir, str(root / "lora_head"), seed=6, r=4, lora_alpha=8, target_modules=["o_proj", "lm_head"]
        ),
    }
    for i, kind in enumerate(EXTRA_KINDS.get(family, ())):
        if kind in BOTTLENECK_PRESETS:
            dirs[kind] = make_bottleneck(model_dir, str(root / kind), kind, seed=40 + i)
        else:
            overrides = IA3_TARGETS.get(family, {}) if kind == "ia3" else {}
            dirs[kind] = make_peft_adapter(model_dir, str(root / kind), kind, seed=10 + i, **overrides)
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers_and_peft_alone_and_mixed(family, tmp_path, smol_dir):
    """The base and every adapter on three prompts: each request alone, then all at once (more requests than
    batch rows, so rows join and leave), each equal to its oracle computed alone."""
    model_dir = make_tiny_llama(str(tmp_path / "model"), smol_dir, family=family, **FAMILIES[family])
    dirs = _make_adapters(family, model_dir, tmp_path)
    prompts = PROMPTS[:3]
    expected = reference_table(model_dir, dirs, prompts, MAX_NEW)
    for name in dirs:
        assert any(expected[name, i].token_ids != expected["", i].token_ids for i in range(len(prompts))), name
    config = ServerConfig.of(
        model=model_dir,
        max_batch_size=8,
        max_seq_len=128,
        max_adapters=len(dirs) + 1,
        max_lora_rank=8,
        max_prefill_tokens=4,
        block_size=4,
    )
    with ServerThread(config) as running, Client(running.target, timeout=300) as client:
        for name, path in dirs.items():
            client.load_adapter(name, path)

        def run(job):
            name, i = job
            return client.generate(prompts[i], adapter_id=name, max_new_tokens=MAX_NEW, logprobs=True)

        alone = {(name, 0): run((name, 0)) for name in ["", *dirs]}
        jobs = [(name, i) for i in range(len(prompts)) for name in ["", *dirs]]
        with ThreadPoolExecutor(len(jobs)) as pool:
            mixed = dict(zip(jobs, pool.map(run, jobs), strict=True))
    for job, result in [*alone.items(), *mixed.items()]:
        assert result.token_ids == expected[job].token_ids, (family, job)
        assert_logprobs_close(result.logprobs, expected[job].logprobs)


# ---- refusals ------------------------------------------------------------------------------------------
def _error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(DeltaserveError) as info:
        call()
    return info.value.code, info.value.message


def test_adapters_a_family_cannot_take_are_refused_by_name(tmp_path, smol_dir):
    """Gemma 2 has no entry in the bottleneck table (post-norm layers); Mixtral's experts are 3-D parameters,
    not linear layers, so a LoRA on them is refused, while one on its attention is served (above)."""
    from peft import LoraConfig, get_peft_model

    gemma = make_tiny_llama(str(tmp_path / "gemma"), smol_dir, family="Gemma2", **FAMILIES["Gemma2"])
    bottleneck = make_bottleneck(gemma, str(tmp_path / "houlsby"), "houlsby", seed=1)
    with ServerThread(ServerConfig.of(model=gemma, max_seq_len=64)) as running, Client(running.target) as client:
        code, message = _error(lambda: client.load_adapter("houlsby", bottleneck))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "bottleneck adapters are not served on Gemma2ForCausalLM" in message

    mixtral = make_tiny_llama(str(tmp_path / "mixtral"), smol_dir, family="Mixtral", **FAMILIES["Mixtral"])
    experts = LoraConfig(r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"], task_type="CAUSAL_LM")
    get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(mixtral), experts).save_pretrained(
        str(tmp_path / "experts")
    )
    with ServerThread(ServerConfig.of(model=mixtral, max_seq_len=64)) as running, Client(running.target) as client:
        code, message = _error(lambda: client.load_adapter("experts", str(tmp_path / "experts")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "target_parameters" in message and "experts" in message


def test_an_encoder_decoder_and_a_state_space_model_are_refused_at_start_up(tmp_path, smol_dir):
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    )
    t5.save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelLoadError, match=r"T5ForConditionalGeneration.* is not served: it is an encoder-decoder"):
        Server.create(ServerConfig.of(model=str(tmp_path / "t5")))
    mamba = transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, state_size=8)
    )
    mamba.save_pretrained(tmp_path / "mamba")
    with pytest.raises(ModelLoadError, match=r"layers of type linear_attention.*not recurrent, state-space"):
        Server.create(ServerConfig.of(model=str(tmp_path / "mamba")))


def _runner(model) -> ModelRunner:
    return ModelRunner(model.eval(), dtype=torch.float32, device=torch.device("cpu"))


def _tiny(family: str = "Llama", **settings):
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=256, **settings))


def test_what_the_attention_probe_refuses_it_names():
    """Refusals decided by what a model's code does: a layer whose attention bypasses the interface, a
    non-causal layer, attention with sinks, and rope scalings that make a row depend on its batch."""
    bypass = _tiny()
    bypass.model.layers[1].self_attn.forward = lambda hidden_states, **kwargs: (hidden_states * 0, None)
    with pytest.raises(ModelLoadError, match=r"layers \[1\] do not attend through transformers' AttentionInterface"):
        _runner(bypass)

    bidirectional = _tiny()
    bidirectional.model.layers[0].self_attn.is_causal = False
    with pytest.raises(ModelLoadError, match="layer 0 attends non-causally"):
        _runner(bidirectional)

    sinks = _tiny("GptOss", head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    with pytest.raises(ModelLoadError, match="passes s_aux, which deltaserve's attention function does not"):
        _runner(sinks)

    for family, rope in [
        ("Llama", dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
        ("Phi3", dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8, long_factor=[4.0] * 8)),
    ]:
        with pytest.raises(ModelLoadError, match=f"rope_type '{rope['rope_type']}' .* depend on the other rows"):
            _runner(_tiny(family, rope_parameters=rope, original_max_position_embeddings=16))
