"""Best-fit-decreasing packing and padding-free rows: several conversations per row, never mixed.

    sftkit train configs/tiny-cpu.yaml data.batching=packed           # rows of up to data.max_length
    sftkit train configs/tiny-cpu.yaml data.batching=padding_free     # one row per micro-batch
    sftkit data preview --tokenizer DIR --data FILE --max-length 512 --pack --json

Packing puts whole conversations (never split, never cropped) into rows of at most `max_length`
tokens, longest first, each into the row it fills best; padding goes only at the end of a row.
`position_ids` restart at 0 for every document, and attention is block-diagonal causal, so no
token ever sees another document:

    examples (tokens)   A=5  B=3  C=4  D=2        max_length = 8
    longest first       A(5) C(4) B(3) D(2)
    best fit            row 0: A A A A A B B B     A, then B fills the 3 left exactly
                        row 1: C C C C D D . .     . = padding, only at the end of a row
    position_ids        row 0: 0 1 2 3 4 0 1 2
                        row 1: 0 1 2 3 0 1 0 1     (padding counts as a document of its own)

    attention of row 1 (x = may attend)
              C C C C D D . .
           C  x
           C  x x
           C  x x x
           C  x x x x
           D          x
           D          x x
           .              x
           .              x x

The label of each document's first token is -100, as `sftkit.data.render` makes every example:
the last token of A never learns to predict the first token of B, exactly as in an unpacked batch
where position 0 is never predicted. Packing only places documents; it never changes a label.

How the model is kept from looking across documents is `sftkit.attention` (`model_inputs`); the
tensors of a batch of rows are `sftkit.data.batches.collate_documents`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from sftkit.data.render import IGNORE_INDEX, Tokenized

PAD_DOCUMENT = -1  # document id of padding tokens


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= `capacity`, longest item first.

    Each item goes into the open bin with the least room that still fits it (ties: the oldest
    bin), else a new bin. Deterministic; an item longer than `capacity` is an error, never cut.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than {capacity} tokens (first: index {too_long[0]})")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            free, index = capacity - lengths[i], len(bins) - 1
        else:
            free, index = room.pop(at)
            bins[index].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, index))
    return bins


def position_ids(lengths: Sequence[int]) -> list[int]:
    """0, 1, ... restarting at every document: [3, 2] -> [0, 1, 2, 0, 1]."""
    return [p for n in lengths for p in range(n)]


def concatenate(documents: Sequence[Tokenized], source: str = "packed") -> Tokenized:
    """One row of whole documents, ids and labels as rendered (a document's first label is never trained)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for doc in documents:
        if doc.labels and doc.labels[0] != IGNORE_INDEX:
            raise ValueError(f"{doc.source}: its first token is trained; labels come from sftkit.data.render, "
                             "which never trains position 0 (nothing before it predicts it)")
        input_ids.extend(doc.input_ids)
        labels.extend(doc.labels)
    return Tokenized(input_ids, labels, source)


def pack(examples: Sequence[Tokenized], max_length: int) -> list[list[int]]:
    """Example indices of each packed row (best-fit decreasing on token lengths)."""
    return best_fit_decreasing([len(ex.input_ids) for ex in examples], max_length)


def packed_rows(examples: Sequence[Tokenized], max_length: int) -> tuple[list[Tokenized], list[list[int]]]:
    """(packed rows, their position_ids): what `sftkit data preview --pack` shows, unpadded."""
    rows, positions = [], []
    for r, indices in enumerate(pack(examples, max_length)):
        documents = [examples[i] for i in indices]
        rows.append(concatenate(documents, f"row {r}: " + " + ".join(doc.source for doc in documents)))
        positions.append(position_ids([len(doc.input_ids) for doc in documents]))
    return rows, positions
