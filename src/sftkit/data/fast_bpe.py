"""tiktoken as a faster engine for byte-level BPE tokenizers (Qwen2, Qwen2.5, Qwen3, Llama-3), used
only where it gives the tokenizer's own ids.

    fast = fast_bpe_for(tokenizer)          # None when the tokenizer does not qualify
    ids = fast.encode(text)                 # None for a text it must leave to the tokenizer

Why this is written here rather than left to `tokenizers`: on chat data most of the Rust tokenizer's
time goes to its pre-tokenizer machinery (normalized strings that track every byte's alignment),
2.7 s of 3.0 s per 5,000 Qwen2.5 conversations. tiktoken runs the same split regex and the same
byte-pair merges about 4.5x faster on one core, and sftkit needs no alignments: labels come from
token byte lengths (`sftkit.data.encode`).

When tiktoken gives the same ids, checked once per tokenizer (`why_not_fast`):
  - the model is BPE over bytes: no byte fallback, no dropout, no subword affixes, all 256 bytes;
  - the pre-tokenizer is one regex Split (isolated) then ByteLevel without a regex of its own, and
    tiktoken is handed that regex;
  - no normalizer, or NFC: a text that is not already NFC is left to the tokenizer;
  - merges come in the order of the ids they make: tiktoken merges the adjacent pair whose
    concatenation has the lowest id, `tokenizers` the pair listed first;
  - every vocabulary token encodes to itself (tiktoken takes a piece found whole in the vocabulary
    as it is; `tokenizers` runs the merges unless `ignore_merges` is set);
  - added tokens are matched literally (no strip, single-word or normalised flags) and none is a
    prefix of another (tiktoken's alternation takes the first that matches, tokenizers the longest).
These are necessary, not sufficient: tiktoken also merges an adjacent pair whose concatenation is a
token but not a listed merge (Qwen2.5 lists one merge per token). So equality is measured as well: a
probe at construction, one text in `_AUDIT_EVERY` at run time against the tokenizer (a disagreement
stops with `FastBPEMismatch`, which says how to turn this off), and in the tests every shared
instruction file and every Unicode code point.
"""

from __future__ import annotations

import json
import unicodedata
import weakref
from typing import Any

from transformers import PreTrainedTokenizerBase

_AUDIT_EVERY = 32  # one text in this many is also encoded by the tokenizer and compared
_PROBE = (
    "Hello, world! It's 2024; we'll see. Don't STOP ſ'S  spaces   and\ttabs\n\n\r\nnew lines\u00a0"
    "naïve café 東京は日本の首都です。 Ελληνικά русский 😀👍🏽 ====---- 1234567 3.14159 "
    "def f(x):\n    return x ** 2  # comment\n<b>tag</b> ..."
)


class FastBPEMismatch(ValueError):
    """tiktoken and the tokenizer disagreed on a text: the fast path cannot be trusted for it."""


def why_not_fast(spec: dict[str, Any]) -> str | None:
    """Why tiktoken cannot stand in for this tokenizer (its tokenizer.json as a dict), or None."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"the model is {model.get('type')}, not BPE"
    if model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return "the BPE model uses byte fallback, dropout or subword affixes"
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        return f"the normalizer is {normalizer.get('type')}, not NFC"
    if split_regex(spec) is None:
        return "the pre-tokenizer is not one regex Split followed by ByteLevel"
    if not _byte_level_vocab(model):
        return "the vocabulary is not byte-level text with all 256 bytes"
    if not _merges_in_id_order(model):
        return "the merges are not in the order of the ids they make"
    for token in spec.get("added_tokens", []):
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word") or token.get("normalized"):
            return f"added token {token['content']!r} is not matched literally"
    contents = sorted(t["content"] for t in spec.get("added_tokens", []))
    for shorter, longer in zip(contents, contents[1:]):
        if not shorter or longer.startswith(shorter):
            return f"added token {shorter!r} is a prefix of {longer!r}"
    return None


def split_regex(spec: dict[str, Any]) -> str | None:
    """The regex of a `Sequence[Split(regex, isolated), ByteLevel(use_regex=False)]` pre-tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    return split.get("pattern", {}).get("Regex")


class FastBPE:
    """One tokenizer's vocabulary in tiktoken, audited against the tokenizer as it runs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: dict[str, Any]) -> None:
        import tiktoken  # imported here: only tokenizers that qualify need it

        self.backend = tokenizer._tokenizer
        self.nfc = spec.get("normalizer") is not None
        ranks = _mergeable_ranks(spec["model"])
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.encoding = tiktoken.Encoding(
            f"sftkit-{id(self)}", pat_str=split_regex(spec), mergeable_ranks=ranks, special_tokens=specials
        )
        size = max([*ranks.values(), *specials.values()]) + 1
        self.token_bytes = [0] * size  # UTF-8 length of each token, by id: labels come from these
        for piece, rank in ranks.items():
            self.token_bytes[rank] = len(piece)
        for content, token_id in specials.items():
            self.token_bytes[token_id] = len(content.encode("utf-8"))
        self.encoded = 0

    def encode(self, text: str) -> list[int] | None:
        """Token ids of `text` (no special tokens added), or None when the tokenizer must take it."""
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return None
        ids = self.encoding.encode(text, allowed_special="all")
        self.encoded += 1
        if self.encoded % _AUDIT_EVERY == 1:
            self.audit(text, ids)
        return ids

    def audit(self, text: str, ids: list[int]) -> None:
        expected = self.backend.encode(text, add_special_tokens=False).ids
        if ids != expected:
            at = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
            raise FastBPEMismatch(
                f"tiktoken and the tokenizer disagree at token {at} of {text[:60]!r}...: "
                f"{ids[at : at + 4]} vs {expected[at : at + 4]}; set data.fast_bpe: false (Renderer(fast_bpe=False)) "
                "to tokenize with the tokenizer alone, and please report the text"
            )


def _mergeable_ranks(model: dict[str, Any]) -> dict[bytes, int]:
    """tiktoken's ranks: each token's bytes -> its id."""
    to_latin1 = {ord(char): byte for char, byte in _byte_of_char().items()}  # then one byte per character
    return {token.translate(to_latin1).encode("latin-1"): token_id for token, token_id in model["vocab"].items()}


def _byte_of_char() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import (
        bytes_to_unicode,  # ByteLevel's byte <-> character map
    )

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _byte_level_vocab(model: dict[str, Any]) -> bool:
    vocab = model.get("vocab") or {}
    chars = set(_byte_of_char())
    return set("".join(vocab)) <= chars and chars <= set(vocab)


def _merges_in_id_order(model: dict[str, Any]) -> bool:
    vocab, last = model["vocab"], -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made = vocab.get(left + right)
        if made is None or made < last:
            return False
        last = made
    return True


def _tokens_encode_to_themselves(tokenizer: PreTrainedTokenizerBase, model: dict[str, Any]) -> bool:
    if model.get("ignore_merges"):
        return True  # tokenizers takes a word found whole in the vocabulary, as tiktoken does
    bpe = tokenizer._tokenizer.model
    return all(len(bpe.tokenize(token)) == 1 for token in model["vocab"])


# tokenizer -> (its size when built, its engine): adding tokens to a tokenizer builds a new one
_built: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, FastBPE | None]] = weakref.WeakKeyDictionary()


def fast_bpe_for(tokenizer: PreTrainedTokenizerBase) -> FastBPE | None:
    """The tiktoken engine for `tokenizer`, built once per tokenizer object; None if it does not qualify."""
    size, fast = _built.get(tokenizer, (-1, None))
    if size != len(tokenizer):
        size, fast = len(tokenizer), _build(tokenizer)
        _built[tokenizer] = (size, fast)
    return fast


def _build(tokenizer: PreTrainedTokenizerBase) -> FastBPE | None:
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        return None
    spec = json.loads(backend.to_str())
    if why_not_fast(spec) is not None or not _tokens_encode_to_themselves(tokenizer, spec["model"]):
        return None
    try:
        fast = FastBPE(tokenizer, spec)
        fast.audit(_PROBE, fast.encoding.encode(_PROBE, allowed_special="all"))
    except ValueError:  # tiktoken refused the tables (e.g. an id given to two tokens), or the probe disagreed
        return None
    return fast
