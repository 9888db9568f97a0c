"""See data as the model will: trained tokens in one colour, masked ones in another.

    sftkit data preview --tokenizer ../shared/data/tokenizers/qwen2.5 --data FILE
    sftkit data preview --tokenizer DIR --data FILE --json      # {"input_ids": [...], "labels": [...]} per line
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TextIO

from transformers import PreTrainedTokenizerBase

from sftkit.data.render import IGNORE_INDEX, Tokenized

TRAINED = "\033[1;32m"  # bold green: tokens that carry loss
MASKED = "\033[2;37m"  # dim grey: context only
RESET = "\033[0m"


def label_runs(example: Tokenized) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs `(start, end, trained)` of tokens with the same trained/masked state."""
    start = 0
    for j in range(1, len(example.labels) + 1):
        at_end = j == len(example.labels)
        if at_end or (example.labels[j] != IGNORE_INDEX) != (example.labels[start] != IGNORE_INDEX):
            yield start, j, example.labels[start] != IGNORE_INDEX
            start = j


def coloured(example: Tokenized, tokenizer: PreTrainedTokenizerBase, colour: bool = True) -> str:
    """The example's text with trained runs highlighted (or wrapped in [[ ]] without colour).

    Runs are decoded as differences of growing prefixes so SentencePiece word-start spaces survive.
    """
    pieces, decoded_so_far = [], ""
    for start, end, trained in label_runs(example):
        text = tokenizer.decode(example.input_ids[:end], skip_special_tokens=False)
        piece, decoded_so_far = text[len(decoded_so_far) :], text
        if colour:
            pieces.append(f"{TRAINED if trained else MASKED}{piece}{RESET}")
        else:
            pieces.append(f"[[{piece}]]" if trained else piece)
    return "".join(pieces)


def print_example(example: Tokenized, tokenizer: PreTrainedTokenizerBase, out: TextIO, colour: bool) -> None:
    out.write(f"── {example.source}: {len(example.input_ids)} tokens, {example.num_trained} trained\n")
    out.write(coloured(example, tokenizer, colour) + "\n")


def write_json(example: Tokenized, out: TextIO, position_ids: list[int] | None = None) -> None:
    row: dict[str, list[int]] = {"input_ids": example.input_ids, "labels": example.labels}
    if position_ids is not None:
        row["position_ids"] = position_ids
    out.write(json.dumps(row, separators=(",", ":")) + "\n")
