"""Every PEFT merge method of `add_weighted_adapter` (ties, dare_linear, dare_ties, magnitude_prune, svd,
besides cat and linear): the mix deltaserve builds has, per module, the delta B @ A * scaling that PEFT's
own mix of the same files has. DARE is random in PEFT (torch's global generator): PEFT's merge is run with
the global generator seeded with MIX_SEED when its merge starts, which is what deltaserve's own generator
draws from, in the same order."""

from __future__ import annotations

import pytest
import torch
from deltaserve.adapters import BaseModelSpec, LinearShape, load_adapter
from deltaserve.server.errors import InvalidRequestError
from deltaserve.server.residency.mixes import MIX_SEED, combine, mix_spec
from deltaserve.testing.helpers import make_lora
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.model import LoraModel

from tests.references import load_reference_model


@pytest.fixture(scope="module")
def parts(tiny_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("methods")
    return {
        "a": make_lora(tiny_dir, str(root / "a"), seed=41, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": make_lora(tiny_dir, str(root / "b"), seed=42, r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
        "c": make_lora(tiny_dir, str(root / "c"), seed=43, r=4, lora_alpha=16, target_modules=["v_proj", "q_proj"]),
    }


@pytest.fixture(scope="module")
def spec(tiny_dir) -> BaseModelSpec:
    model = load_reference_model(tiny_dir)
    linear = {
        n: LinearShape(m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    return BaseModelSpec(linear, frozenset(n for n, _ in model.named_modules() if n not in linear))


def _peft_deltas(tiny_dir, parts, names, weights, method, **options) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(load_reference_model(tiny_dir), parts[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(parts[name], adapter_name=name)
    original = LoraModel._generalized_task_arithmetic_weighted_adapter
    seeded = []

    def seeded_first(self, *args, **kwargs):  # seed torch's generator once, when PEFT's merge begins
        if not seeded:
            torch.manual_seed(MIX_SEED)
            seeded.append(True)
        return original(self, *args, **kwargs)

    LoraModel._generalized_task_arithmetic_weighted_adapter = seeded_first
    try:
        model.add_weighted_adapter(list(names), list(weights), "mix", combination_type=method, **options)
    finally:
        LoraModel._generalized_task_arithmetic_weighted_adapter = original
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "mix" in module.lora_A:
            deltas[name] = module.get_delta_weight("mix").detach()
    return deltas


CASES = [
    ("ties", ("a", "b", "c"), (0.7, -0.5, 0.9), {"density": 0.5, "majority_sign_method": "total"}),
    ("ties", ("a", "c"), (1.0, 0.4), {"density": 0.3, "majority_sign_method": "frequency"}),
    ("dare_linear", ("a", "b", "c"), (0.6, 0.8, -0.3), {"density": 0.6}),
    ("dare_ties", ("a", "b"), (0.5, 0.5), {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", ("a", "b", "c"), (1.0, -1.0, 0.5), {"density": 0.4}),
    ("svd", ("a", "b", "c"), (0.7, -0.4, 1.2), {}),
    ("linear", ("a", "c"), (0.6, -0.9), {}),
]


@pytest.mark.parametrize(("method", "names", "weights", "options"), CASES)
def test_mix_delta_equals_peft(tiny_dir, parts, spec, method, names, weights, options):
    expected = _peft_deltas(tiny_dir, parts, names, weights, method, **options)
    adapters = [load_adapter(parts[name], spec) for name in names]
    mix = mix_spec(
        method, list(zip(names, weights, strict=True)), options.get("density"), options.get("majority_sign_method", "")
    )
    mixed = combine(mix, adapters, list(spec.linear_layers))
    assert set(mixed.modules) == set(expected)
    for name, delta in mixed.modules.items():
        ours = delta.lora_b_scaled @ delta.lora_a
        assert ours.abs().sum() > 0
        torch.testing.assert_close(ours, expected[name], rtol=1e-4, atol=1e-5, msg=f"{method} {name}")


def test_dare_is_random_but_a_pure_function_of_the_request(parts, spec):
    adapters = [load_adapter(parts[name], spec) for name in ("a", "b")]
    first = combine(mix_spec("dare_linear", [("a", 0.5), ("b", 0.5)], 0.5), adapters, list(spec.linear_layers))
    again = combine(mix_spec("dare_linear", [("a", 0.5), ("b", 0.5)], 0.5), adapters, list(spec.linear_layers))
    plain = combine(mix_spec("linear", [("a", 0.5), ("b", 0.5)]), adapters, list(spec.linear_layers))
    name = next(iter(first.modules))
    assert torch.equal(first.modules[name].lora_a, again.modules[name].lora_a)
    assert not torch.equal(first.modules[name].lora_a, plain.modules[name].lora_a)


@pytest.mark.parametrize(
    ("method", "density", "sign"),
    [("ties", None, ""), ("ties", 1.5, ""), ("magnitude_prune", -0.1, ""), ("linear", 0.5, ""), ("ties", 0.5, "x")],
)
def test_bad_mix_options_are_refused(method, density, sign):
    with pytest.raises(InvalidRequestError):
        mix_spec(method, [("a", 1.0), ("b", 1.0)], density, sign)
