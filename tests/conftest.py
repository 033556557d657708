"""Session fixtures: the embedded SmolLM2, a tiny random Llama with its real tokenizer, real PEFT adapters."""

from __future__ import annotations

import pytest
import torch
from deltaserve.testing.helpers import make_lora, make_tiny_llama

torch.set_num_threads(2)

# name -> PEFT LoraConfig arguments. Non-zero random A and B (init_lora_weights=False), so every adapter
# really changes the output; the variants cover lists, regexes, all-linear, rsLoRA and rank/alpha patterns.
LORA_VARIANTS: dict[str, dict] = {
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all16_rs": dict(r=16, lora_alpha=32, target_modules="all-linear", use_rslora=True),
    "pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=r".*\.(q_proj|o_proj|down_proj)",
        rank_pattern={"o_proj": 8},
        alpha_pattern={"down_proj": 2},
    ),
    "head": dict(r=4, lora_alpha=8, target_modules=["lm_head", "k_proj"]),
}


@pytest.fixture(scope="session")
def smol_dir() -> str:
    from deltaserve.server.model.loader import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_dir) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "model"), smol_dir)


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory, tiny_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {
        name: make_lora(tiny_dir, str(root / name), seed=i + 1, **kwargs)
        for i, (name, kwargs) in enumerate(LORA_VARIANTS.items())
    }
