"""Rendering in worker processes: the pool behind `render_records(..., num_proc=N)`.

Written by hand rather than `datasets.map` for what crosses the process boundary. The workers are
forked with the records and the renderer already in memory, so only `(start, stop)` ranges go out,
and each chunk's examples come back as two flat int32 arrays (pickled as raw bytes) instead of
lists of Python ints. Pickling records out and token lists back cost about a sixth of the CPU time
of a two-process run (`bench/preprocess.py`).
"""

from __future__ import annotations

import multiprocessing as mp
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sftkit.data.messages import DataError, Record
from sftkit.data.render import Renderer, Tokenized

_records: Sequence[Record] = ()
_renderer: Renderer | None = None


@dataclass(slots=True)
class PackedChunk:
    """One chunk's results: examples as flat arrays plus their lengths and sources; errors as they are."""

    input_ids: array
    labels: array
    lengths: list[int]
    sources: list[str]
    errors: dict[int, DataError]  # slot in the chunk -> the record's error
    warnings: Counter[str]

    @classmethod
    def pack(cls, results: Sequence[Tokenized | DataError], warnings: Counter[str]) -> PackedChunk:
        packed = cls(array("i"), array("i"), [], [], {}, warnings)
        for slot, item in enumerate(results):
            if isinstance(item, DataError):
                packed.errors[slot] = item
                continue
            packed.input_ids.extend(item.input_ids)
            packed.labels.extend(item.labels)
            packed.lengths.append(len(item.input_ids))
            packed.sources.append(item.source)
        return packed

    def unpack(self) -> list[Tokenized | DataError]:
        ids, labels = self.input_ids.tolist(), self.labels.tolist()
        examples = iter(zip(self.lengths, self.sources))
        results: list[Tokenized | DataError] = []
        at = 0
        for slot in range(len(self.lengths) + len(self.errors)):
            if slot in self.errors:
                results.append(self.errors[slot])
                continue
            length, source = next(examples)
            results.append(Tokenized(ids[at : at + length], labels[at : at + length], source))
            at += length
        return results


def _init(renderer: Renderer, records: Sequence[Record]) -> None:
    global _renderer, _records
    _renderer, _records = renderer, records
    renderer.warnings = Counter()


def _render_range(bounds: tuple[int, int]) -> PackedChunk:
    assert _renderer is not None
    before = Counter(_renderer.warnings)
    results = _renderer.render_many(_records[bounds[0] : bounds[1]])
    return PackedChunk.pack(results, _renderer.warnings - before)


def render_in_pool(
    records: Sequence[Record], renderer: Renderer, num_proc: int, chunk: int
) -> Iterator[tuple[list[Tokenized | DataError], Counter[str]]]:
    """Each chunk's results (in input order) and the warnings it raised, rendered by `num_proc`
    forked workers."""
    ranges = [(start, min(start + chunk, len(records))) for start in range(0, len(records), chunk)]
    # fork: the workers inherit `records` and `renderer` (no pickling), as the initializer's arguments
    with mp.get_context("fork").Pool(num_proc, initializer=_init, initargs=(renderer, records)) as pool:
        for packed in pool.imap(_render_range, ranges):
            yield packed.unpack(), packed.warnings
