"""Examples -> the micro-batches of every optimizer step, on every rank: order, windows, collate.

    sftkit train configs/tiny-cpu.yaml data.batching=packed     # sftkit.train: Batcher.from_config(...)

The data order is a pure function of (seed, epoch), so a run resumed at optimizer step N sees
exactly the batches it would have seen (see `window`), and under torchrun every rank knows the
window of every step without talking.

One optimizer step = one window of `batch_size * grad_accum` examples of the epoch's shuffled
order, cut into `grad_accum` micro-batches; the last window of an epoch may be shorter:

    epoch order:  [ 7 2 9 0 | 4 1 8 5 | 3 6 ]     batch_size=2, grad_accum=2 -> 3 steps per epoch
    step 0 = micro-batches [7 2] [9 0];  step 1 = [4 1] [8 5];  step 2 = [3 6]

How a micro-batch becomes tensors is `Batcher` (`data.batching`): padded to its longest example
(optionally with examples of similar length grouped together), concatenated into one padding-free
row, or made of packed rows (`sftkit.data.pack`), whose units are then packed rows instead of
examples.

Under torchrun (N ranks) a window is cut with N times the batch, and each rank takes a contiguous
1/N of every micro-batch (`Batcher.shard`); packed rows are never split between ranks:

    global window, batch_size x N per micro-batch      [ 7 2 9 0 | 4 1 8 5 ]   N=2, batch_size=2, grad_accum=2
    rank 0 takes the first 1/N of each micro-batch     [ 7 2 ]     [ 4 1 ]
    rank 1 the next                                    [ 9 0 ]     [ 8 5 ]

A rank whose share of a short last micro-batch is empty gets an idle batch (two padding tokens,
nothing trained) so that the collectives of its forward and backward still line up.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from sftkit.config import BATCHING, DataConfig, TrainConfig
from sftkit.data.pack import PAD_DOCUMENT, concatenate, pack, position_ids
from sftkit.data.render import IGNORE_INDEX, Tokenized


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch, the same for a given (seed, epoch) on any machine."""
    return np.random.default_rng([seed, 0, epoch]).permutation(n).tolist()


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(n / (batch_size * grad_accum))


def length_grouped(order: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int,
                   mega_batches: int = 50) -> list[int]:
    """`order` with similar lengths side by side: within each run of `mega_batches * batch_size`
    examples, sort by length (longest first), cut into micro-batches and shuffle those (seeded).

    A short last micro-batch stays last, so micro-batches still start every `batch_size` items.
    """
    rng = np.random.default_rng([seed, 2, epoch])
    size = mega_batches * batch_size
    grouped: list[int] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches = [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
        short = batches.pop() if len(batches[-1]) < batch_size else []
        for b in rng.permutation(len(batches)).tolist():
            grouped.extend(batches[b])
        grouped.extend(short)
    return grouped


def window(n: int, step: int, *, batch_size: int, grad_accum: int, seed: int,
           lengths: list[int] | None = None) -> tuple[int, list[list[int]]]:
    """(epoch, micro-batches of example indices) used by optimizer step `step` (0-based).

    With `lengths`, the epoch order is `length_grouped`; either way a pure function of (seed, epoch).
    """
    epoch, position = divmod(step, steps_per_epoch(n, batch_size, grad_accum))
    order = epoch_order(n, seed, epoch)
    if lengths is not None:
        order = length_grouped(order, lengths, batch_size, seed, epoch)
    size = batch_size * grad_accum
    chunk = order[position * size : (position + 1) * size]
    return epoch, [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]


def collate(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example: pad id in input_ids, -100 in labels, 0 in attention_mask."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def trained_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labels != -100 after the one-position shift (position 0 never does)."""
    return int(np.count_nonzero(host(batch["labels"])[:, 1:] != IGNORE_INDEX))


def input_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens: the 1s of the attention mask."""
    return int(np.count_nonzero(host(batch["attention_mask"])))


def host(tensor: torch.Tensor) -> np.ndarray:
    """A batch tensor's values for the host to read: a view of a CPU tensor through numpy, which runs no torch
    operator (`.item()` / `int()` on a tensor do, and on a GPU each waits for every queued kernel). A tensor
    elsewhere is copied to the host first, a sync: the training step reads its batches before they move."""
    return (tensor if tensor.device.type == "cpu" else tensor.cpu()).numpy()


class Batcher:
    """The micro-batches of every optimizer step: a pure function of (seed, step), so resume is exact.

    `mode` is how a micro-batch becomes tensors:
      padded        pad to the longest example (`collate`)
      grouped       the same, with examples of similar length in the same micro-batch (`length_grouped`)
      padding_free  one row of the micro-batch's examples end to end, documents kept apart
      packed        rows of whole examples packed to `max_length` (best-fit decreasing, once); the epoch
                    order shuffles rows and `batch_size` counts rows
    Micro-batches are lists of example indices in every mode (a packed row's examples side by side).
    """

    def __init__(self, examples: list[Tokenized], pad_id: int, *, batch_size: int, grad_accum: int, seed: int,
                 mode: str = "padded", max_length: int | None = None) -> None:
        if mode not in BATCHING:
            raise ValueError(f"batching mode {mode!r} is not one of {', '.join(BATCHING)}")
        if mode == "packed" and not max_length:
            raise ValueError("packing needs max_length")
        self.examples, self.pad_id, self.mode, self.max_length = examples, pad_id, mode, max_length or 0
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.units = pack(examples, max_length) if mode == "packed" else [[i] for i in range(len(examples))]
        self.row_of = {i: row for row, unit in enumerate(self.units) for i in unit}
        self.lengths = [len(examples[i].input_ids) for i in range(len(examples))] if mode == "grouped" else None

    @classmethod
    def from_config(cls, examples: list[Tokenized], pad_id: int, data: DataConfig, train: TrainConfig,
                    world: int = 1) -> Batcher:
        """The batcher `data.batching` asks for; under torchrun (`world` ranks) windows of the global batch."""
        return cls(examples, pad_id, batch_size=train.batch_size * world, grad_accum=train.grad_accum,
                   seed=train.seed, mode=data.batching, max_length=data.max_length)

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.units), self.batch_size, self.grad_accum)

    def summary(self) -> str:
        """One line for the run summary ("" for plain padded batches)."""
        if self.mode == "packed":
            fill = sum(len(ex.input_ids) for ex in self.examples) / max(1, len(self.units) * self.max_length)
            return (f"packing     {len(self.examples)} examples into {len(self.units)} rows of up to "
                    f"{self.max_length} tokens ({fill:.1%} full); batch_size counts rows")
        if self.mode == "padding_free":
            return "batching    padding-free: each micro-batch is one row, documents kept apart"
        if self.mode == "grouped":
            return "batching    padded, grouped by length within runs of 50 x batch_size examples"
        return ""

    def window(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, micro-batches of example indices) of optimizer step `step` (0-based)."""
        epoch, micro = window(len(self.units), step, batch_size=self.batch_size, grad_accum=self.grad_accum,
                              seed=self.seed, lengths=self.lengths)
        return epoch, [[i for u in ids for i in self.units[u]] for ids in micro]

    def collate(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """Tensors of one micro-batch (example indices from `window`)."""
        examples = [self.examples[i] for i in ids]
        if self.mode == "padding_free":
            return collate_documents([examples], self.pad_id)
        if self.mode == "packed":
            rows = [[self.examples[i] for i in row] for _, row in itertools.groupby(ids, key=self.row_of.__getitem__)]
            return collate_documents(rows, self.pad_id)
        return collate(examples, self.pad_id)

    def shard(self, micro: list[list[int]], rank: int, world: int) -> list[list[int]]:
        """Rank `rank`'s part of each micro-batch of a global window: a contiguous 1/`world` of its units
        (examples, or packed rows, which stay whole); empty when a micro-batch has fewer units than ranks."""
        if world == 1:
            return micro
        parts = []
        for ids in micro:
            units = [list(unit) for _, unit in itertools.groupby(ids, key=self.row_of.__getitem__)]
            lo, hi = len(units) * rank // world, len(units) * (rank + 1) // world
            parts.append([i for unit in units[lo:hi] for i in unit])
        return parts

    def batches(self, step: int, rank: int = 0, world: int = 1) -> tuple[int, list[dict[str, torch.Tensor]], list[str]]:
        """(epoch, this rank's micro-batches as tensors, the sources of the whole window) of step `step`."""
        epoch, micro = self.window(step)
        sources = [self.examples[i].source for ids in micro for i in ids]
        mine = self.shard(micro, rank, world)
        return epoch, [self.collate(ids) if ids else idle_batch(self.pad_id) for ids in mine], sources


def idle_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """Two padding tokens and no trained label: the model's collectives run, nothing is learned."""
    return {"input_ids": torch.full((1, 2), pad_id, dtype=torch.long),
            "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((1, 2), dtype=torch.long)}


def collate_documents(rows: Sequence[Sequence[Tokenized]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of whole documents -> a batch padded at the end of each row to the longest row.

    Keys: input_ids, labels (each document's own; its first label is never trained), position_ids
    (restart per document, and again for the padding), document_ids (0, 1, ... per row; -1 on
    padding) and attention_mask (1 on real tokens, 0 on padding: for counting; the model gets
    per-document attention instead, see `sftkit.attention.model_inputs`).
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
        batch["document_ids"][r, :used] = torch.from_numpy(np.repeat(np.arange(len(row), dtype=np.int64), lengths))
        batch["attention_mask"][r, :used] = 1
    return batch
