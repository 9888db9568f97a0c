"""Records streamed from the files into the token cache: a cache miss in memory that does not grow with the data.

    sftkit train recipe.yaml      # data.cache on (the default), nothing stored for these inputs:
                                  # load.stream_data counts, plans, then renders chunk by chunk with this

`load.render_data` holds every record and every rendered example (~11 KB a conversation: 11 GB at a
million). The streamed path reads the files twice and holds one chunk of records at a time:

1. `count_records`: every record parsed and checked, neither rendered nor kept, so that hold-out and
   mixing can choose among the count, and reading errors surface before any rendering, as in
   `render_data`.
2. `Plan`: how many copies of each record (numbered in file order, across the sources) the train
   split takes (0: held out for eval, or not picked by the mix), chosen by the same functions as
   `render_data` (`load.held_out`, `mixing.picks`) over the same numbering.
3. `planned_records` reads the files again and yields each record as many times as the plan says;
   `render_into` renders them in chunks and appends each chunk's examples to a `store.Writer`.

The result is the same splits, in the same order, with the same counters as `render_data`'s: a mixed
source's picks are in file order with copies adjacent, which is the order of a second reading.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sftkit.config import DataConfig, Source
from sftkit.data import store
from sftkit.data.formats import LoadReport, stream_records
from sftkit.data.messages import Conversation, DataError, Problems, Record
from sftkit.data.mixing import MixReport, SourceCount, picks, source_name
from sftkit.data.render import Renderer
from sftkit.data.render_all import RenderReport, render_stream

CHUNK = 256  # records rendered and written at a time
HEAD = 64  # records kept from the start of a split: its sample prompts come from them


def _stream(path: str | Path, config: DataConfig) -> tuple[LoadReport, Iterator[Record]]:
    return stream_records(path, format=config.format, columns=config.columns,
                          on_error="skip" if config.skip_invalid else "raise")


def count_records(paths: Sequence[str | Path], config: DataConfig) -> tuple[list[LoadReport], Conversation | None]:
    """Each file's `LoadReport` (records counted, not kept) and the first conversation met, if any (the
    missing-template check names it)."""
    loads, chat = [], None
    for path in paths:
        load, records = _stream(path, config)
        for record in records:
            if chat is None and isinstance(record, Conversation):
                chat = record
        loads.append(load)
    return loads, chat


@dataclass
class Plan:
    """Which records each split takes, by number (file order, across the train sources)."""

    sizes: list[int]  # records per train source
    held: np.ndarray  # bool per record: held out for eval
    copies: np.ndarray  # int32 per record: how many times the train split takes it
    mixed: list[tuple[int, int, int]] = field(default_factory=list)  # per source: available, taken, distinct

    @classmethod
    def make(cls, sizes: list[int], held: np.ndarray, specs: Sequence[Source], seed: int) -> Plan:
        """Every record not held out, once; or, when `data.train` mixes, each source's picks among those."""
        plan = cls(sizes, held, (~held).astype(np.int32))
        if not any(spec.mixed for spec in specs):
            return plan
        kept = [np.flatnonzero(~held[start:start + size]) + start for start, size in zip(plan.starts, sizes)]
        for indices, chosen in zip(kept, picks([len(k) for k in kept], specs, seed)):
            copies = np.bincount(np.asarray(chosen, dtype=np.int64), minlength=len(indices))
            plan.copies[indices] = copies
            plan.mixed.append((len(indices), len(chosen), int(np.count_nonzero(copies))))
        return plan

    @property
    def starts(self) -> list[int]:
        return [int(start) for start in np.cumsum([0, *self.sizes[:-1]])] if self.sizes else []

    def mixing(self, first_kept: Sequence[str | None]) -> str:
        """`mixing.MixReport.summary` of the mix, "" when nothing is mixed; each source named by its
        first record not held out, as `mix_with_report` names it."""
        if not self.mixed:
            return ""
        return MixReport([SourceCount(source_name(first, position), *counts)
                          for position, (first, counts) in enumerate(zip(first_kept, self.mixed))]).summary()


def planned_records(paths: Sequence[str | Path], config: DataConfig, take: np.ndarray,
                    first_kept: list[str | None] | None = None, held: np.ndarray | None = None) -> Iterator[Record]:
    """The records of `paths` read again, each yielded `take[number]` times (copies adjacent). When
    given, `first_kept` (a slot per path) gets the source of each path's first record not `held`."""
    number = 0
    for position, path in enumerate(paths):
        _, records = _stream(path, config)
        for record in records:
            if number == len(take):
                raise _changed(paths, len(take), "more")
            if first_kept is not None and held is not None and first_kept[position] is None and not held[number]:
                first_kept[position] = record.source
            copies = int(take[number])
            number += 1
            for _ in range(copies):
                yield record
    if number != len(take):
        raise _changed(paths, len(take), str(number))


def _changed(paths: Sequence[str | Path], counted: int, read: str) -> DataError:
    """A file written to between the two readings: the plan numbered other records, so nothing rendered
    from it may be stored (the error ends the render before its commit)."""
    return DataError(", ".join(map(str, paths)), f"changed while it was read: {counted} records counted, then {read}",
                     hint="run again once the files are written")


def render_into(writer: store.Writer, records: Iterable[Record], count: int, renderer: Renderer, *,
                where: str, on_error: str, num_proc: int, progress: bool) -> tuple[RenderReport, list[Record]]:
    """Render `count` records chunk by chunk into `writer`: the report (counters only: the examples are
    on disk) and the first `HEAD` records. Invalid records raise here, as `render_records` raises them."""
    report = RenderReport(examples=[], problems=Problems(on_error == "skip"), turns=renderer.turns_note)
    renderer.encoder.prepare(count)  # as render_records: tiktoken for large sets, built before any fork
    records = iter(records)
    head: list[Record] = []

    def chunks() -> Iterator[list[Record]]:
        while chunk := list(islice(records, CHUNK)):
            if len(head) < HEAD:
                head.extend(chunk[:HEAD - len(head)])
            yield chunk

    with tqdm(total=count, desc="render", unit="ex", disable=not progress) as bar:
        for examples in render_stream(chunks(), renderer, report, num_proc=num_proc, bar=bar):
            writer.add(examples)
    report.problems.raise_if_any(where, count)
    return report, head
