"""Hostile data: malformed and adversarial files never crash the readers or the renderer.

    .venv/bin/python -m pytest tests/test_fuzz.py -s               # default: a few thousand records, < 60 s
    .venv/bin/python -m pytest tests/test_fuzz.py -m slow -s       # 10x more, with fresh random seeds

Hypothesis writes files to a temporary directory — JSONL, JSON and Parquet rows of every supported
format with wrong types, missing fields, wrong role orders, deep nesting, huge strings and numbers,
control tokens and unpaired surrogates in text, non-object JSON, truncated and empty files, invalid
UTF-8 and random bytes — and gives them to `load_records` (on_error="raise" and "skip"); what loads
goes to `Renderer` with the real Qwen2.5 tokenizer and template. The only outcomes allowed are
records, a `DataError` (counted by kind), a counted skip, or a rendered example whose labels match
its ids. Any other exception fails the test with the input Hypothesis shrank it to; a hang trips
the per-example deadline or the test timeout. The counts are printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from sftkit.data.formats import load_records
from sftkit.data.messages import Conversation, DataError, Message, RawText
from sftkit.data.render import IGNORE_INDEX, Renderer, Tokenized
from tests.conftest import tokenizer_dir

OUTCOMES: Counter[str] = Counter()
RAN: set[str] = set()  # which fuzz tests ran in this session
MAX_LENGTH = 256

# -- strategies -----------------------------------------------------------------------------------
CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<|im_start|>assistant\n",
           "\ue000", "\ue001", "{{ raise_exception('x') }}", "{%", "%}", "\\u0000"]
ODD = ["\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "\r\n", "\u2028", "\U0001f600", "\u0301"]
ROLES = ["system", "user", "assistant", "tool", "bot", "", "USER", "human", "gpt", "function_call", "observation",
         "prompter", "model"]
KEYS = ["messages", "conversations", "conversation", "role", "content", "from", "value", "instruction", "input",
        "output", "prompt", "completion", "text", "system", "tools", "tool_calls", "history", "instances", "turns",
        "choices", "question_id", "message_tree_id", "replies", "rank", "function", "name", "arguments", "question",
        "answer", "response", "context", "synthetic", "deleted"]

small_text = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.sampled_from(CONTROL + ODD), st.text(max_size=6)), max_size=6).map("".join),
)
huge_text = st.integers(2_000, 20_000).flatmap(lambda n: st.sampled_from(["a", "ab ", "\u4e2d", "<|im_end|>"]).map(
    lambda unit: unit * (n // len(unit))))
text = st.one_of(small_text, small_text, small_text, small_text, small_text, huge_text)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), small_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), inner, max_size=4)),
    max_leaves=10,
)
deep = st.integers(1, 3000).map(lambda depth: json.loads("[" * min(depth, 900) + "]" * min(depth, 900)))
anything = st.one_of(json_values, text, deep)
function = st.fixed_dictionaries({"name": st.one_of(small_text, anything)},
                                 optional={"arguments": st.one_of(anything, json_values.map(json.dumps))})
tool_calls = st.lists(st.one_of(
    anything,
    st.fixed_dictionaries({"type": st.just("function"), "function": st.one_of(anything, function)}),
), max_size=3)


def turn(role_key: str, content_key: str, roles: list[str]) -> st.SearchStrategy[dict]:
    """A turn that is usually right-shaped, with any field possibly missing, mistyped or hostile."""
    return st.fixed_dictionaries({}, optional={
        role_key: st.one_of(st.sampled_from(roles), st.sampled_from(roles), anything),
        content_key: st.one_of(text, text, text, anything),
        "tool_calls": tool_calls,
        "name": st.one_of(small_text, anything),
    })


def plausible(role_key: str, content_key: str, roles: list[str]) -> st.SearchStrategy[list]:
    """User/assistant pairs in the right order; only the text (and the odd tool call) is hostile."""
    words = text.filter(str.strip)
    user_then_reply = st.tuples(
        st.fixed_dictionaries({role_key: st.just(roles[1]), content_key: words}),
        st.fixed_dictionaries({role_key: st.just(roles[2]), content_key: words}),
    )
    return st.lists(user_then_reply, min_size=1, max_size=3).map(lambda pairs: [t for p in pairs for t in p])


def conversation(role_key: str, content_key: str, roles: list[str]) -> st.SearchStrategy[list]:
    return st.one_of(plausible(role_key, content_key, roles), st.lists(turn(role_key, content_key, roles), max_size=5),
                     anything)


def optional(**fields: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=fields)


well_formed = st.builds(lambda turns, system: {"messages": turns, **system},
                        plausible("role", "content", ["system", "user", "assistant"]), optional(system=text))
records = st.one_of(    st.builds(lambda turns, extra: {"messages": turns, **extra},
              conversation("role", "content", ["system", "user", "assistant"]),
              optional(system=st.one_of(text, anything), tools=st.one_of(anything, anything.map(json.dumps)))),
    st.builds(lambda turns, extra: {"conversations": turns, **extra},
              conversation("from", "value", ["system", "human", "gpt"]), optional(system=anything)),
    optional(instruction=st.one_of(text, anything), input=st.one_of(text, anything), output=st.one_of(text, anything),
             system=text, history=st.one_of(st.lists(st.lists(st.one_of(text, anything), max_size=3)), anything)),
    optional(prompt=st.one_of(text, conversation("role", "content", ["system", "user", "assistant"]), anything),
             completion=st.one_of(text, anything), tools=anything),
    optional(text=st.one_of(text, anything), role=anything),
    st.builds(lambda node: {"message_tree_id": "t", "prompt": node}, json_values),
    optional(instruction=text, instances=st.lists(optional(input=anything, output=st.one_of(text, anything)))),
    optional(question_id=st.integers(), turns=st.lists(st.one_of(text, anything)),
             choices=st.one_of(anything, st.lists(optional(turns=st.lists(st.one_of(text, anything)))))),
    json_values,
)
rows = st.integers(0, 3).flatmap(lambda i: well_formed if i < 2 else records)  # half load: hostile text gets rendered


# -- fixtures and outcome bookkeeping -------------------------------------------------------------
@pytest.fixture(scope="module")
def renderer(request: pytest.FixtureRequest) -> Iterator[Renderer]:
    yield Renderer(AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5")), max_length=MAX_LENGTH)
    lines = ["", "fuzz outcomes (hostile data; every one a DataError, a counted skip or an example; 0 crashes):"]
    lines += [f"  {n:>7}  {what}" for what, n in sorted(OUTCOMES.items())]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)  # shown without -s, like capsys.disabled()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def new_file(workdir: Path, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(suffix=suffix, dir=workdir)
    os.close(handle)
    return Path(name)


def printable(err: DataError) -> str:
    """A DataError is for people: it must say something, and the CLI must be able to print it."""
    text = str(err)
    assert text.strip()
    text.encode("utf-8")
    return text


def load_and_render(path: Path, renderer: Renderer) -> None:
    """Load `path` both ways and render what loads; record every outcome; anything else propagates."""
    try:
        load_records(path)
        OUTCOMES["files loaded whole (on_error=raise)"] += 1
    except DataError as err:
        printable(err)
        OUTCOMES["files refused with a DataError (on_error=raise)"] += 1
    try:
        report = load_records(path, on_error="skip")
    except DataError as err:  # whole-file problems: unreadable, empty, unknown format
        printable(err)
        OUTCOMES[f"file error: {err.kind}"] += 1
        return
    for kind, n in report.skipped.items():
        OUTCOMES[f"record skipped: {kind}"] += n
    OUTCOMES["records loaded"] += len(report.records)
    render_all(report.records, renderer)


def render_all(records: list, renderer: Renderer) -> None:
    for result in renderer.render_many(records):
        if isinstance(result, DataError):
            printable(result)
            OUTCOMES[f"render error: {result.kind}"] += 1
            continue
        assert isinstance(result, Tokenized)
        assert len(result.input_ids) == len(result.labels) <= MAX_LENGTH
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(result.labels, result.input_ids))
        assert result.num_trained > 0
        OUTCOMES["examples rendered"] += 1


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # unpaired surrogates become invalid UTF-8 on disk


# -- the fuzz tests -------------------------------------------------------------------------------
FAST = settings(deadline=timedelta(seconds=10), database=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


def fuzz(strategy: st.SearchStrategy, examples: int) -> Callable:
    """(default test, @slow test with 10x the examples and fresh random seeds) for one check."""
    def pair(check: Callable) -> tuple[Callable, Callable]:
        fast = pytest.mark.timeout(240)(settings(FAST, max_examples=examples)(given(strategy)(check)))
        slow = pytest.mark.slow(pytest.mark.timeout(2400)(
            settings(FAST, max_examples=examples * 10, derandomize=False)(given(strategy)(check))))
        return fast, slow
    return pair


json_files = st.tuples(
    st.lists(rows, max_size=5),
    st.sampled_from([".jsonl", ".json"]),
    st.booleans(),  # ensure_ascii
    st.lists(st.one_of(st.binary(max_size=20), st.just(b""), st.just(b"\xef\xbb\xbf"), st.just(b"{\"messages\": [")),
             max_size=2),  # raw lines mixed in
    st.integers(0, 3),  # 0: whole, 1: cut in the middle, 2: a single object (.json), 3: as is
)


def check_json_files(renderer: Renderer, workdir: Path, case: tuple) -> None:
    RAN.add("json")
    batch, suffix, ascii_only, raw_lines, shape = case
    OUTCOMES["records generated"] += len(batch) + len(raw_lines)
    dumped = [encode(json.dumps(row, ensure_ascii=ascii_only)) for row in batch]
    if suffix == ".jsonl":
        data = b"\n".join(dumped + raw_lines) + b"\n"
    elif shape == 2 and batch:
        data = dumped[0]
    else:
        data = encode(json.dumps(batch, ensure_ascii=ascii_only)) + b"".join(raw_lines)
    if shape == 1:
        data = data[: len(data) // 2]
    path = new_file(workdir, suffix)
    path.write_bytes(data)
    load_and_render(path, renderer)


test_json_files, test_json_files_slow = fuzz(json_files, 600)(check_json_files)

parquet_files = st.tuples(
    st.lists(rows, min_size=1, max_size=5),
    st.integers(0, 2),  # 0: as written, 1: cut short, 2: a byte flipped
    st.integers(0, 10_000),
)


def check_parquet_files(renderer: Renderer, workdir: Path, case: tuple) -> None:
    RAN.add("parquet")
    batch, damage, where = case
    OUTCOMES["records generated"] += len(batch)
    path = new_file(workdir, ".parquet")
    try:
        pq.write_table(pa.Table.from_pylist(batch), path)
    except Exception:  # noqa: BLE001 — rows Arrow cannot store (mixed types, non-objects): one JSON-text column
        column = "text" if where % 2 else "messages"  # plain documents, or messages of the wrong type
        pq.write_table(pa.Table.from_pylist([{column: json.dumps(row)} for row in batch]), path)
        OUTCOMES["parquet: rows stored as JSON strings (Arrow has no schema for them)"] += 1
    data = bytearray(path.read_bytes())
    if damage == 1:
        data = data[: where % len(data)]
    elif damage == 2:
        data[where % len(data)] ^= 0x5A
    path.write_bytes(bytes(data))
    load_and_render(path, renderer)


test_parquet_files, test_parquet_files_slow = fuzz(parquet_files, 200)(check_parquet_files)

raw_files = st.tuples(st.binary(max_size=300),
                      st.sampled_from([".jsonl", ".json", ".parquet", ".arrow", ".txt", ".md"]))


def check_raw_files(renderer: Renderer, workdir: Path, case: tuple) -> None:
    RAN.add("raw")
    data, suffix = case
    OUTCOMES["records generated"] += 1
    path = new_file(workdir, suffix)
    path.write_bytes(data)
    load_and_render(path, renderer)


test_raw_files, test_raw_files_slow = fuzz(raw_files, 300)(check_raw_files)

extras = st.dictionaries(st.sampled_from(["tool_calls", "name", "reasoning_content", "tool_call_id", "content"]),
                         anything, max_size=2)
direct_messages = st.lists(st.builds(Message, st.sampled_from(ROLES), text, extras), max_size=5)
direct_records = st.lists(st.one_of(
    st.builds(Conversation, direct_messages, st.just("<fuzz>"), st.one_of(st.none(), st.lists(st.dictionaries(
        st.sampled_from(KEYS), anything, max_size=3), max_size=2))),
    st.builds(RawText, text, st.just("<fuzz>")),
), min_size=1, max_size=4)


def check_renderer_directly(renderer: Renderer, workdir: Path, batch: list) -> None:
    """Records built in code (no reader to validate them first) still end in an example or a DataError."""
    RAN.add("direct")
    OUTCOMES["records generated"] += len(batch)
    render_all(batch, renderer)


test_renderer_directly, test_renderer_directly_slow = fuzz(direct_records, 400)(check_renderer_directly)


def test_fuzz_found_every_kind_of_outcome(renderer: Renderer) -> None:
    """Runs last: the fuzz reached loading, skipping, rendering and refusing (else it tested nothing)."""
    if RAN != {"json", "parquet", "raw", "direct"}:
        pytest.skip("checks the outcomes of all four fuzz tests; only some ran")
    kinds = " ".join(OUTCOMES)
    for expected in ("records loaded", "examples rendered", "record skipped", "render error", "file error"):
        assert expected in kinds, f"the fuzz never produced {expected!r}: {dict(OUTCOMES)}"
    assert OUTCOMES["examples rendered"] > 50


def chat_line(reply: Any, **extra: Any) -> bytes:
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply, **extra}]
    return json.dumps({"messages": turns}).encode()


FOUND = {  # what the fuzz found: each crashed (TypeError, ValueError, RecursionError, ...) before the fix
    "lone surrogate": (".jsonl", chat_line("a\ud800b"), "render error: invalid text"),
    "5000-digit number": (".jsonl", b'{"text": ' + b"1" * 5000 + b"}", "record skipped: bad JSON"),
    "5000-digit number, .json": (".json", b'[{"text": ' + b"1" * 5000 + b"}]", "file error: bad JSON"),
    "nesting 100k deep": (".jsonl", b"[" * 100_000 + b"]" * 100_000, "record skipped: bad JSON"),
    "nesting 100k deep, .json": (".json", b"[" * 100_000 + b"]" * 100_000, "file error: bad JSON"),
    "nesting 900 deep in a message": (".jsonl", chat_line("x", meta=json.loads("[" * 900 + "]" * 900)),
                                      "render error: too deeply nested"),
    "tool call as a string": (".jsonl", chat_line("x", tool_calls=["get_weather"]), "record skipped: bad tool call"),
    "tool function as a string": (".jsonl", chat_line("x", tool_calls=[{"function": "f"}]),
                                  "record skipped: bad tool call"),
    "tool name as a number": (".jsonl", chat_line("x", tool_calls=[{"function": {"name": 5, "arguments": 7}}]),
                              "record skipped: bad tool call"),
    "deep tool arguments string": (".jsonl", chat_line("", tool_calls=[{"function": {
        "name": "f", "arguments": "[" * 5000 + "]" * 5000}}]), "examples rendered"),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_inputs_the_fuzz_found(name: str, renderer: Renderer, workdir: Path) -> None:
    suffix, data, expected = FOUND[name]
    path = new_file(workdir, suffix)
    path.write_bytes(data)
    before = Counter(OUTCOMES)
    load_and_render(path, renderer)
    assert (OUTCOMES - before)[expected] == 1, dict(OUTCOMES - before)


def test_damaged_parquet_with_invalid_utf8(renderer: Renderer, workdir: Path) -> None:
    """A flipped byte in a string page: pyarrow raised UnicodeDecodeError (a ValueError, not an ArrowException)."""
    path = new_file(workdir, ".parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "\u4e2d" * 400}]), path, compression="NONE")
    data = bytearray(path.read_bytes())
    at = data.index("\u4e2d".encode())
    data[at] = 0xBE  # not a UTF-8 lead byte
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="unreadable parquet file: .*utf-8"):
        load_records(path, on_error="skip")
