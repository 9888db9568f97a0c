"""`sftkit data inspect` and `sftkit data clean` read their file as a stream (`formats.stream_records`),
never whole (`load_records`), and give what the in-memory way gives: the figures of every record, the
same duplicates as datasketch's own LSH index, the same worst offenders as `heapq` over every row.
"""

from __future__ import annotations

import heapq
import random

import pytest
from datasketch import MinHash, MinHashLSH
from transformers import AutoTokenizer

from sftkit.data import formats
from sftkit.data.formats import load_records
from sftkit.data.render import Renderer
from sftkit.data.render_all import render_records
from sftkit.data.tools.clean import CleanOptions, clean_file
from sftkit.data.tools.dedupe import (
    LSH_WEIGHTS,
    NUM_PERM,
    Duplicates,
    find_duplicates,
    group_units,
    jaccard,
    normalise,
    record_text,
    shingles,
)
from sftkit.data.tools.inspect import inspect_file
from sftkit.data.tools.ranks import Worst
from tests.conftest import ASSETS, shared_file, tokenizer_dir
from tests.test_clean import fixture_rows, plant, write

DATA = ASSETS / "data"


def reference_duplicates(texts: list[str], threshold: float) -> Duplicates:
    """The in-memory finder as it was: every text held, datasketch's MinHashLSH as the index."""
    found, first = Duplicates(), {}
    lsh = MinHashLSH(threshold=max(threshold - 0.1, 0.05), num_perm=NUM_PERM, weights=LSH_WEIGHTS)
    for i, text in enumerate(texts):
        key = normalise(text)
        if key in first:
            found.exact[i] = first[key]
            continue
        first[key] = i
        if not key:
            continue
        mine = shingles(key)
        signature = MinHash(num_perm=NUM_PERM, hashfunc=int)
        signature.update_batch(mine.tolist())
        best = None
        for j in sorted(lsh.query(signature)):
            score = jaccard(mine, shingles(normalise(texts[j])))
            if score >= threshold and (best is None or score > best[1]):
                best = (j, score)
        if best is None:
            lsh.insert(i, signature)
        else:
            found.near[i] = best
    return found


def unit_texts(path) -> tuple[list[str], list[str]]:
    units = list(group_units(load_records(path, on_error="skip").records))
    return [u.text for u in units], [u.source for u in units]


@pytest.mark.parametrize("threshold", [0.85, 0.6])
def test_duplicates_equal_datasketch_index(threshold):
    texts = unit_texts(DATA / "glaive_toolcall.json")[0] + unit_texts(DATA / "fastchat_sharegpt.json")[0]
    texts = texts + [t.upper() + " !" for t in texts[::3]] + [t.replace("the", "a", 2) for t in texts[1::4]]
    found, want = find_duplicates(texts, near_threshold=threshold), reference_duplicates(texts, threshold)
    assert (found.exact, found.near) == (want.exact, want.near) and want.exact and want.near


@pytest.mark.shared
def test_duplicates_equal_datasketch_index_on_shared_files():
    for name in ("fastchat_dummy_conversation.json", "oasst1_sft_zh_llamafactory.json"):
        texts = unit_texts(shared_file(f"instructions/{name}"))[0]
        found, want = find_duplicates(texts, near_threshold=0.7), reference_duplicates(texts, 0.7)
        assert (found.exact, found.near) == (want.exact, want.near) and want.near


def test_worst_is_heapq_over_everything():
    rng = random.Random(0)
    keys = [rng.randint(0, 20) for _ in range(500)]  # many ties: the earliest wins, as in heapq
    largest, smallest = Worst(), Worst(largest=False)
    for i, key in enumerate(keys):
        largest.add(key, i)
        smallest.add(key, i)
    pairs = list(zip(keys, range(len(keys))))
    assert largest.items() == [i for _, i in heapq.nlargest(5, pairs, key=lambda p: p[0])]
    assert smallest.items() == [i for _, i in heapq.nsmallest(5, pairs, key=lambda p: p[0])]


def planted_file(tmp_path):
    """Real rows with exact and near duplicates planted (`tests.test_clean.plant`), as JSONL."""
    planted = plant(fixture_rows(), exact_of=[0, 3, 7], near_of=[(i, 2) for i in (1, 5, 9)], seed=1)
    return write(planted.rows, tmp_path / "planted.jsonl")


def test_inspect_streams_and_equals_the_in_memory_figures(tmp_path, monkeypatch):
    path = planted_file(tmp_path)
    qwen = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    records = load_records(path).records
    texts, sources = unit_texts(path)
    lengths = [len(e.input_ids) for e in render_records(records, Renderer(qwen)).examples]
    want = reference_duplicates(texts, 0.6)
    monkeypatch.setattr(formats, "load_records", lambda *a, **k: pytest.fail("inspect loaded the file whole"))
    report = inspect_file(path, tokenizer=qwen, max_length=256, near_threshold=0.6, num_proc=2)
    assert list(report.chars) == [len(record_text(r)) for r in records]
    assert list(report.tokens.lengths) == lengths and report.tokens.truncated == sum(n > 256 for n in lengths)
    assert (report.rows, report.exact_duplicates, report.near_duplicates) == (len(texts), len(want.exact),
                                                                              len(want.near)) != (len(texts), 0, 0)
    assert [o.source for o in report.worst["longest"]] == [
        s for _, s in heapq.nlargest(5, zip(lengths, (r.source for r in records)), key=lambda p: p[0])]


def test_clean_streams_and_removes_what_the_in_memory_way_removes(tmp_path, monkeypatch):
    path = planted_file(tmp_path)
    texts, sources = unit_texts(path)
    want = reference_duplicates(texts, 0.6)
    monkeypatch.setattr(formats, "load_records", lambda *a, **k: pytest.fail("clean loaded the file whole"))
    report = clean_file(path, tmp_path / "out.jsonl", CleanOptions(near_threshold=0.6))
    removed = {s for rows in report.removed.values() for s, _ in rows}
    assert removed == {sources[i] for i in (*want.exact, *want.near)} and removed
    assert report.rows_out == len(texts) - len(removed)
