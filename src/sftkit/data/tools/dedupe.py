"""What a record says, normalised, and which records repeat: exact and near duplicates.

    from sftkit.data.tools.dedupe import DuplicateFinder, find_duplicates, group_units
    found = find_duplicates(texts, near_threshold=0.85)
    found.exact  # {i: first index with the same normalised text}
    found.near   # {i: (index of the kept text it resembles, Jaccard)}
    with DuplicateFinder(0.85) as finder:                          # the same, one row at a time
        for unit in group_units(stream_records("train.jsonl")[1]):  # one unit per row, as read
            match = finder.add(unit.text)                          # None | Match("exact"|"near", of, score)

Used by `sftkit data inspect` (counts, `sftkit.data.tools.inspect`) and `sftkit data clean` (removal,
`sftkit.data.tools.clean`), so both agree on what a duplicate is.

Exact duplicates compare `normalise(text)`: punctuation removed, case folded, whitespace collapsed.
Near duplicates are texts whose word-3-gram sets have Jaccard similarity >= the threshold, compared
with the earlier texts kept so far (a later text is the duplicate, the first one is kept). MinHash
LSH (datasketch, 128 permutations, its band threshold 0.1 below ours and false negatives weighted
4x; at the default 0.85 a pair exactly at the threshold is proposed with probability 0.994, a pair
at 0.9 with 0.9999) proposes candidates, and the exact Jaccard of the shingle sets confirms them,
so no pair under the threshold is ever reported.

Memory: `DuplicateFinder` keeps no text. Per row it holds a 16-byte digest (exact duplicates), an
8-byte offset, and for each row kept in the index its LSH band keys (12 bytes a band, 16 bands at
the default: ~200 bytes; datasketch's own index measured 5.3 KB a row) and its shingles in a
temporary file, read back only to confirm a candidate. That index is the cost that grows with the
file: it must hold every kept row, as any later row may repeat it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import unicodedata
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from datasketch import MinHash, MinHashLSH
from tqdm import tqdm

from sftkit.data.messages import Conversation, DataError, Record

SHINGLE_WORDS = 3
NUM_PERM = 128
LSH_WEIGHTS = (0.2, 0.8)  # (false positive, false negative): favour recall, candidates are verified
DEFAULT_NEAR_THRESHOLD = 0.85


# --- text ----------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _punctuation() -> dict[int, None]:
    """A `str.translate` table deleting every Unicode punctuation character (categories P*)."""
    return {cp: None for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == "P"}


def normalise(text: str) -> str:
    """Text compared for exact duplicates: punctuation removed, case folded, whitespace collapsed."""
    return " ".join(text.translate(_punctuation()).casefold().split())


def replies(record: Record) -> list[str]:
    """The assistant replies that carry text (a tool call with empty content is not a reply)."""
    if not isinstance(record, Conversation):
        return []
    return [m.content for m in record.messages
            if m.role == "assistant" and (m.content.strip() or not m.extra.get("tool_calls"))]


def record_text(record: Record) -> str:
    """Everything a record says, role by role (tool calls as JSON); what duplicates compare."""
    if not isinstance(record, Conversation):
        return record.text
    parts = []
    for m in record.messages:
        calls = m.extra.get("tool_calls")
        call_text = " " + json.dumps(calls, sort_keys=True, ensure_ascii=False) if calls else ""
        parts.append(f"{m.role}: {m.content}{call_text}")
    return "\n".join(parts)


@dataclass
class Unit:
    """One row of the file: its source and the records it gave (several for self-instruct)."""

    source: str
    records: list[Record]

    @property
    def text(self) -> str:
        return "\n\n".join(record_text(r) for r in self.records)


def group_units(records: Iterable[Record]) -> Iterator[Unit]:
    """Records grouped by source, in the order their rows appear, each unit as soon as its row is read
    (a row's records are adjacent: a reader yields them together)."""
    unit: Unit | None = None
    for record in records:
        if unit is not None and unit.source == record.source:
            unit.records.append(record)
            continue
        if unit is not None:
            yield unit
        unit = Unit(record.source, [record])
    if unit is not None:
        yield unit


class Sources:
    """Row sources (`file:line`) by number, packed in one buffer: a row costs its UTF-8 bytes and an
    8-byte offset, not a Python string (a duplicate names the earlier row it repeats, any of them)."""

    def __init__(self) -> None:
        self._text = bytearray()
        self._ends = array("q")

    def append(self, source: str) -> None:
        self._text += source.encode("utf-8")
        self._ends.append(len(self._text))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        return self._text[self._ends[i - 1] if i else 0:self._ends[i]].decode("utf-8")


# --- duplicates ----------------------------------------------------------------------------------

@dataclass
class Duplicates:
    """Which texts repeat an earlier one; indices are positions in the list given."""

    exact: dict[int, int] = field(default_factory=dict)  # i -> first index with the same normalised text
    near: dict[int, tuple[int, float]] = field(default_factory=dict)  # i -> (kept index, Jaccard)


@lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def shingles(normalised: str) -> np.ndarray:
    """Sorted unique 32-bit hashes of a normalised text's word 3-grams (the same on every run);
    a text shorter than 3 words is one shingle."""
    words = normalised.split()
    if not words:
        return np.empty(0, dtype=np.uint32)
    ids = np.fromiter(map(_word_hash, words), dtype=np.uint64, count=len(words))
    n = max(len(words) - SHINGLE_WORDS + 1, 1)
    hashes = np.zeros(n, dtype=np.uint64)
    for k in range(min(SHINGLE_WORDS, len(words))):
        hashes = hashes * np.uint64(0x9E3779B97F4A7C15) + ids[k:k + n]  # wraps modulo 2**64
    return np.unique(((hashes >> np.uint64(32)) ^ hashes).astype(np.uint32))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays."""
    shared = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - shared
    return shared / union if union else 1.0


class Match(NamedTuple):
    """What a row repeats: the number of the earlier row, exactly (score 1.0) or nearly (its Jaccard)."""

    kind: str  # "exact" | "near"
    of: int
    score: float


def find_duplicates(texts: Iterable[str], *, near_threshold: float | None = DEFAULT_NEAR_THRESHOLD,
                    progress: bool = False) -> Duplicates:
    """Exact duplicates of normalised text, then (unless `near_threshold` is None) near duplicates
    among the rest: each text is compared with the earlier texts kept so far."""
    found = Duplicates()
    with DuplicateFinder(near_threshold) as finder:
        for i, text in enumerate(tqdm(texts, desc="duplicates", unit="ex", disable=None if progress else True)):
            match = finder.add(text)
            if match is not None and match.kind == "exact":
                found.exact[i] = match.of
            elif match is not None:
                found.near[i] = (match.of, match.score)
    return found


class DuplicateFinder:
    """`find_duplicates` one text at a time, holding no text (see the module docstring for what it
    holds): `add` numbers each text from 0 and says which earlier one it repeats, if any."""

    def __init__(self, near_threshold: float | None = DEFAULT_NEAR_THRESHOLD) -> None:
        if near_threshold is not None and not 0.0 < near_threshold <= 1.0:
            raise DataError("--near-dup-threshold", f"must be in (0, 1], not {near_threshold}")
        self.threshold = near_threshold
        self._first: dict[bytes, int] = {}  # digest of the normalised text -> its first row
        self._index = None if near_threshold is None else BandIndex(max(near_threshold - 0.1, 0.05))
        self._template = MinHash(num_perm=NUM_PERM, hashfunc=int)
        self._spill = tempfile.TemporaryFile(buffering=0) if near_threshold is not None else None
        self._ends = array("q", [0])  # row i's shingles are bytes ends[i]:ends[i + 1] of the spill file
        self._shingles_of = lru_cache(maxsize=4096)(self._read_shingles)

    def __enter__(self) -> DuplicateFinder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()

    def add(self, text: str) -> Match | None:
        i, end = len(self._ends) - 1, self._ends[-1]
        self._ends.append(end)  # nothing spilled unless the row joins the index below
        key = normalise(text)
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        if digest in self._first:
            return Match("exact", self._first[digest], 1.0)
        self._first[digest] = i
        if self._index is None or self._spill is None or self.threshold is None or not key:  # nothing to compare
            return None
        mine = shingles(key)
        signature = self._template.copy()
        signature.update_batch(mine.tolist())
        match = _best_match(mine, self._index.query(signature.hashvalues), self._shingles_of, self.threshold)
        if match is not None:
            return Match("near", *match)
        self._index.insert(i, signature.hashvalues)
        data = mine.tobytes()
        if self._spill.write(data) != len(data):
            raise OSError(f"short write to the shingle spill file ({self._spill.name})")
        self._ends[-1] = end + len(data)
        return None

    def _read_shingles(self, i: int) -> np.ndarray:
        assert self._spill is not None
        start, end = self._ends[i], self._ends[i + 1]
        return np.frombuffer(os.pread(self._spill.fileno(), end - start, start), dtype=np.uint32)


class BandIndex:
    """MinHash LSH with datasketch's bands (`MinHashLSH`'s b bands of r values for the threshold and
    weights), so it proposes the same candidates; each band's r values are kept as one 64-bit key
    (blake2b; a collision only adds a candidate, which the exact Jaccard then rejects) in sorted numpy
    arrays with a small dict of recent rows, so a row costs 12 bytes a band instead of datasketch's
    Python objects (5.3 KB a row measured at 16 bands)."""

    MERGE = 8192  # recent rows moved into the sorted arrays at a time (each move copies the arrays)

    def __init__(self, threshold: float) -> None:
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=LSH_WEIGHTS)
        self.bands, self.rows_per_band = lsh.b, lsh.r
        self._keys = [np.empty(0, np.uint64) for _ in range(self.bands)]
        self._rows = [np.empty(0, np.int32) for _ in range(self.bands)]
        self._recent: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self._pending = 0

    def _band_keys(self, hashvalues: np.ndarray) -> list[int]:
        r = self.rows_per_band
        return [int.from_bytes(hashlib.blake2b(hashvalues[b * r:(b + 1) * r].tobytes(), digest_size=8).digest(),
                               "little") for b in range(self.bands)]

    def query(self, hashvalues: np.ndarray) -> list[int]:
        found: set[int] = set()
        for keys, rows, recent, key in zip(self._keys, self._rows, self._recent, self._band_keys(hashvalues)):
            lo, hi = np.searchsorted(keys, np.uint64(key), "left"), np.searchsorted(keys, np.uint64(key), "right")
            found.update(rows[lo:hi].tolist())
            found.update(recent.get(key, ()))
        return list(found)

    def insert(self, row: int, hashvalues: np.ndarray) -> None:
        for recent, key in zip(self._recent, self._band_keys(hashvalues)):
            recent.setdefault(key, []).append(row)
        self._pending += 1
        if self._pending >= self.MERGE:
            self._merge()

    def _merge(self) -> None:
        for b, recent in enumerate(self._recent):
            pairs = sorted((key, row) for key, rows in recent.items() for row in rows)
            new_keys = np.fromiter((k for k, _ in pairs), np.uint64, len(pairs))
            at = np.searchsorted(self._keys[b], new_keys, "right")
            self._keys[b] = np.insert(self._keys[b], at, new_keys)
            self._rows[b] = np.insert(self._rows[b], at, np.fromiter((r for _, r in pairs), np.int32, len(pairs)))
            recent.clear()
        self._pending = 0


def _best_match(mine: np.ndarray, candidates: list[int], shingles_of: Callable[[int], np.ndarray],
                threshold: float) -> tuple[int, float] | None:
    """The earliest of the most similar candidates at or above `threshold`, by exact Jaccard."""
    best: tuple[int, float] | None = None
    for j in sorted(candidates):
        score = jaccard(mine, shingles_of(j))
        if score >= threshold and (best is None or score > best[1]):
            best = (j, score)
    return best
