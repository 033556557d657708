"""Incremental detokenization with stop strings.

Text is produced token by token so that streamed pieces concatenate to exactly
``tokenizer.decode(generated_ids, skip_special_tokens=True)`` (cut at a stop string). A piece is held
back while it ends in an incomplete UTF-8 sequence, or while its tail could still become a stop string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all text so far (cut at the stop string once one matched)
        self._emitted = 0  # how much of self.text was handed out
        self.stop_sequence: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        """Take one generated token; afterwards `stop_sequence` tells whether a stop string matched."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return  # nothing printable yet (special token, or half a multi-byte character)
        self._append(new_text[len(prefix_text) :])
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)

    def flush(self) -> None:
        """At the end of generation, take whatever text is still pending (even an incomplete character)."""
        if self.stop_sequence is not None:
            return
        full = self._decode(self._ids)
        decoded_so_far = self._decode(self._ids[: self._read_offset])
        if len(full) > len(decoded_so_far):
            self._append(full[len(decoded_so_far) :])

    def _append(self, piece: str) -> None:
        if self.stop_sequence is not None:
            return
        search_from = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
        self.text += piece
        for stop in self._stop:
            index = self.text.find(stop, search_from)
            if index >= 0 and (self.stop_sequence is None or index < len(self.text)):
                self.text = self.text[:index]
                self.stop_sequence = stop

    def take_pending(self, final: bool) -> str:
        """Text not yet handed out, holding back a tail that may still grow into a stop string."""
        end = len(self.text) if final or self.stop_sequence is not None else len(self.text) - self._held_back()
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    def _held_back(self) -> int:
        """The longest tail of the text that is a proper prefix of a stop string. Only sizes at which the stop
        string holds the text's last character are compared, so a typical step costs a few comparisons, and
        the count and length caps on stop strings (frontends/core.py) bound the worst case."""
        if not self._stop or not self.text:
            return 0
        last, longest = self.text[-1], 0
        for stop in self._stop:
            end = min(len(stop) - 1, len(self.text))
            while end > longest:
                size = stop.rfind(last, 0, end) + 1  # a candidate prefix stop[:size] ends with `last`
                if size <= longest:
                    break
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
                end = size - 1
        return longest
