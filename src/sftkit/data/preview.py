"""See data as the model will: trained tokens in one colour, masked ones in another.

    sftkit data preview RECIPE.yaml [key=value ...]              # exactly what `sftkit train RECIPE.yaml` trains
    sftkit data preview --tokenizer ../shared/data/tokenizers/qwen2.5 --data FILE
    sftkit data preview --tokenizer DIR --data FILE --json      # {"input_ids": [...], "labels": [...]} per line

Both forms make a `DataConfig` and call `sftkit.data.load.load_data`, the entry training uses:
same template, template_kwargs, strategy, turns, reasoning, max_length, eval hold-out and mixing. Under
`data.turns=per_turn` each assistant turn is its own example ("FILE:LINE turn 2/4"); the summary says
which turns policy applies and why, and what repeating the prompts costs. With packed
batches (`data.batching=packed`, or `--pack`) the rows are shown packed, with `position_ids`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TextIO

from transformers import PreTrainedTokenizerBase

from sftkit.config import DataConfig
from sftkit.data.load import load_data
from sftkit.data.pack import packed_rows
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


def preview(config: DataConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, split: str = "train",
            as_json: bool = False, limit: int = 3, colour: bool = False, added: list[str] | None = None,
            out: TextIO, info: TextIO) -> None:
    """Print the examples of `split` that training on `config` makes (`tokenizer` carries the template):
    JSON lines in order, or the first `limit` coloured; then what was read, kept and left out (to `info`)."""
    train, evaluation = load_data(config, tokenizer, seed, progress=False)
    chosen = train if split == "train" else evaluation
    examples, positions = chosen.examples, [None] * len(chosen.examples)
    if config.batching == "packed":
        examples, positions = packed_rows(chosen.examples, config.max_length)
    if as_json:
        for example, position_ids in zip(examples, positions):
            write_json(example, out, position_ids=position_ids)
    else:
        for example in examples[:limit]:
            print_example(example, tokenizer, out, colour)
        if added:
            out.write(f"template added {len(added)} special tokens: {' '.join(added)}\n")
    info.write(chosen.summary() + "\n")
