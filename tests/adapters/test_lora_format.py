"""Reading PEFT LoRA directories: scaling rules, patterns, key layouts and refusals, against PEFT's own
computation on the same files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from deltaserve.adapters import (
    AdapterFormatError,
    AdapterMismatchError,
    BaseModelSpec,
    LinearShape,
    LoraConfig,
    UnsupportedAdapterError,
    load_adapter,
)
from deltaserve.adapters.registry import declared_kind
from safetensors.torch import load_file, save_file

from tests.references import load_reference_model


def _spec(model) -> BaseModelSpec:
    linear = {
        n: LinearShape(m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    return BaseModelSpec(linear, frozenset(n for n, _ in model.named_modules() if n not in linear))


@pytest.fixture(scope="module")
def spec(tiny_dir) -> BaseModelSpec:
    return _spec(load_reference_model(tiny_dir))


@pytest.mark.parametrize("name", ["qv8", "all16_rs", "pattern", "head"])
def test_delta_weights_equal_peft(tiny_dir, lora_dirs, spec, name):
    """B_scaled @ A per module equals PEFT's own get_delta_weight for the same file."""
    adapter = load_adapter(lora_dirs[name], spec)
    peft_model = load_reference_model(tiny_dir, lora_dirs[name])
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }
    assert set(adapter.modules) == set(peft_layers)
    for module, weights in adapter.modules.items():
        expected = peft_layers[module].get_delta_weight("default")
        torch.testing.assert_close(weights.lora_b_scaled @ weights.lora_a, expected, rtol=1e-5, atol=1e-6)


def test_rank_and_alpha_patterns_and_rslora(lora_dirs, spec):
    pattern = load_adapter(lora_dirs["pattern"], spec)
    assert _config(lora_dirs["pattern"]).rank_and_alpha("model.layers.0.self_attn.o_proj") == (8, 8)
    assert _config(lora_dirs["pattern"]).rank_and_alpha("model.layers.1.mlp.down_proj") == (4, 2)
    assert _config(lora_dirs["pattern"]).scaling("model.layers.1.mlp.down_proj") == pytest.approx(0.5)
    assert pattern.rank == 8 and pattern.target_modules == ["down_proj", "o_proj", "q_proj"]
    rs = load_adapter(lora_dirs["all16_rs"], spec)
    assert rs.lora_scaling["model.layers.0.mlp.up_proj"] == pytest.approx(32 / math.sqrt(16))


def test_keys_with_adapter_name_are_read(lora_dirs, spec, tmp_path):
    renamed = shutil.copytree(lora_dirs["qv8"], tmp_path / "named")
    tensors = load_file(renamed / "adapter_model.safetensors")
    save_file(
        {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
        renamed / "adapter_model.safetensors",
    )
    a = load_adapter(lora_dirs["qv8"], spec)
    b = load_adapter(str(renamed), spec)
    for module in a.modules:
        assert torch.equal(a.modules[module].lora_a, b.modules[module].lora_a)


def _config(path: str) -> LoraConfig:
    return LoraConfig.from_dict(json.loads((Path(path) / "adapter_config.json").read_text()))


def _with_config(src: str, dst, **changes) -> str:
    path = shutil.copytree(src, dst)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    ("changes", "error", "fragment"),
    [
        ({"use_dora": True}, AdapterFormatError, "use_dora .* does not match the weights"),
        ({"modules_to_save": ["lm_head"]}, UnsupportedAdapterError, "modules_to_save"),
        ({"peft_type": "LOHA"}, UnsupportedAdapterError, "'LOHA' is not served; served kinds: lora, dora, adalora"),
        ({"peft_type": None}, AdapterFormatError, "peft_type"),
        ({"r": 4}, AdapterMismatchError, "do not fit"),
        ({"r": "eight"}, AdapterFormatError, "malformed"),
    ],
)
def test_config_refusals(lora_dirs, spec, tmp_path, changes, error, fragment):
    with pytest.raises(error, match=fragment):
        load_adapter(_with_config(lora_dirs["qv8"], tmp_path / "a", **changes), spec)


def test_weight_refusals(lora_dirs, spec, tmp_path):
    broken = shutil.copytree(lora_dirs["qv8"], tmp_path / "b")
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    save_file({k: v for k, v in tensors.items() if k != key}, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="no lora_B"):
        load_adapter(str(broken), spec)
    extra = {k.replace("q_proj", "nonexistent_proj"): v.clone() for k, v in tensors.items() if "q_proj" in k}
    save_file({**tensors, **extra}, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match="nonexistent_proj"):
        load_adapter(str(broken), spec)
    save_file(
        {**tensors, "base_model.model.something_else": tensors[key].clone()},
        broken / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterFormatError, match="unexpected tensor"):
        load_adapter(str(broken), spec)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapter(str(broken), spec)


def test_unknown_module_and_non_linear_target(lora_dirs, spec, tmp_path):
    broken = shutil.copytree(lora_dirs["qv8"], tmp_path / "c")
    tensors = load_file(broken / "adapter_model.safetensors")
    moved = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(moved, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"layers\.7"):
        load_adapter(str(broken), spec)
    norm = {k.replace("self_attn.q_proj", "input_layernorm"): v for k, v in tensors.items()}
    save_file(norm, broken / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapterError, match="not a linear layer"):
        load_adapter(str(broken), spec)


def test_kind_for_names_unserved_kinds():
    with pytest.raises(UnsupportedAdapterError, match="'LOKR'"):
        declared_kind({"peft_type": "LOKR"})


def test_base_weight_copies_must_equal_the_base(lora_dirs, spec, tmp_path, tiny_dir):
    """PEFT saves lm_head's base weight beside a LoRA on it; a copy that differs from the base is refused."""
    assert any(".base_layer." in key for key in load_file(f"{lora_dirs['head']}/adapter_model.safetensors"))
    base = load_reference_model(tiny_dir)
    weights = {
        name: module.weight.detach() for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)
    }
    full_spec = BaseModelSpec(spec.linear_layers, spec.other_modules, base_weight=weights.get)
    load_adapter(lora_dirs["head"], full_spec)
    changed = shutil.copytree(lora_dirs["head"], tmp_path / "changed")
    tensors = load_file(changed / "adapter_model.safetensors")
    key = next(k for k in tensors if ".base_layer." in k)
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, changed / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapterError, match="modified weights"):
        load_adapter(str(changed), full_spec)
