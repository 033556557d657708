"""Parsing the other adapter kinds, without a server: the weights deltaserve derives equal what PEFT computes
from the same files (its merged weights and delta weights), and malformed or unserved files are refused by
name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from deltaserve.adapters import (
    AdapterFormatError,
    AdapterMismatchError,
    BaseModelSpec,
    LinearShape,
    ModelGeometry,
    ReadOptions,
    UnsupportedAdapterError,
    compose,
    load_adapter,
)
from deltaserve.testing.kinds import make_bottleneck, make_peft_adapter

from tests.references import load_reference_model


def _linear_layers(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def spec_of(model) -> BaseModelSpec:
    """What the server derives from its base model, built here from a plain transformers model."""
    layers = _linear_layers(model)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return BaseModelSpec(
        linear_layers={n: LinearShape(m.in_features, m.out_features) for n, m in layers.items()},
        other_modules=frozenset(n for n, _ in model.named_modules() if n not in layers),
        base_weight=lambda name: layers[name].weight.detach(),
        dense_weight=lambda name: layers[name].weight.detach().float(),
        base_bias=lambda name: None if layers[name].bias is None else layers[name].bias.detach().float(),
        geometry=ModelGeometry(config.num_hidden_layers, config.hidden_size, config.num_key_value_heads, head_dim),
    )


@pytest.fixture(scope="module")
def base(tiny_dir):
    return load_reference_model(tiny_dir)


@pytest.fixture(scope="module")
def kind_files(tmp_path_factory, tiny_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kind_files")
    dirs = {
        name: make_peft_adapter(tiny_dir, str(root / name), name, seed=70 + i)
        for i, name in enumerate(["dora", "adalora", "ia3", "prefix", "prompt"])
    }
    dirs["houlsby"] = make_bottleneck(tiny_dir, str(root / "houlsby"), "houlsby", seed=80)
    dirs["pfeiffer"] = make_bottleneck(tiny_dir, str(root / "pfeiffer"), "pfeiffer", seed=81)
    return dirs


@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_effective_weights_equal_peft_merged(tiny_dir, base, kind_files, name):
    """y = o * (x W^T + b) + beta + B A x  is the layer PEFT's merge_and_unload produces: W' = o W + B A."""
    adapter = load_adapter(kind_files[name], spec_of(base))
    merged = _linear_layers(load_reference_model(tiny_dir, kind_files[name]).merge_and_unload())
    originals = _linear_layers(base)
    assert adapter.modules
    for module, delta in adapter.modules.items():
        weight = originals[module].weight.detach()
        if delta.input_scale is not None:
            weight = weight * delta.input_scale[None, :]
        if delta.output_scale is not None:
            weight = weight * delta.output_scale[:, None]
        if delta.lora_a is not None:
            weight = weight + delta.lora_b_scaled @ delta.lora_a
        torch.testing.assert_close(weight, merged[module].weight.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(weight, originals[module].weight)  # the adapter changes this layer


def test_adalora_is_served_as_the_lora_peft_computes(tiny_dir, base, kind_files):
    adapter = load_adapter(kind_files["adalora"], spec_of(base))
    peft_model = load_reference_model(tiny_dir, kind_files["adalora"])
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_E")}
    assert set(adapter.modules) == {n for n, m in layers.items() if "default" in m.lora_E}
    for module, delta in adapter.modules.items():
        expected = layers[module].get_delta_weight("default")
        torch.testing.assert_close(delta.lora_b_scaled @ delta.lora_a, expected, rtol=1e-5, atol=1e-7)
        assert delta.rank == layers[module].lora_E["default"].shape[0]


def test_prefix_entries_are_peft_past_key_values(tiny_dir, base, kind_files):
    adapter = load_adapter(kind_files["prefix"], spec_of(base))
    cache = load_reference_model(tiny_dir, kind_files["prefix"]).get_prompt(batch_size=1)
    for layer in range(base.config.num_hidden_layers):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [kv_heads, P, head_dim]
        torch.testing.assert_close(adapter.prefix.keys[layer], keys)
        torch.testing.assert_close(adapter.prefix.values[layer], values)


def _edited(src: str, dst: Path, **settings) -> str:
    path = shutil.copytree(src, dst)
    config = json.loads((path / "adapter_config.json").read_text())
    config["config"].update(settings)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    ("settings", "error", "fragment"),
    [
        ({"ln_before": True}, UnsupportedAdapterError, "ln_before=True"),
        ({"use_gating": True}, UnsupportedAdapterError, "use_gating"),
        ({"residual_before_ln": "post_add"}, UnsupportedAdapterError, "post_add"),
        ({"original_ln_after": False}, UnsupportedAdapterError, "residual stream added 0 times"),
        ({"non_linearity": "cube"}, UnsupportedAdapterError, "non_linearity 'cube'"),
        ({"scaling": "learned"}, AdapterFormatError, "no saved scaling tensor"),
    ],
)
def test_bottleneck_settings_not_served_are_named(base, kind_files, tmp_path, settings, error, fragment):
    with pytest.raises(error, match=fragment):
        load_adapter(_edited(kind_files["houlsby"], tmp_path / "edited", **settings), spec_of(base))


@pytest.mark.parametrize("value", [[None], "two", {"n": 1}])
def test_a_malformed_soft_prompt_setting_is_a_format_error(base, kind_files, tmp_path, value):
    """Found by the fuzz campaign: a non-integer num_transformer_submodules once escaped as a TypeError."""
    path = shutil.copytree(kind_files["prefix"], tmp_path / "edited")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "num_transformer_submodules": value}))
    with pytest.raises(AdapterFormatError, match="num_transformer_submodules must be an integer"):
        load_adapter(str(path), spec_of(base))


def test_bottleneck_files_and_shapes(base, kind_files, tmp_path):
    spec = spec_of(base)
    parsed = load_adapter(kind_files["pfeiffer"], spec)
    assert {site for _, site in parsed.bottlenecks} == {"output"}
    assert all(b.input_mode == "with_residual" for b in parsed.bottlenecks.values())
    assert {b.input_mode for b in load_adapter(kind_files["houlsby"], spec).bottlenecks.values()} == {"block_output"}

    pickled = shutil.copytree(kind_files["houlsby"], tmp_path / "pickled")
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "adapter.safetensors"), pickled / "pytorch_adapter.bin")
    (pickled / "adapter.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_adapter(str(pickled), spec)
    assert load_adapter(str(pickled), spec, ReadOptions(allow_pickle=True)).bottlenecks

    wider = shutil.copytree(kind_files["houlsby"], tmp_path / "wider")
    config = json.loads((wider / "adapter_config.json").read_text())
    (wider / "adapter_config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(AdapterMismatchError, match="hidden_size 128"):
        load_adapter(str(wider), spec)


def test_stack_composition_rule(base, kind_files):
    spec = spec_of(base)
    ia3, dora, prefix, prompt, houlsby, pfeiffer = (
        load_adapter(kind_files[name], spec) for name in ("ia3", "dora", "prefix", "prompt", "houlsby", "pfeiffer")
    )
    stack = compose("s", ["prefix", "ia3", "dora", "prompt", "houlsby"], [prefix, ia3, dora, prompt, houlsby])
    v_proj = "model.layers.0.self_attn.v_proj"
    torch.testing.assert_close(
        stack.modules[v_proj].output_scale, ia3.modules[v_proj].output_scale * dora.modules[v_proj].output_scale
    )
    assert torch.equal(stack.modules[v_proj].lora_a, dora.modules[v_proj].lora_a)
    assert stack.extra_positions == prefix.extra_positions + prompt.extra_positions
    assert stack.bottlenecks is houlsby.bottlenecks and not stack.mergeable
    with pytest.raises(UnsupportedAdapterError, match="at most one bottleneck"):
        compose("t", ["houlsby", "pfeiffer"], [houlsby, pfeiffer])
