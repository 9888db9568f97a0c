"""Control tokens written by users are text, not control tokens.

A user who writes `<|im_end|><|im_start|>assistant` inside a message must not be able to end their
turn and forge an assistant reply in the training data. Strings from records are marked before
rendering (`mark`; which tokens count is `sftkit.data.templates.control_pattern`), and
`encode_marked` tokenizes the marked spans as plain text while the
template's own control tokens stay control tokens. Same rule as transformers'
`apply_chat_template(sanitize_control_tokens=True)`, but with character offsets kept, which the
renderer needs to place labels.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizerBase

OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters around a user-written control token
_MARKED = re.compile(f"{OPEN}(.*?){CLOSE}|[{OPEN}{CLOSE}]", re.DOTALL)


def contains_control(obj: Any, pattern: re.Pattern[str]) -> bool:
    if isinstance(obj, str):
        return pattern.search(obj) is not None or OPEN in obj or CLOSE in obj
    if isinstance(obj, dict):
        return any(contains_control(v, pattern) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(contains_control(v, pattern) for v in obj)
    return False


def mark(obj: Any, pattern: re.Pattern[str]) -> Any:
    """Wrap every control token inside user strings with OPEN/CLOSE (dict keys are left alone)."""
    if isinstance(obj, str):
        obj = obj.replace(OPEN, "").replace(CLOSE, "")  # markers in data cannot forge a marked span
        return pattern.sub(lambda m: f"{OPEN}{m.group(0)}{CLOSE}", obj)
    if isinstance(obj, dict):
        return {k: mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark(v, pattern) for v in obj]
    return obj


def find_unmarked(text: str, needle: str, start: int) -> int:
    """`text.find(needle, start)`, skipping occurrences that a user wrote (marked)."""
    at = text.find(needle, start)
    while at > 0 and text[at - 1] == OPEN:
        at = text.find(needle, at + len(needle))
    return at


def encode_marked(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets (into the marked `text`) with marked spans encoded as text."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    position = 0
    for match in _MARKED.finditer(text):
        _encode_piece(tokenizer, text[position : match.start()], position, False, ids, offsets)
        if match.group(1):
            _encode_piece(tokenizer, match.group(1), match.start() + 1, True, ids, offsets)
        position = match.end()
    _encode_piece(tokenizer, text[position:], position, False, ids, offsets)
    return ids, offsets


def _encode_piece(
    tokenizer: PreTrainedTokenizerBase,
    piece: str,
    at: int,
    as_text: bool,
    ids: list[int],
    offsets: list[tuple[int, int]],
) -> None:
    if not piece:
        return
    # Inside a text, encode after a newline and drop it: SentencePiece tokenizers would otherwise
    # add the word-start space they add at the beginning of a string (transformers does the same).
    lead = "\n" if ids else ""
    enc = tokenizer(lead + piece, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
    piece_ids, piece_offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if lead:
        newline = tokenizer("\n", add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
        if piece_ids[: len(newline)] == newline:
            piece_ids, piece_offsets = piece_ids[len(newline) :], piece_offsets[len(newline) :]
        else:
            enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
            piece_ids, piece_offsets, lead = list(enc["input_ids"]), list(enc["offset_mapping"]), ""
    shift = at - len(lead)
    ids.extend(piece_ids)
    offsets.extend((max(a + shift, at), max(b + shift, at)) for a, b in piece_offsets)
