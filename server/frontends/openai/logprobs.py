"""Per-token text for OpenAI's logprobs objects: each token's text decoded alone, and its exact bytes."""

from __future__ import annotations

from typing import Any


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table (GPT-2's)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


class TokenTexts:
    """Each token's text (decoded alone, special tokens kept) and its exact UTF-8 bytes, which a text cut
    in the middle of a multi-byte character cannot show. Cached per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._bytes_of = _byte_decoder() if type(decoder).__name__ == "ByteLevel" else None
        self._special = set(getattr(tokenizer, "added_tokens_decoder", {}) or ())
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            text = self.tokenizer.decode([token_id])
            raw = list(text.encode())
            if self._bytes_of is not None and token_id not in self._special:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                if all(char in self._bytes_of for char in piece):
                    raw = [self._bytes_of[char] for char in piece]
            cached = self._cache[token_id] = (text, raw)
        return cached
