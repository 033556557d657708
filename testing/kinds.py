"""Real adapter files of every kind deltaserve serves, and the reference computations they are checked against.

PEFT kinds are created and saved by PEFT itself, with random non-identity weights so that each one really
changes the output. Bottleneck adapters are written in the AdapterHub `adapters` library's directory format
(that library pins transformers 4.x and cannot be installed beside ours), and their reference is the
format's definition applied to the transformers model with forward hooks.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

# name -> PEFT config factory arguments: (config class name, kwargs)
PEFT_KINDS: dict[str, tuple[str, dict]] = {
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "adalora": (
        "AdaLoraConfig",
        dict(
            init_r=6,
            target_r=3,
            tinit=0,
            tfinal=1,
            deltaT=1,
            total_step=4,
            target_modules=["q_proj", "v_proj", "up_proj"],
        ),
    ),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=5)),
    "prefix_projected": (
        "PrefixTuningConfig",
        dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=32),
    ),
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=6)),
    "ptuning": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=32)),
    "lora16": ("LoraConfig", dict(r=16, lora_alpha=16, target_modules="all-linear")),
}


def _randomize(model, seed: int, scale: float) -> None:
    """Move every trainable parameter away from its (often identity) initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.add_(noise.to(param.dtype))


def _prune_adalora(model, steps: int) -> None:
    """A few real AdaLoRA steps so that its rank allocator prunes and the saved file has a rank_pattern."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.arange(2, 18)[None]
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()


def make_peft_adapter(model_dir: str, out_dir: str, name: str, seed: int, scale: float = 0.3, **overrides) -> str:
    import peft

    config_class, kwargs = PEFT_KINDS[name]
    kwargs = {**kwargs, **overrides}
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, getattr(peft, config_class)(task_type="CAUSAL_LM", **kwargs))
    if name == "adalora":
        _prune_adalora(model, kwargs["total_step"])
    _randomize(model, seed, scale)
    model.save_pretrained(out_dir)
    return out_dir


def make_biased_lora(model_dir: str, out_dir: str, seed: int) -> str:
    """A LoRA with trained biases (bias="all", BitFit-style) and lora_bias on a model with q/k/v biases."""
    import peft

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], bias="all", lora_bias=True, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(base, config)
    _randomize(model, seed, 0.3)
    model.save_pretrained(out_dir)
    return out_dir


# ---- bottleneck adapters in AdapterHub's format --------------------------------------------------------
BOTTLENECK_PRESETS = {
    # name: (mh_adapter, output_adapter, original_ln_before, is_parallel, non_linearity, scaling)
    "houlsby": (True, True, False, False, "swish", 1.0),
    "pfeiffer": (False, True, True, False, "relu", 1.0),
    "parallel": (False, True, False, True, "relu", 4.0),
}


def make_bottleneck(
    model_dir: str, out_dir: str, preset: str, seed: int, reduction_factor: int = 8, scale: float = 0.3
) -> str:
    """A bottleneck adapter as the `adapters` library saves one (adapter_config.json + adapter.safetensors)."""
    mh, output, before, parallel, activation, scaling = BOTTLENECK_PRESETS[preset]
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    hidden, size = config.hidden_size, config.hidden_size // reduction_factor
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for site, present in (("attention_adapters", mh), ("output_adapters", output)):
            if not present:
                continue
            key = f"model.layers.{layer}.{site}.adapters.{preset}"
            tensors[f"{key}.adapter_down.0.weight"] = torch.randn(size, hidden, generator=generator) * scale
            tensors[f"{key}.adapter_down.0.bias"] = torch.randn(size, generator=generator) * scale / 3
            tensors[f"{key}.adapter_up.weight"] = torch.randn(hidden, size, generator=generator) * scale
            tensors[f"{key}.adapter_up.bias"] = torch.randn(hidden, generator=generator) * scale / 3
    settings = dict(
        mh_adapter=mh,
        output_adapter=output,
        reduction_factor=reduction_factor,
        non_linearity=activation,
        original_ln_before=before,
        original_ln_after=True,
        residual_before_ln=True,
        adapter_residual_before_ln=False,
        ln_before=False,
        ln_after=False,
        init_weights="bert",
        is_parallel=parallel,
        scaling=scaling,
        use_gating=False,
        phm_layer=False,
        inv_adapter=None,
        cross_adapter=False,
        leave_out=[],
        dropout=0.0,
    )
    os.makedirs(out_dir, exist_ok=True)
    full = dict(
        config=settings,
        hidden_size=hidden,
        model_class="LlamaForCausalLM",
        model_name="",
        model_type=config.model_type,
        name=preset,
        version="adapters.1.3.0",
    )
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as handle:
        json.dump(full, handle, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(out_dir, "adapter.safetensors"))
    return out_dir


class BottleneckReference:
    """The AdapterHub definition on a transformers model, by forward hooks: a block mapping r to h makes the
    layer output r + h + A(x), x = h (Houlsby), h + r (Pfeiffer) or r (parallel)."""

    def __init__(self, model, adapter_dir: str) -> None:
        from safetensors.torch import load_file
        from transformers.activations import ACT2FN

        with open(os.path.join(adapter_dir, "adapter_config.json")) as handle:
            full = json.load(handle)
        settings = full["config"]
        tensors = load_file(os.path.join(adapter_dir, "adapter.safetensors"))
        act = ACT2FN[settings["non_linearity"]]
        name = full["name"]
        self.handles = []
        for index, layer in enumerate(model.model.layers):
            for site, block, norm in (
                ("attention_adapters", layer.self_attn, layer.input_layernorm),
                ("output_adapters", layer.mlp, layer.post_attention_layernorm),
            ):
                prefix = f"model.layers.{index}.{site}.adapters.{name}"
                if f"{prefix}.adapter_up.weight" not in tensors:
                    continue
                self._hook(block, norm, tensors, prefix, act, settings)
        self.model = model

    def _hook(self, block, norm, tensors, prefix, act, settings) -> None:
        down_w, down_b = tensors[f"{prefix}.adapter_down.0.weight"], tensors[f"{prefix}.adapter_down.0.bias"]
        up_w, up_b = tensors[f"{prefix}.adapter_up.weight"], tensors[f"{prefix}.adapter_up.bias"]
        captured = {}

        def adapter(x):
            return settings["scaling"] * (act(x @ down_w.t() + down_b) @ up_w.t() + up_b)

        def keep_residual(module, args):
            captured["r"] = args[0]

        def add_adapter(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            r = captured["r"]
            x = r if settings["is_parallel"] else (h + r if settings["original_ln_before"] else h)
            h = h + adapter(x)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        self.handles.append(norm.register_forward_pre_hook(keep_residual))
        self.handles.append(block.register_forward_hook(add_adapter))
