"""Mixing sources by weight / sample count: exact counts, no replacement until a source runs out,
even upsampling, the same picks for the same seed, and real files from the committed fixtures."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from sftkit.config import Source
from sftkit.data.formats import load_records
from sftkit.data.messages import RawText
from sftkit.data.mixing import count, mix, mix_with_report, pick
from tests.conftest import ASSETS


def texts(n: int, name: str) -> list[RawText]:
    return [RawText(f"{name} {i}", f"{name}.jsonl:{i + 1}") for i in range(n)]


def test_counts_from_weights_and_samples():
    assert [count(Source("f"), 10), count(Source("f", weight=2), 10), count(Source("f", weight=0.25), 10),
            count(Source("f", weight=0.5), 3), count(Source("f", weight=0), 10), count(Source("f", samples=7), 3)] == [
        10, 20, 3, 2, 0, 7]  # 2.5 and 1.5 round half up


@pytest.mark.parametrize("bad", [dict(weight=1, samples=2), dict(weight=-1), dict(weight=float("nan")),
                                 dict(samples=-3), dict(samples=2.5), dict(samples=True)])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError):
        Source("f", **bad)


def test_without_replacement_up_to_the_size():
    chosen = pick(100, 60, np.random.default_rng(0))
    assert len(chosen) == len(set(chosen)) == 60 and chosen == sorted(chosen)
    assert pick(100, 100, np.random.default_rng(0)) == list(range(100))


def test_upsampling_repeats_every_record_evenly():
    chosen = pick(10, 25, np.random.default_rng(3))
    copies = Counter(chosen)
    assert len(chosen) == 25 and set(copies) == set(range(10))
    assert sorted(copies.values()) == [2] * 5 + [3] * 5  # two copies each, plus five drawn once more


def test_empty_source():
    assert pick(0, 0, np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="empty source"):
        pick(0, 3, np.random.default_rng(0))


def test_mix_is_deterministic_and_reports_counts():
    a, b, c = texts(50, "a"), texts(1000, "b"), texts(30, "c")
    sources = [(a, Source("f", weight=2)), (b, Source("f", samples=500)), (c, Source("f"))]
    mixed, report = mix_with_report(sources, seed=7)
    assert mixed == mix(sources, seed=7)
    assert mixed != mix(sources, seed=8)
    assert [(s.name, s.available, s.taken, s.distinct) for s in report.sources] == [
        ("a.jsonl", 50, 100, 50), ("b.jsonl", 1000, 500, 500), ("c.jsonl", 30, 30, 30)]
    assert Counter(r.text.split()[0] for r in mixed) == {"a": 100, "b": 500, "c": 30}
    assert mixed[:2] == [a[0], a[0]] and mixed[-30:] == c  # sources in order, picks in file order
    assert "a.jsonl: 100 of 50 (upsampled x2.00, 50 distinct), 15.9%" in report.summary()
    assert report.summary().endswith("mixed: 630 records")


def test_one_sources_spec_does_not_change_anothers_picks():
    a, b = texts(100, "a"), texts(100, "b")
    first = mix([(a, Source("f", samples=30)), (b, Source("f", samples=10))], seed=1)
    second = mix([(a, Source("f", samples=30)), (b, Source("f", weight=3))], seed=1)
    assert first[:30] == second[:30]


def test_real_files():
    chat = load_records(ASSETS / "data" / "chat_messages.jsonl").records
    gsm8k = load_records(ASSETS / "data" / "gsm8k.jsonl").records
    mixed, report = mix_with_report([(chat, Source("f", samples=4)), (gsm8k, Source("f", weight=2))], seed=0)
    assert len(mixed) == 4 + 2 * len(gsm8k)
    assert report.sources[0].name.endswith("chat_messages.jsonl")
    assert all(m.source.startswith(report.sources[0].name) for m in mixed[:4])
