"""Best-fit-decreasing packing and padding-free rows: several conversations per row, never mixed.

    sftkit train configs/tiny-cpu.yaml data.packing=true              # rows of up to data.max_length
    sftkit train configs/tiny-cpu.yaml data.padding_free=true         # one row per micro-batch
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

The label of each document's first token is -100: the last token of A must not learn to predict
the first token of B, exactly as in an unpacked batch where position 0 is never predicted.

Attention: transformers 5.23 detects packed rows from `position_ids` only when no attention mask
is passed AND no cache exists; the model's default `use_cache=True` makes a cache and silently
turns the detection off, so documents attend to each other. sftkit therefore never relies on the
detection: `sftkit.loss.model_inputs` passes an explicit 4-D block-diagonal mask built by
`block_causal_mask` (boolean for sdpa, additive for eager) and, for flash-attention kernels,
flattens the rows into one with explicit `cu_seq_lens`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

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
    """One row of whole documents; each document's first label is -100 (never predicted across)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for doc in documents:
        input_ids.extend(doc.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(doc.labels[1:])
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


def collate_documents(rows: Sequence[Sequence[Tokenized]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of whole documents -> a batch padded at the end of each row to the longest row.

    Keys: input_ids, labels (first token of every document -100), position_ids (restart per
    document, and again for the padding), document_ids (0, 1, ... per row; -1 on padding) and
    attention_mask (1 on real tokens, 0 on padding: for counting; the model gets
    `block_causal_mask(document_ids)` instead, see `sftkit.loss.model_inputs`).
    """
    widths = [sum(len(doc.input_ids) for doc in row) for row in rows]
    width = max(widths)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "document_ids": torch.full((len(rows), width), PAD_DOCUMENT, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for r, (row, used) in enumerate(zip(rows, widths)):
        lengths = [len(doc.input_ids) for doc in row]
        joined = concatenate(row)
        batch["input_ids"][r, :used] = torch.tensor(joined.input_ids, dtype=torch.long)
        batch["labels"][r, :used] = torch.tensor(joined.labels, dtype=torch.long)
        batch["position_ids"][r] = torch.tensor(position_ids(lengths + [width - used]), dtype=torch.long)
        batch["document_ids"][r, :used] = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(lengths))
        batch["attention_mask"][r, :used] = 1
    return batch


def block_causal_mask(document_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(batch, 1, length, length) mask: query i may attend to key j <= i of the same document.

    Boolean (True = attend) for sdpa; with `dtype`, additive (0 or the dtype's minimum) for eager
    attention, which adds the mask to the scores. Padding (-1) forms a document of its own, so
    every row of the mask has at least one True and no softmax is empty (no NaN).
    """
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    mask = (document_ids[:, :, None] == document_ids[:, None, :]) & causal
    mask = mask[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def sequence_lengths(document_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal document ids along the flattened rows (documents and padding)."""
    flat = document_ids.flatten()
    row_starts = torch.zeros_like(flat, dtype=torch.bool)
    row_starts[:: document_ids.shape[1]] = True
    starts = row_starts | torch.cat([flat.new_ones(1, dtype=torch.bool), flat[1:] != flat[:-1]])
    bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])])
    return bounds.diff().tolist()
