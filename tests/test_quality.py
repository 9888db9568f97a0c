"""`sftkit data inspect`: counts written out by hand, token figures equal to the renderer's, planted
duplicates found exactly, scripts by Unicode name, and the report files.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from sftkit.cli import main
from sftkit.data.formats import load_records
from sftkit.data.render import Renderer
from sftkit.data.render_all import render_records
from sftkit.data.tools.clean import short_source
from sftkit.data.tools.inspect import (
    Offender,
    inspect_file,
    letters_by_script,
    percentiles,
    script_of,
    write_report,
)
from tests.conftest import shared_file, tokenizer_dir
from tests.test_clean import fixture_rows, plant, source, write

LONG_PROMPT = " ".join(f"Sentence number {i} of a very long question." for i in range(40))
ROWS = [  # hand-countable: 4 valid examples, 11 turns once the system prompt is prepended
    {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4, of course."},
                  {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six, of course."}]},
    {"messages": [{"role": "user", "content": "你好，请介绍一下你自己。"},
                  {"role": "assistant", "content": "我是一个乐于助人的助手，可以回答各种问题。"}]},
    {"messages": [{"role": "user", "content": LONG_PROMPT}, {"role": "assistant", "content": "Yes, that is long."}]},
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "bot", "content": "Hi."}]},  # invalid role
]


@pytest.fixture(scope="module")
def qwen():
    return AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))


def test_scripts_come_from_unicode_names():
    assert letters_by_script("Hello мир 你好 مرحبا 안녕 ｈｅｌｌｏ 123 !? é") == {
        "Latin": 11, "Cyrillic": 3, "Han": 2, "Arabic": 5, "Hangul": 2}
    assert [script_of(c) for c in "aΩжאの カ7 "] == ["Latin", "Greek", "Cyrillic", "Hebrew", "Hiragana", None,
                                                   "Katakana", None, None]


def test_a_reply_in_another_script_is_listed(tmp_path):
    rows = [{"prompt": f"Question {i} in English, please answer it.", "completion": f"Answer {i}."} for i in range(3)]
    rows.append({"prompt": "Translate into Chinese: my hometown has beautiful scenery and a rich history.",
                 "completion": "我的家乡有着美丽的自然风景和悠久的历史文化。"})
    report = inspect_file(write(rows, tmp_path / "rows.jsonl"))
    assert report.scripts == {"Latin": 4}
    assert report.worst["off-script"] == [Offender(f"{tmp_path}/rows.jsonl:4", "reply: 100% Han letters (main: Latin)")]


def test_percentiles_are_real_values():
    values = [1] * 60 + [2] * 32 + [3] * 5 + [4] * 2 + [100]
    assert percentiles(values) == {"p50": 1, "p90": 2, "p95": 3, "p99": 4, "max": 100}
    assert percentiles([]) == {}


def test_counts_by_hand(tmp_path):
    path = write(ROWS, tmp_path / "rows.jsonl")
    report = inspect_file(path, min_reply_chars=5)
    assert (report.rows, report.examples, report.invalid) == (4, 4, {"unknown role": 1})
    assert report.turns == 11 and report.roles == {"system": 1, "user": 5, "assistant": 5}
    assert (report.system_prompts, report.distinct_system, report.multi_turn) == (1, 1, 1)
    assert report.near_empty == 1 and report.worst["shortest reply"][0] == Offender(f"{path}:1", "2 chars: 'Ok'")
    assert list(report.worst) == ["invalid", "longest", "shortest reply", "refusal-like", "exact duplicate",
                                  "near duplicate", "off-script"]
    assert report.scripts == {"Latin": 3, "Han": 1}
    assert [o.source for o in report.worst["off-script"]] == [f"{path}:3"]
    assert report.worst["invalid"][0].source == f"{path}:5"
    assert report.tokens is None and (report.exact_duplicates, report.near_duplicates) == (0, 0)


def test_max_length_figures_are_exactly_trainings(tmp_path, qwen):
    path = write(ROWS[:4] + fixture_rows(), tmp_path / "mixed.jsonl")
    report = inspect_file(path, tokenizer=qwen, max_length=48)
    records = load_records(path).records
    renderer = Renderer(qwen, max_length=48)
    training = render_records(records, renderer)
    tokens = report.tokens
    assert tokens.truncated == renderer.warnings["truncated"] > tokens.dropped == sum(training.dropped.values()) >= 1
    assert (tokens.kept_tokens, tokens.kept_trained) == (training.total_tokens, training.trained_tokens)
    assert len(tokens.lengths) == len(records) and max(tokens.lengths) > 48
    assert report.worst["dropped at max_length 48"][0].source == f"{path}:4"  # the long prompt


def test_planted_duplicates_are_counted_exactly(tmp_path):
    originals = fixture_rows()
    lengths = [sum(len(m["content"].split()) for m in r["messages"]) for r in originals]
    longest = sorted(range(len(originals)), key=lengths.__getitem__)[-2:]
    planted = plant(originals, exact_of=[0, 3, 7, 9], near_of=[(longest[0], 3), (longest[1], 2)], seed=1)
    path = write(planted.rows, tmp_path / "planted.json")
    report = inspect_file(path)
    assert (report.exact_duplicates, report.near_duplicates) == (4, 2)
    assert sorted(o.source for o in report.worst["near duplicate"]) == sorted(source(path, p) for p in planted.near)
    assert [o.source for o in report.worst["exact duplicate"]] == [source(path, p) for p in planted.exact]


def test_lima_with_planted_duplicates(tmp_path):
    lima = json.loads(shared_file("instructions/lima_llamafactory.json").read_text(encoding="utf-8"))
    planted = plant(lima[:300], exact_of=[3, 50, 51, 120, 200, 250, 299],
                    near_of=[(i, 3) for i in (10, 77, 150, 222, 298)])
    report = inspect_file(write(planted.rows, tmp_path / "lima_planted.json"))
    assert (report.examples, report.exact_duplicates, report.near_duplicates) == (312, 7, 5)
    assert sorted(o.source for o in report.worst["near duplicate"]) == sorted(
        source(tmp_path / "lima_planted.json", p) for p in planted.near)


def test_report_files_and_cli(tmp_path, qwen, capsys):
    path = write(ROWS[:4] + fixture_rows(), tmp_path / "mixed.jsonl")
    markdown = write_report(inspect_file(path, tokenizer=qwen, max_length=64), tmp_path / "report")
    assert markdown == tmp_path / "report" / "report.md"
    for image in ("lengths.png", "replies.png"):
        assert (tmp_path / "report" / image).read_bytes()[:4] == b"\x89PNG"
    text = markdown.read_text()
    assert "![lengths.png](lengths.png)" in text and "**tokens per example**: p50 " in text
    assert "| `mixed.jsonl:4` | " in text  # worst offenders named file:line
    assert short_source(f"{path}:12") == "mixed.jsonl:12"

    code = main(["data", "inspect", str(path), "--tokenizer", str(tokenizer_dir("qwen2.5")), "--max-length", "64",
                 "--report", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 0 and "max_length 64: " in out and "worst offenders:" in out
    assert (tmp_path / "cli" / "report.md").is_file()
    assert main(["data", "inspect", str(path), "--template", "chatml"]) == 2  # --template needs --tokenizer


@pytest.mark.shared
def test_lima_report_with_qwen(qwen):
    path = shared_file("instructions/lima_llamafactory.json")
    report = inspect_file(path, tokenizer=qwen, max_length=2048)
    records = load_records(path).records
    renderer = Renderer(qwen, max_length=2048)
    training = render_records(records, renderer)
    assert (report.examples, report.rows, report.multi_turn) == (1029, 1029, 29)
    assert report.tokens.truncated == renderer.warnings["truncated"]
    assert report.tokens.dropped == sum(training.dropped.values())
    assert report.tokens.kept_trained == training.trained_tokens
    assert report.scripts == {"Latin": 1029}
    assert (report.exact_duplicates, report.near_duplicates) == (0, 0)
