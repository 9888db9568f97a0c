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
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sftkit.config import ConfigError, DataConfig
from sftkit.data.formats import LoadReport
from sftkit.data.mixing import MixSpec, mix_with_report
from sftkit.data.messages import Conversation, DataError, Record
from sftkit.data.pipeline import load_all
from sftkit.data.render import IGNORE_INDEX, RenderReport, Renderer, Tokenized, render_records

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
    if all(spec == MixSpec() for _, spec in sources):
        return train_records
    held = {id(r) for r in eval_records}
    parts = [([r for r in load.records if id(r) not in held], spec) for (_, spec), load in zip(sources, loads)]
    mixed, report = mix_with_report(parts, seed=seed)
    print(report.summary())
    return mixed


def load_splits(config: DataConfig, renderer: Renderer, seed: int) -> tuple[Split, Split]:
    """(train, eval) from `data.train` plus `data.eval` or `data.eval_fraction`."""
    read = {"format": config.format, "columns": config.columns, "skip_invalid": config.skip_invalid}
    records, loads = load_all(config.paths(), **read)
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
        raise DataError(", ".join(config.paths()), f"no usable training examples ({reasons})", "data.train")
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


def window(n: int, step: int, *, batch_size: int, grad_accum: int, seed: int) -> tuple[int, list[list[int]]]:
    """(epoch, micro-batches of example indices) used by optimizer step `step` (0-based)."""
    epoch, position = divmod(step, steps_per_epoch(n, batch_size, grad_accum))
    order = epoch_order(n, seed, epoch)
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
