"""Mix several training sources by weight or sample count, the same way for the same seed.

    # sftkit train recipe.yaml, with
    data:
      train:
        - {path: a.jsonl, weight: 2}       # every record of a.jsonl twice
        - {path: b.jsonl, samples: 500}    # 500 records of b.jsonl, drawn without replacement
        - c.jsonl                          # all of c.jsonl, once

    records, report = mix_with_report([(a, Source("a.jsonl", weight=2)), (b, Source("b.jsonl", samples=500)),
                                       (c, Source("c.jsonl"))], seed=0)
    print(report.summary())

How many records a source gives (`count`; `Source` is the config's `data.train` entry): `samples`
is a number of records; `weight` scales the source's size, round(weight * size) with halves rounded up: 0.5 = a random half, 1 = all,
2 = all twice, 2.5 = all twice plus a random half; neither = all of it, once.

Which records: a count up to the source's size is drawn without replacement. Above it the source is
upsampled: every record is taken count // size times and the remainder drawn without replacement,
so no record is left out and none is repeated more than once beyond the others (plain sampling with
replacement would leave about 13% of the records out at weight 2). Each source draws from its own
generator, seeded by (seed, position), so changing one source's spec never changes another's picks.
The result lists the sources in the order given, each one's picks in file order (copies adjacent);
the trainer shuffles every epoch. Hold evaluation records out BEFORE mixing, or upsampled copies
of the same record land on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sftkit.config import Source
from sftkit.data.messages import Record


def count(source: Source, size: int) -> int:
    """How many records `source` takes from a file of `size` records."""
    if source.samples is not None:
        return source.samples
    if source.weight is not None:
        return math.floor(source.weight * size + 0.5)
    return size


@dataclass(frozen=True)
class SourceCount:
    """What one source gave to the mix."""

    name: str
    available: int
    taken: int
    distinct: int  # different records among those taken

    @property
    def upsampled(self) -> bool:
        return self.taken > self.available


@dataclass
class MixReport:
    """Counts per source, in the order given."""

    sources: list[SourceCount]

    @property
    def total(self) -> int:
        return sum(s.taken for s in self.sources)

    def summary(self) -> str:
        """One line per source, e.g. `a.jsonl: 2000 of 1000 (upsampled x2.00, 1000 distinct), 40.0%`."""
        lines = []
        for s in self.sources:
            how = f"upsampled x{s.taken / s.available:.2f}, " if s.upsampled else ""
            share = s.taken / self.total if self.total else 0.0
            lines.append(f"{s.name}: {s.taken} of {s.available} ({how}{s.distinct} distinct), {share:.1%}")
        return "\n".join(lines + [f"mixed: {self.total} records"])


def pick(size: int, count: int, rng: np.random.Generator) -> list[int]:
    """`count` indices into `size` records, sorted: without replacement up to `size`, then whole
    copies of every index plus a without-replacement draw of the remainder."""
    if count and not size:
        raise ValueError(f"cannot take {count} records from an empty source")
    copies, remainder = divmod(count, size) if size else (0, 0)
    chosen = np.concatenate([np.tile(np.arange(size), copies), rng.choice(size, remainder, replace=False)])
    return np.sort(chosen, kind="stable").tolist()


def picks(sizes: Sequence[int], specs: Sequence[Source], seed: int) -> list[list[int]]:
    """Each source's chosen indices (`pick`), from its own generator seeded by (seed, position): the
    one rule both the in-memory mix and the streamed render (`sftkit.data.stream`) follow."""
    return [pick(size, count(spec, size), np.random.default_rng([seed, position]))
            for position, (size, spec) in enumerate(zip(sizes, specs))]


def mix_with_report(sources: Sequence[tuple[list[Record], Source]], seed: int) -> tuple[list[Record], MixReport]:
    """The mixed records (see the module docstring) and how many each source gave."""
    chosen_lists = picks([len(records) for records, _ in sources], [spec for _, spec in sources], seed)
    mixed: list[Record] = []
    counts = []
    for position, ((records, _), chosen) in enumerate(zip(sources, chosen_lists)):
        mixed.extend(records[i] for i in chosen)
        first = records[0].source if records else None
        counts.append(SourceCount(source_name(first, position), len(records), len(chosen), len(set(chosen))))
    return mixed, MixReport(counts)


def mix(sources: Sequence[tuple[list[Record], Source]], seed: int) -> list[Record]:
    """The mixed records; `mix_with_report` also says how many each source gave."""
    return mix_with_report(sources, seed)[0]


def source_name(first_source: str | None, position: int) -> str:
    """The file a source's records came from ("a.jsonl" of its first record's "a.jsonl:12"), else its position."""
    if first_source and ":" in first_source:
        return first_source.rpartition(":")[0]
    return f"source {position}"
