"""What a record says, normalised, and which records repeat: exact and near duplicates.

    from sftkit.data.tools.dedupe import find_duplicates, group_units
    units = group_units(load_records("train.jsonl").records)       # one unit per row
    found = find_duplicates([u.text for u in units], near_threshold=0.85)
    found.exact  # {i: first index with the same normalised text}
    found.near   # {i: (index of the kept text it resembles, Jaccard)}

Used by `sftkit data inspect` (counts, `sftkit.data.tools.inspect`) and `sftkit data clean` (removal,
`sftkit.data.tools.clean`), so both agree on what a duplicate is.

Exact duplicates compare `normalise(text)`: punctuation removed, case folded, whitespace collapsed.
Near duplicates are texts whose word-3-gram sets have Jaccard similarity >= the threshold, compared
with the earlier texts kept so far (a later text is the duplicate, the first one is kept). MinHash
LSH (datasketch, 128 permutations, its band threshold 0.1 below ours and false negatives weighted
4x; at the default 0.85 a pair exactly at the threshold is proposed with probability 0.994, a pair
at 0.9 with 0.9999) proposes candidates, and the exact Jaccard of the shingle sets confirms them,
so no pair under the threshold is ever reported.
"""

from __future__ import annotations

import hashlib
import json
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

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


def group_units(records: Iterable[Record]) -> list[Unit]:
    """Records grouped by source, in the order their rows appear."""
    units: dict[str, Unit] = {}
    for record in records:
        units.setdefault(record.source, Unit(record.source, [])).records.append(record)
    return list(units.values())


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


def find_duplicates(texts: Sequence[str], *, near_threshold: float | None = DEFAULT_NEAR_THRESHOLD,
                    progress: bool = False) -> Duplicates:
    """Exact duplicates of normalised text, then (unless `near_threshold` is None) near duplicates
    among the rest: each text is compared with the earlier texts kept so far."""
    if near_threshold is not None and not 0.0 < near_threshold <= 1.0:
        raise DataError("--near-dup-threshold", f"must be in (0, 1], not {near_threshold}")
    found, first = Duplicates(), {}
    lsh = None if near_threshold is None else MinHashLSH(  # a lower bar for candidates: recall
        threshold=max(near_threshold - 0.1, 0.05), num_perm=NUM_PERM, weights=LSH_WEIGHTS)
    template = MinHash(num_perm=NUM_PERM, hashfunc=int)

    @lru_cache(maxsize=4096)
    def shingles_of(i: int) -> np.ndarray:
        return shingles(normalise(texts[i]))

    for i, text in enumerate(tqdm(texts, desc="duplicates", unit="ex", disable=None if progress else True)):
        key = normalise(text)
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        if digest in first:
            found.exact[i] = first[digest]
            continue
        first[digest] = i
        if lsh is None or near_threshold is None or not key:  # nothing to compare
            continue
        mine = shingles(key)
        signature = template.copy()
        signature.update_batch(mine.tolist())
        match = _best_match(mine, lsh.query(signature), shingles_of, near_threshold)
        if match is None:
            lsh.insert(i, signature)
        else:
            found.near[i] = match
    return found


def _best_match(mine: np.ndarray, candidates: list[int], shingles_of: Callable[[int], np.ndarray],
                threshold: float) -> tuple[int, float] | None:
    """The earliest of the most similar candidates at or above `threshold`, by exact Jaccard."""
    best: tuple[int, float] | None = None
    for j in sorted(candidates):
        score = jaccard(mine, shingles_of(j))
        if score >= threshold and (best is None or score > best[1]):
            best = (j, score)
    return best
