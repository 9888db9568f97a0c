"""Training data glue: files -> records -> (input_ids, labels) examples -> padded batches.

    sftkit train configs/tiny-cpu.yaml      # sftkit.train.setup_data() calls load_splits()

Reading is `sftkit.data.formats`, masking is `sftkit.data.render`; this module only strings them
together, holds out the eval split, orders the examples and pads batches. The data order is a pure
function of (seed, epoch), so a run resumed at optimizer step N sees exactly the batches it would
have seen (see `window`).

One optimizer step = one window of `batch_size * grad_accum` examples of the epoch's shuffled
order, cut into `grad_accum` micro-batches; the last window of an epoch may be shorter:

    epoch order:  [ 7 2 9 0 | 4 1 8 5 | 3 6 ]     batch_size=2, grad_accum=2 -> 3 steps per epoch
    step 0 = micro-batches [7 2] [9 0];  step 1 = [4 1] [8 5];  step 2 = [3 6]

How a micro-batch becomes tensors is `Batcher` (`data.packing`, `data.padding_free`,
`data.group_by_length`): padded to its longest example (optionally with examples of similar length
grouped together), concatenated into one padding-free row, or made of packed rows
(`sftkit.data.pack`), whose units are then packed rows instead of examples.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sftkit.config import ConfigError, DataConfig, TrainConfig
from sftkit.data.formats import LoadReport
from sftkit.data.mixing import mix_with_report
from sftkit.data.pack import collate_documents, pack
from sftkit.data.messages import Conversation, DataError, Record
from sftkit.data.pipeline import load_all
from sftkit.data.render import IGNORE_INDEX, Renderer, Tokenized
from sftkit.data.render_all import RenderReport, render_records

@dataclass
class Split:
    """Rendered examples of one split, the records they came from, and what was left out and why."""

    records: list[Record]
    report: RenderReport
    loads: list[LoadReport] = field(default_factory=list)

    @property
    def examples(self) -> list[Tokenized]:
        return self.report.examples

    def left_out(self) -> Counter[str]:
        """Reason -> count for records skipped while reading or rendering, and examples dropped."""
        reasons: Counter[str] = Counter()
        for load in self.loads:
            reasons.update({f"invalid ({kind})": n for kind, n in load.skipped.items()})
            reasons.update({f"dropped ({kind})": n for kind, n in load.dropped.items()})
        reasons.update({f"invalid ({kind})": n for kind, n in self.report.skipped.items()})
        reasons.update({f"dropped ({kind})": n for kind, n in self.report.dropped.items()})
        return reasons


def hold_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, eval): a seeded random `fraction` of the records (at least one) becomes eval."""
    if not fraction:
        return records, []
    n_eval = max(1, round(fraction * len(records)))
    if n_eval >= len(records):
        raise ConfigError(f"data.eval_fraction: {fraction} of {len(records)} records leaves nothing to train on")
    held = set(np.random.default_rng([seed, 1]).permutation(len(records))[:n_eval].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def mix_sources(
    train_records: list[Record], eval_records: list[Record], loads: list[LoadReport], config: DataConfig, seed: int
) -> list[Record]:
    """Apply the `{path, weight|samples}` entries of `data.train`; plain paths are taken as they are."""
    sources = config.sources()
    if not any(source.mixed for source in sources):
        return train_records
    held = {id(r) for r in eval_records}
    parts = [([r for r in load.records if id(r) not in held], source) for source, load in zip(sources, loads)]
    mixed, report = mix_with_report(parts, seed=seed)
    print(report.summary())
    return mixed


def load_splits(config: DataConfig, renderer: Renderer, seed: int) -> tuple[Split, Split]:
    """(train, eval) from `data.train` plus `data.eval` or `data.eval_fraction`."""
    read = {"format": config.format, "columns": config.columns, "skip_invalid": config.skip_invalid}
    records, loads = load_all([s.path for s in config.sources()], **read)
    train_records, eval_records = hold_out(records, config.eval_fraction, seed)  # before mixing: no leaks
    train_records = mix_sources(train_records, eval_records, loads, config, seed)
    eval_loads: list[LoadReport] = []
    if config.eval:
        eval_records, eval_loads = load_all([config.eval], **read)
    render = {"on_error": "skip" if config.skip_invalid else "raise", "progress": len(records) > 5000}
    train = Split(train_records, render_records(train_records, renderer, **render), loads)
    evaluation = Split(eval_records, render_records(eval_records, renderer, **render), eval_loads)
    if not train.examples:
        reasons = dict(train.left_out()) or "no records"
        raise DataError(", ".join(s.path for s in config.sources()), f"no usable training examples ({reasons})", "data.train")
    return train, evaluation


def prompt_of(record: Record) -> list[dict[str, Any]] | None:
    """The messages before the record's last assistant reply (the sample prompt), if it has one."""
    if not isinstance(record, Conversation):
        return None
    roles = [m.role for m in record.messages]
    if "assistant" not in roles:
        return None
    last = len(roles) - 1 - roles[::-1].index("assistant")
    return record.as_template_dicts()[:last] or None


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
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


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

    MODES = ("padded", "grouped", "padding_free", "packed")

    def __init__(self, examples: list[Tokenized], pad_id: int, *, batch_size: int, grad_accum: int, seed: int,
                 mode: str = "padded", max_length: int | None = None) -> None:
        if mode not in self.MODES:
            raise ValueError(f"batching mode {mode!r} is not one of {', '.join(self.MODES)}")
        if mode == "packed" and not max_length:
            raise ValueError("packing needs max_length")
        self.examples, self.pad_id, self.mode, self.max_length = examples, pad_id, mode, max_length or 0
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.units = pack(examples, max_length) if mode == "packed" else [[i] for i in range(len(examples))]
        self.row_of = {i: row for row, unit in enumerate(self.units) for i in unit}
        self.lengths = [len(examples[i].input_ids) for i in range(len(examples))] if mode == "grouped" else None

    @classmethod
    def from_config(cls, examples: list[Tokenized], pad_id: int, data: DataConfig, train: TrainConfig) -> Batcher:
        """The batcher `data.packing` / `data.padding_free` / `data.group_by_length` ask for."""
        return cls(examples, pad_id, batch_size=train.batch_size, grad_accum=train.grad_accum, seed=train.seed,
                   mode=data.batching, max_length=data.max_length)

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
