"""Tiny real models, real PEFT LoRA adapters, and real servers on loopback (for tests and benchmarks)."""

from __future__ import annotations

import asyncio
import socket
import threading

import torch
from deltaserve.server.app import Server
from deltaserve.server.config import ServerConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(family: str = "Llama", **overrides):
    """The config of a small random decoder of `family` (the prefix of its transformers config class: "Llama",
    "Gemma2", "Gemma3Text", ...), sized for tests, with the embedded model's vocabulary."""
    import transformers

    # A wide initializer gives peaked, varied next-token distributions: greedy runs do not collapse
    # into one repeated token and are not tie-prone, so token-equality checks mean something.
    params = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    params.update(overrides)
    return getattr(transformers, f"{family}Config")(**params)


def make_tiny_llama(out_dir: str, tokenizer_dir: str, seed: int = 0, family: str = "Llama", **overrides) -> str:
    """A small random decoder (Llama unless `family` names another, e.g. "Qwen2"; see `tiny_config`) with the
    embedded model's real tokenizer, saved as a HF directory."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def make_lora(model_dir: str, out_dir: str, seed: int, scale: float = 1.0, **lora_kwargs) -> str:
    """A real PEFT LoRA adapter with random non-zero A and B, saved with PEFT's own save_pretrained."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out_dir)
    return out_dir


class ServerThread:
    """A real deltaserve gRPC server on 127.0.0.1 with its own event loop, in a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.server = Server.create(config.replace(host="127.0.0.1", port=0))
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.server.start())
        self._started.set()
        self._loop.run_forever()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(120):
            raise RuntimeError("server did not start")
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        future = asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop)
        future.result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __exit__(self, *exc) -> None:
        self.stop()
