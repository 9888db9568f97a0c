"""The streamed cache miss (sftkit.data.stream, load.stream_data) gives exactly what the in-memory path
(load.render_data) gives: the same examples in the same order, the same counters and report lines, for
hold-out, mixing, invalid records, cut and dropped examples, per-turn renders and workers; and a render
that fails half-way leaves no store behind."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sftkit.config import DataConfig
from sftkit.data import load as load_module
from sftkit.data import store, stream
from sftkit.data.load import load_data
from sftkit.data.messages import DataError, DataFileError
from sftkit.data.templates import prepare_tokenizer
from tests.conftest import ASSETS, SHARED_DATA, requires_shared, tokenizer_dir

DATA = ASSETS / "data"


@pytest.fixture()
def tokenizer():
    tok = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    prepare_tokenizer(tok)
    return tok


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 records: the small files here cross many chunk boundaries, as a big file does."""
    monkeypatch.setattr(stream, "CHUNK", 7)


def many_chats(path: Path, rows: int, broken: bool = False) -> Path:
    """`rows` distinct conversations (the asset chats, numbered), with unreadable lines among them when `broken`."""
    base = [json.loads(line) for line in (DATA / "chat_messages.jsonl").read_text().splitlines() if line.strip()]
    with path.open("w") as f:
        for i in range(rows):
            row = json.loads(json.dumps(base[i % len(base)]))
            user = next(m for m in row["messages"] if m["role"] == "user")
            user["content"] = f"[row {i}] {user['content']}"
            f.write(json.dumps(row) + "\n")
            if broken and i % 37 == 5:
                f.write('{"messages": [{"role": "bot", "content": "x"}]}\n{"messages": \n')
    return path


def assert_same(plain: tuple, streamed: tuple) -> None:
    """Examples, order, counters, report lines and prompts of both splits equal."""
    for a, b in zip(plain, streamed):
        assert isinstance(b.examples, store.StoredExamples)
        assert [(e.input_ids, e.labels, e.source) for e in a.examples] == [
            (e.input_ids, e.labels, e.source) for e in b.examples]
        assert b.report.summary() == a.report.summary()  # counts, tokens, drops, skips, notes, turns, per_turn cost
        assert b.left_out() == a.left_out() and b.warnings == a.warnings and b.prompts == a.prompts
        assert b.stored["read_lines"] == [load.summary() for load in a.loads] + ([a.mixing] if a.mixing else [])


def both(config: DataConfig, tokenizer, seed: int = 0) -> tuple[tuple, tuple]:
    return load_data(replace(config, cache=False), tokenizer, seed), load_data(config, tokenizer, seed)


CASES = {
    "eval_fraction": {"eval_fraction": 0.2},
    "mixed": {"mix": True, "eval_fraction": 0.1},
    "invalid skipped": {"broken": True, "skip_invalid": True, "eval_fraction": 0.1},
    "cut and dropped": {"max_length": 60},
    "per_turn, last": {"turns": "per_turn", "strategy": "last"},
    "workers": {"num_proc": 2, "eval_fraction": 0.3, "mix": True},
    "eval file": {"eval": True},
}


@pytest.mark.parametrize("case", CASES)
def test_a_streamed_miss_equals_the_in_memory_render(tmp_path: Path, tokenizer, case: str) -> None:
    options = dict(CASES[case])
    chats = str(many_chats(tmp_path / "chats.jsonl", 90, broken=options.pop("broken", False)))
    train: list = [chats]
    if options.pop("mix", False):  # every source kind: upsampled, sampled, taken as it is; a glob of two files
        for part in ("part-1.json", "part-2.json"):
            (tmp_path / part).write_text((DATA / "identity_alpaca.json").read_text())
        train = [{"path": chats, "weight": 2.5}, {"path": str(DATA / "dolly.json"), "samples": 3},
                 str(tmp_path / "part-*.json")]
    if options.pop("eval", False):
        options["eval"] = str(DATA / "fastchat_sharegpt.json")
    config = DataConfig(train=train, cache_dir=str(tmp_path / "cache"), **options)
    plain, streamed = both(config, tokenizer)
    assert_same(plain, streamed)
    assert_same(plain, load_data(config, tokenizer, 0))  # and the hit maps the same


def test_mixing_line_names_each_source_as_the_in_memory_mix(tmp_path: Path, tokenizer) -> None:
    chats = str(many_chats(tmp_path / "chats.jsonl", 40))
    config = DataConfig(train=[{"path": chats, "samples": 60}, {"path": str(DATA / "dolly.json"), "weight": 0.5}],
                        eval_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    plain, streamed = both(config, tokenizer, seed=3)
    assert plain[0].mixing and plain[0].mixing in streamed[0].summary()
    assert_same(plain, streamed)


@pytest.mark.parametrize("where", ["writing", "rendering", "invalid record"])
def test_a_render_that_fails_half_way_leaves_no_store(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch,
                                                      where: str) -> None:
    data = many_chats(tmp_path / "chats.jsonl", 60)
    config = DataConfig(train=[str(data)], eval_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    calls = []
    if where == "writing":  # a full disk, or a kill, after two chunks were written
        real_add = store.Writer.add

        def add(self, examples):
            calls.append(1)
            if len(calls) == 3:
                raise OSError("No space left on device")
            real_add(self, examples)

        monkeypatch.setattr(store.Writer, "add", add)
        failure: type[BaseException] = OSError
    elif where == "rendering":  # a bug or an interrupt inside the renderer
        real_many = stream.Renderer.render_many

        def render_many(self, records):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_many(self, records)

        monkeypatch.setattr(stream.Renderer, "render_many", render_many)
        failure = KeyboardInterrupt
    else:  # the last line of the file is invalid and nothing is skipped: raised by the counting pass
        with data.open("a") as f:
            f.write('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 5}]}\n')
        failure = DataFileError
    with pytest.raises(failure):
        load_data(config, tokenizer, seed=0)
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []  # no store, no temporary directory
    monkeypatch.undo()
    if where != "invalid record":
        plain, streamed = both(config, tokenizer)
        assert_same(plain, streamed)


@pytest.mark.parametrize("change", ["appended", "cut"])
def test_a_file_changed_between_the_two_readings_is_not_stored(tmp_path: Path, tokenizer,
                                                               monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    data = many_chats(tmp_path / "chats.jsonl", 30)
    real_count = stream.count_records

    def count_then_change(*args, **kwargs):
        counted = real_count(*args, **kwargs)
        lines = data.read_text().splitlines(keepends=True)
        data.write_text("".join(lines + lines[:1] if change == "appended" else lines[:-1]))
        return counted

    monkeypatch.setattr(stream, "count_records", count_then_change)
    with pytest.raises(DataError, match="changed while it was read"):
        load_data(DataConfig(train=[str(data)], cache_dir=str(tmp_path / "cache")), tokenizer, seed=0)
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_usable_example_raises_as_the_in_memory_path_and_stores_nothing(tmp_path: Path, tokenizer) -> None:
    config = DataConfig(train=[str(many_chats(tmp_path / "chats.jsonl", 20))], max_length=4,
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(Exception) as plain:
        load_data(replace(config, cache=False), tokenizer, seed=0)
    with pytest.raises(type(plain.value)) as streamed:
        load_data(config, tokenizer, seed=0)
    assert str(streamed.value) == str(plain.value)
    assert list((tmp_path / "cache").iterdir()) == []  # both splits were rendered, neither stored


def test_the_streamed_miss_holds_no_split_in_memory(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a list of all records nor of all examples: never more than a chunk goes to the writer at once,
    and the records are read from the files, not from `load_records`' lists."""
    monkeypatch.setattr(load_module, "read_files", lambda *a, **k: pytest.fail("read every record into memory"))
    sizes = []
    real_add = store.Writer.add
    monkeypatch.setattr(store.Writer, "add", lambda self, examples: sizes.append(len(examples)) or real_add(self, examples))
    train, _ = load_data(DataConfig(train=[str(many_chats(tmp_path / "c.jsonl", 50))], cache_dir=str(tmp_path / "x")),
                         tokenizer, seed=0)
    assert len(train.examples) == sum(sizes) == 50 and max(sizes) <= stream.CHUNK


@requires_shared
@pytest.mark.shared
@pytest.mark.slow
def test_streamed_equals_in_memory_on_every_shared_file_with_hold_out(tmp_path: Path, tokenizer) -> None:
    files = sorted(p for p in (SHARED_DATA / "instructions").iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
    assert files
    for path in files:
        config = DataConfig(train=[str(path)], skip_invalid=True, eval_fraction=0.1, cache_dir=str(tmp_path / path.name))
        try:
            plain = load_data(replace(config, cache=False), tokenizer, seed=0)
        except Exception as err:  # a file this config cannot train on fails the same way streamed
            with pytest.raises(type(err)):
                load_data(config, tokenizer, seed=0)
            continue
        assert_same(plain, load_data(config, tokenizer, seed=0))
