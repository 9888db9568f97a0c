"""`sftkit data clean` (and `sftkit.data.tools.dedupe`): planted duplicates are removed exactly, the rest
kept in order and shape.

Real records (committed fixtures; LIMA from ../shared when present) get k exact duplicates planted
(case, whitespace and punctuation changed) and m near duplicates (a few words replaced); the
cleaned file must be the original rows, in order, in the input's own format.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from sftkit.cli import main
from sftkit.data.formats import load_records
from sftkit.data.messages import Conversation, DataError, DataFileError
from sftkit.data.tools.clean import CleanOptions, clean_file, write_clean_report
from sftkit.data.tools.dedupe import find_duplicates, jaccard, normalise, shingles
from tests.conftest import ASSETS, shared_file, tokenizer_dir

DATA = ASSETS / "data"
FIXTURES = ["oasst_trees.jsonl", "chat_messages.jsonl", "fastchat_sharegpt.json", "dolly.json", "gsm8k.jsonl",
            "identity_alpaca.json"]


def fixture_rows() -> list[dict[str, Any]]:
    """Real conversations from the committed fixtures, as `messages` rows (no tool calls)."""
    rows = []
    for name in FIXTURES:
        for record in load_records(DATA / name).records:
            if isinstance(record, Conversation) and not any(m.extra for m in record.messages):
                rows.append({"messages": [{"role": m.role, "content": m.content} for m in record.messages]})
    return rows


def _fields(row: dict[str, Any]) -> list[tuple[dict, str]]:
    """(container, key) of every text a row holds: alpaca fields or message contents."""
    if "messages" in row:
        return [(m, "content") for m in row["messages"]]
    return [(row, key) for key in ("instruction", "input", "output") if row.get(key)]


def exact_variant(row: dict[str, Any]) -> dict[str, Any]:
    """The same text after normalisation: upper case, doubled whitespace, extra punctuation."""
    row = copy.deepcopy(row)
    for holder, key in _fields(row):
        holder[key] = "  " + holder[key].upper().replace(" ", " \t ") + " !?"
    return row


def near_variant(row: dict[str, Any], words: int) -> dict[str, Any]:
    """`words` words of the longest text replaced, spread out (so few 3-grams change)."""
    row = copy.deepcopy(row)
    holder, key = max(_fields(row), key=lambda f: len(f[0][f[1]].split()))
    tokens = holder[key].split(" ")
    for n in range(words):
        tokens[(n + 1) * len(tokens) // (words + 1)] = f"zqxj{n}"
    holder[key] = " ".join(tokens)
    return row


@dataclass
class Planted:
    rows: list[dict[str, Any]]  # originals with the planted rows inserted after their originals
    exact: list[int]  # positions (0-based) of the planted exact duplicates
    near: list[int]  # positions of the planted near duplicates


def plant(originals: list[dict[str, Any]], exact_of: list[int], near_of: list[tuple[int, int]],
          seed: int = 0) -> Planted:
    """Insert an exact duplicate of each `exact_of` row and a near duplicate of each `near_of`
    (row, words changed) at random places after their originals."""
    rng = random.Random(seed)
    rows: list[tuple[dict[str, Any], str]] = [(row, "original") for row in originals]
    plan = [(exact_variant(originals[i]), "exact", i) for i in exact_of]
    plan += [(near_variant(originals[i], words), "near", i) for i, words in near_of]
    for row, kind, i in plan:
        after = next(p for p, (r, _) in enumerate(rows) if r is originals[i])
        rows.insert(rng.randint(after + 1, len(rows)), (row, kind))
    return Planted([r for r, _ in rows], [p for p, (_, k) in enumerate(rows) if k == "exact"],
                   [p for p, (_, k) in enumerate(rows) if k == "near"])


def write(rows: list[dict[str, Any]], path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return pq.read_table(path).to_pylist()


def source(path: Path, position: int) -> str:
    return f"{path}:{position + 1}" if path.suffix == ".jsonl" else f"{path}:#{position}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_normalise_ignores_case_whitespace_and_punctuation():
    assert normalise("  Hello,\tWORLD!!  how   are you? ") == "hello world how are you"
    assert normalise("Straße «quoted» — dash") == normalise("STRASSE quoted dash")
    assert normalise("2+2=4") == "2+2=4"  # symbols are not punctuation


def test_find_duplicates_on_small_texts():
    base = " ".join(f"word{i}" for i in range(100))
    texts = [base, base.upper() + "!", base.replace("word50", "other"), "something else entirely"]
    found = find_duplicates(texts, near_threshold=0.85)
    assert found.exact == {1: 0}
    assert list(found.near) == [2] and found.near[2][0] == 0
    assert found.near[2][1] == pytest.approx(jaccard(shingles(normalise(texts[2])), shingles(normalise(base))))
    assert find_duplicates(texts, near_threshold=None).near == {}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_clean_removes_exactly_the_planted_rows(tmp_path, suffix):
    originals = fixture_rows()
    unplanted = write(originals, tmp_path / f"real{suffix}")
    assert clean_file(unplanted, tmp_path / f"real_out{suffix}").removed == {}  # the real rows are distinct
    lengths = [sum(len(m["content"].split()) for m in r["messages"]) for r in originals]
    long_rows = sorted(range(len(originals)), key=lengths.__getitem__)[-3:]  # ~100, 340, 350 words
    planted = plant(originals, exact_of=[0, 5, 11], near_of=[(long_rows[0], 1), (long_rows[1], 3),
                                                             (long_rows[2], 3)])
    path = write(planted.rows, tmp_path / f"planted{suffix}")
    before = digest(path)
    out = tmp_path / "out" / f"clean{suffix}"

    report = clean_file(path, out)

    assert digest(path) == before  # the input is never touched
    assert read(out) == originals  # the original rows, in order
    assert report.counts == {"exact duplicate": 3, "near duplicate": 3}
    assert [s for s, _ in report.removed["exact duplicate"]] == [source(path, p) for p in planted.exact]
    assert [s for s, _ in report.removed["near duplicate"]] == [source(path, p) for p in planted.near]
    assert (report.rows_in, report.rows_out) == (len(planted.rows), len(originals))
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind
    if suffix == ".parquet":
        assert pq.read_schema(out).equals(pq.read_schema(path))


def test_clean_lima_keeps_its_shape(tmp_path):
    lima = json.loads(shared_file("instructions/lima_llamafactory.json").read_text(encoding="utf-8"))
    originals = lima[:300]
    planted = plant(originals, exact_of=[3, 50, 51, 120, 200, 250, 299],
                    near_of=[(i, 3) for i in (10, 77, 150, 222, 298)])
    path = write(planted.rows, tmp_path / "lima_planted.json")
    out = tmp_path / "lima_clean.json"

    report = clean_file(path, out)

    assert report.counts == {"exact duplicate": 7, "near duplicate": 5}
    assert [s for s, _ in report.removed["near duplicate"]] == [source(path, p) for p in planted.near]
    assert out.read_text(encoding="utf-8") == json.dumps(originals, indent=2, ensure_ascii=False)


def test_jsonl_lines_are_copied_byte_for_byte(tmp_path):
    lines = [b'{"prompt": "Hi", "completion": "Hello \\u00e9t\\u00e9", "z": 1.50}\n',
             b'{"completion": "Hello \\u00e9t\\u00e9", "prompt": "HI!", "z": 1.50}\n',
             b'{"prompt": "Bye", "completion": "See you."}']
    path = tmp_path / "raw.jsonl"
    path.write_bytes(b"".join(lines))
    report = clean_file(path, tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == lines[0] + lines[2] + b"\n"
    assert report.removed["exact duplicate"] == [(f"{path}:2", "same as raw.jsonl:1")]


def test_refuses_to_overwrite_the_input_or_convert(tmp_path):
    path = write(fixture_rows()[:3], tmp_path / "data.jsonl")
    before = digest(path)
    for out in (path, tmp_path / "sub" / ".." / "data.jsonl"):
        with pytest.raises(DataError, match="refusing to overwrite the input"):
            clean_file(path, out)
    with pytest.raises(DataError, match="suffix"):
        clean_file(path, tmp_path / "data.json")
    assert digest(path) == before
    assert main(["data", "clean", str(path), "--out", str(path)]) == 2


def test_filters_short_replies_patterns_and_refusals(tmp_path):
    rows = [{"prompt": "Name a colour.", "completion": "Red."},
            {"prompt": "Capital of France?", "completion": "The capital of France is Paris."},
            {"prompt": "Tell me a secret.", "completion": "As an AI language model, I have no secrets."},
            {"prompt": "Price of gold?", "completion": "I'm sorry, but I cannot help with that request."},
            {"prompt": "Say hi.", "completion": "Hi there, TODO-REMOVE this line."}]
    path = write(rows, tmp_path / "rows.jsonl")
    options = CleanOptions(min_reply_chars=5, drop_patterns=("todo-remove",), drop_refusals=True)
    report = clean_file(path, tmp_path / "out.jsonl", options)
    assert read(tmp_path / "out.jsonl") == [rows[1]]
    assert [s for s, _ in report.removed["short reply"]] == [f"{path}:1"]
    assert [s for s, _ in report.removed["pattern"]] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    with pytest.raises(DataError, match="bad regular expression"):
        clean_file(path, tmp_path / "x.jsonl", CleanOptions(drop_patterns=("(unclosed",)))


def test_max_tokens_uses_the_rendered_length(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    rows = [{"prompt": "Hi", "completion": "Hello."}, {"prompt": "Count.", "completion": " ".join(["one"] * 200)}]
    path = write(rows, tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match="needs --tokenizer"):
        clean_file(path, tmp_path / "out.jsonl", CleanOptions(max_tokens=64))
    report = clean_file(path, tmp_path / "out.jsonl", CleanOptions(max_tokens=64), tokenizer=tokenizer)
    assert read(tmp_path / "out.jsonl") == rows[:1]
    assert report.removed["too long"][0][0] == f"{path}:2"
    assert "tokens > 64" in report.removed["too long"][0][1]


def test_invalid_rows_stop_or_are_removed(tmp_path):
    path = DATA / "broken_mixed.jsonl"
    with pytest.raises(DataFileError):
        clean_file(path, tmp_path / "out.jsonl")
    report = clean_file(path, tmp_path / "out.jsonl", CleanOptions(skip_invalid=True))
    load = load_records(path, on_error="skip", max_errors=100)
    assert report.counts["invalid"] == sum(load.skipped.values())
    kept = load_records(tmp_path / "out.jsonl")  # what is left loads without an error
    assert len(kept.records) == len(load.records) - sum(v for k, v in report.counts.items() if k != "invalid")


def test_a_row_with_several_records_is_kept_or_removed_whole(tmp_path):
    rows = [json.loads(line) for line in (DATA / "self_instruct_seed.jsonl").read_text().splitlines()]
    two = copy.deepcopy(rows[1])
    two["instances"].append({"input": "", "output": "Another fine answer."})
    short = copy.deepcopy(rows[2])
    short["instances"].append({"input": "", "output": "ok"})  # one bad record spoils its row
    path = write([rows[0], two, short, two, rows[1]], tmp_path / "seed.jsonl")
    assert len(load_records(path).records) == 8

    report = clean_file(path, tmp_path / "out.jsonl", CleanOptions(min_reply_chars=3))

    assert read(tmp_path / "out.jsonl") == [rows[0], two, rows[1]]
    assert report.removed["short reply"] == [(f"{path}:3", "2 chars: 'ok'")]
    assert report.removed["exact duplicate"] == [(f"{path}:4", "same as seed.jsonl:2")]


def test_cli_writes_the_cleaned_file_and_both_reports(tmp_path, capsys):
    originals = fixture_rows()
    planted = plant(originals, exact_of=[1, 2], near_of=[])
    path = write(planted.rows, tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    assert main(["data", "clean", str(path), "--out", str(out), "--dedupe", "exact"]) == 0
    assert read(out) == originals
    counts = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert counts["removed"] == {"exact duplicate": 2}
    assert counts["removed_rows"]["exact duplicate"][0]["source"] == source(path, planted.exact[0])
    markdown = (tmp_path / "out.jsonl.report.md").read_text()
    assert "| exact duplicate | 2 |" in markdown and f"`{source(path, planted.exact[1])}`" in markdown
    assert "removed      2  exact duplicate" in capsys.readouterr().out
    md = write_clean_report(clean_file(path, tmp_path / "o2.jsonl"), tmp_path / "o2.jsonl", tmp_path / "r" / "c.md")
    assert md == tmp_path / "r" / "c.md" and (tmp_path / "r" / "c.json").is_file()
