"""Texts -> token ids and where each token starts and ends: the tokenizer step of rendering.

    encoder = TextEncoder(tokenizer)
    encoded = encoder.encode_batch(texts, add_special_tokens=False)   # [Encoded(ids, starts, ends, ...)]

Three routes, all giving the tokenizer's own ids:
  - tiktoken (`sftkit.data.fast_bpe`) for byte-level BPE tokenizers it qualifies for, once `prepare`
    was told of at least `FAST_MIN_TEXTS` texts to come; offsets are counted in UTF-8 bytes from the
    token lengths;
  - the Rust backend of a fast tokenizer called directly (character offsets);
  - the tokenizer's own `__call__` otherwise (slow tokenizers, truncation or padding set).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from transformers import PreTrainedTokenizerBase

from sftkit.data.fast_bpe import FastBPE, fast_bpe_for

# Building tiktoken's tables and checking the tokenizer takes about 1 s (Qwen2.5); tiktoken then saves
# about 0.2 ms per conversation on one core, so smaller datasets are left to the tokenizer.
FAST_MIN_TEXTS = 5_000


@dataclass(slots=True)
class Encoded:
    """One text's tokens. `starts[j]`/`ends[j]` bound token j in the text, in characters, or in UTF-8
    bytes when `in_bytes` (a token may begin inside a multi-byte character)."""

    ids: list[int]
    starts: list[int]
    ends: list[int]
    in_bytes: bool = False

    @classmethod
    def from_offsets(cls, ids: list[int], offsets: list[tuple[int, int]]) -> Encoded:
        return cls(ids, [a for a, _ in offsets], [b for _, b in offsets])  # every caller's ids are its own

    def spans_in_units(self, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Character spans of `text` in this encoding's offset units."""
        if not self.in_bytes or text.isascii():
            return spans
        return [(_utf8_len(text, begin), _utf8_len(text, end)) for begin, end in spans]


def _utf8_len(text: str, chars: int) -> int:
    return len(text[:chars].encode("utf-8"))


class TextEncoder:
    """Encodes texts for one tokenizer; `fast_bpe=False` keeps to the tokenizer alone."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fast_bpe: bool = True) -> None:
        self.tokenizer = tokenizer
        self.fast_bpe = fast_bpe
        self.fast: FastBPE | None = None  # set by `prepare`

    def prepare(self, texts_to_come: int) -> None:
        """Use tiktoken from now on if it qualifies and `texts_to_come` is worth building it for. Call
        before forking workers, so that each does not build its own."""
        worth_it = self.fast_bpe and texts_to_come >= FAST_MIN_TEXTS and self._qualifies()
        self.fast = fast_bpe_for(self.tokenizer) if worth_it else None

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[Encoded]:
        fast = None if add_special_tokens else self.fast
        if fast is None:
            return self._encode_with_tokenizer(texts, add_special_tokens)
        out: list[Encoded | None] = [self._encode_fast(fast, text) for text in texts]
        left = [i for i, e in enumerate(out) if e is None]  # texts tiktoken must leave (not NFC)
        for i, encoded in zip(left, self._encode_with_tokenizer([texts[i] for i in left], False)):
            out[i] = encoded
        return out  # type: ignore[return-value]

    def _qualifies(self) -> bool:
        return self._backend_is_plain() and not self.tokenizer._tokenizer.encode_special_tokens

    @staticmethod
    def _encode_fast(fast: FastBPE, text: str) -> Encoded | None:
        ids = fast.encode(text)
        if ids is None:
            return None
        ends = list(accumulate(map(fast.token_bytes.__getitem__, ids)))
        return Encoded(ids, [0, *ends[:-1]] if ends else [], ends, in_bytes=True)

    def _backend_is_plain(self) -> bool:
        """A fast tokenizer with no truncation or padding set, whose `__call__` is its backend's encode."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        return (
            getattr(self.tokenizer, "is_fast", False)
            and backend is not None
            and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(self.tokenizer, "split_special_tokens", False))
        )

    def _encode_with_tokenizer(self, texts: list[str], add_special_tokens: bool) -> list[Encoded]:
        """Through the Rust backend directly when that is what `tokenizer(texts)` would call: the same
        ids and offsets without building a BatchEncoding (a tenth of the time on chat data)."""
        if not texts:
            return []
        if self._backend_is_plain():
            batch = self.tokenizer._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
            return [Encoded.from_offsets(e.ids, e.offsets) for e in batch]
        enc = self.tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return [Encoded.from_offsets(i, o) for i, o in zip(enc["input_ids"], enc["offset_mapping"])]
