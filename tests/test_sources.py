"""Readers: every row tagged with file:line (JSONL, text) or file:#index (JSON, Parquet, Arrow)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftkit.data.formats import LoadReport
from sftkit.data.messages import DataError, DataFileError, Problems
from sftkit.data.sources import expand_paths, read_paths, read_rows
from tests.conftest import ASSETS

DATA = ASSETS / "data"


def test_jsonl_sources_are_1_based_lines_and_blank_lines_are_skipped() -> None:
    path = DATA / "broken_mixed.jsonl"
    rows = list(read_rows(path))
    assert [source for source, _ in rows] == [f"{path}:{n}" for n in (1, 2, 4, 5, 6, 7, 8, 9, 10)]
    assert rows[0][1] == {"messages": [{"role": "user", "content": "Hello"},
                                       {"role": "assistant", "content": "Hi there."}]}


def test_jsonl_bad_line_and_non_object_come_back_as_errors_in_place() -> None:
    path = DATA / "broken_mixed.jsonl"
    rows = dict(read_rows(path))
    bad_json, not_object = rows[f"{path}:2"], rows[f"{path}:7"]
    assert isinstance(bad_json, DataError) and bad_json.kind == "bad JSON"
    assert str(bad_json) == (f"{path}:2: bad JSON: Expecting ',' delimiter (column 48)"
                             " — each line must be one complete JSON object")
    assert isinstance(not_object, DataError) and not_object.kind == "not an object"
    assert str(not_object) == f"{path}:7: not an object: got list — each record must be a JSON object ({{...}})"


def test_jsonl_with_bom_crlf_and_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes('\ufeff{"text": "a"}\r\n\r\n{"text": "b"}\r\n'.encode() + b"\xff\n")
    rows = list(read_rows(path))
    assert rows[:2] == [(f"{path}:1", {"text": "a"}), (f"{path}:3", {"text": "b"})]
    source, err = rows[2]
    assert source == f"{path}:4" and isinstance(err, DataError)
    assert str(err) == f"{path}:4: bad encoding: invalid start byte at byte 0 of the line — save the file as UTF-8"


def test_json_list_sources_are_0_based_indexes() -> None:
    path = DATA / "identity_alpaca.json"
    rows = list(read_rows(path))
    assert [source for source, _ in rows] == [f"{path}:#0", f"{path}:#1", f"{path}:#2"]
    assert rows[0][1]["instruction"] == "hi"
    assert rows[2][1]["instruction"] == "Who are you?"


def test_json_single_object_is_one_row(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text('{"conversations": [{"from": "human", "value": "Hi"}]}')
    assert list(read_rows(path)) == [(f"{path}:#0", {"conversations": [{"from": "human", "value": "Hi"}]})]


def test_json_scalar_items_are_not_objects(tmp_path: Path) -> None:
    path = tmp_path / "mixed.json"
    path.write_text('[{"text": "a"}, "b", null]')
    rows = list(read_rows(path))
    assert rows[0] == (f"{path}:#0", {"text": "a"})
    assert [str(err) for _, err in rows[1:]] == [
        f"{path}:#1: not an object: got string — each record must be a JSON object ({{...}})",
        f"{path}:#2: not an object: got null — each record must be a JSON object ({{...}})",
    ]


def test_bad_json_document_names_its_line_and_column() -> None:
    path = DATA / "broken_document.json"
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(info.value) == (f"{path}:5: bad JSON: Expecting ',' delimiter (column 5) — a .json file "
                               "holds one JSON document; for one object per line name it .jsonl")
    assert info.value.kind == "bad JSON"


def test_parquet_rows_keep_arrow_nulls_for_the_adapters_to_drop() -> None:
    path = DATA / "chat_messages.parquet"
    rows = list(read_rows(path))
    assert [source for source, _ in rows] == [f"{path}:#{i}" for i in range(4)]
    first = rows[0][1]["messages"][0]
    assert first == {"role": "system", "content": "You are a concise assistant.", "reasoning_content": None}
    assert rows[3][1]["messages"][1]["reasoning_content"] == "The key facts are the new day and the reason."


@pytest.mark.parametrize("writer", ["file", "stream"])
def test_arrow_ipc_file_and_stream(tmp_path: Path, writer: str) -> None:
    table = pa.Table.from_pylist([{"prompt": "1+1?", "completion": "2"}, {"prompt": "2+2?", "completion": "4"}])
    path = tmp_path / "data.arrow"
    new = pa.ipc.new_file if writer == "file" else pa.ipc.new_stream
    with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as out:
        out.write_table(table)
    assert list(read_rows(path)) == [(f"{path}:#0", {"prompt": "1+1?", "completion": "2"}),
                                     (f"{path}:#1", {"prompt": "2+2?", "completion": "4"})]


def test_unreadable_parquet_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken.parquet: unreadable parquet file: "):
        list(read_rows(path))


def test_parquet_written_by_pyarrow_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Why?", "answer": "Because."}]), path)
    assert list(read_rows(path)) == [(f"{path}:#0", {"question": "Why?", "answer": "Because."})]


def test_txt_splits_on_separator_lines_and_names_each_documents_first_line() -> None:
    path = DATA / "pretrain.txt"
    assert list(read_rows(path)) == [
        (f"{path}:1", {"text": "The river rose after three days of rain.\n"
                                "By morning the low fields were under water."}),
        (f"{path}:6", {"text": "Bread needs flour, water, salt and time.\nYeast does the rest."}),
        (f"{path}:11", {"text": "A short third document."}),
    ]


def test_markdown_is_one_document_even_with_a_rule() -> None:
    path = DATA / "pretrain.md"
    assert list(read_rows(path)) == [
        (f"{path}:1", {"text": "# Field notes\n\nSwifts sleep on the wing.\n\n---\n\nThey land only to nest."}),
    ]


def test_whitespace_only_text_file_has_no_documents(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n---\n\n")
    assert list(read_rows(path)) == []


def test_missing_file_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_rows(tmp_path / "absent.jsonl")
    assert str(info.value) == f"{tmp_path / 'absent.jsonl'}: not found: no such file"
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError) as info:
        read_rows(csv)
    assert str(info.value) == (f"{csv}: unsupported file type: '.csv' — use one of .jsonl, .json, .parquet, "
                               ".arrow, .txt, .md")


def test_data_file_error_lists_errors_count_and_the_way_out() -> None:
    errors = [DataError("a.jsonl:3", "unknown role: 'bot'", "messages[1].role"),
              DataError("a.jsonl:9", "empty reply: the assistant message is empty", "messages[1].content")]
    err = DataFileError("a.jsonl", errors, count=2, rows=12, stopped=False)
    assert isinstance(err, ValueError) and isinstance(err, DataError)
    assert err.kind == "invalid records" and err.errors == errors and err.count == 2
    assert str(err) == (
        "a.jsonl: 2 invalid records in 12 rows:\n"
        "  a.jsonl:3: field 'messages[1].role': unknown role: 'bot'\n"
        "  a.jsonl:9: field 'messages[1].content': empty reply: the assistant message is empty\n"
        "fix the records, or skip and count invalid ones: data.skip_invalid=true in a recipe, --skip-invalid on the command line"
    )
    stopped = DataFileError("a.jsonl", errors[:1], count=1, rows=3, stopped=True)
    assert str(stopped).splitlines()[0] == "a.jsonl: 1 invalid record in the first 3 rows (stopped at max_errors):"


def test_load_report_summary() -> None:
    problems = Problems(skip=True, skipped=Counter({"unknown role": 2, "bad JSON": 1}))
    report = LoadReport([], problems, "messages", "x.jsonl", dropped=Counter({"trailing turn": 4}))
    assert report.summary() == ("x.jsonl (messages): 0 records; skipped invalid: 2 unknown role, 1 bad JSON;"
                                " dropped: 4 trailing turn")


def test_expand_paths_says_what_is_wrong_with_a_path(tmp_path: Path) -> None:
    (tmp_path / "hf" / "data").mkdir(parents=True)
    (tmp_path / "hf" / "README.md").write_text("# card\n")
    (tmp_path / "hf" / "data" / "train-00000.parquet").write_bytes(b"")
    # a directory with only text files reads them (plain-text pre-training); here the card is not wanted:
    # a Hugging Face snapshot keeps its data one level down, and the message says where
    assert expand_paths(tmp_path / "hf") == [tmp_path / "hf" / "README.md"]
    (tmp_path / "hf" / "README.md").unlink()
    with pytest.raises(DataError) as info:
        expand_paths(tmp_path / "hf")
    assert str(info.value) == (
        f"{tmp_path / 'hf'}: a directory without data files (.jsonl, .json, .parquet, .arrow, .txt, .md); its "
        f"subdirectories hold .parquet files: use a glob such as {tmp_path / 'hf' / '**' / '*.parquet'}")
    assert expand_paths(tmp_path / "hf" / "**" / "*.parquet") == [tmp_path / "hf" / "data" / "train-00000.parquet"]
    with pytest.raises(DataError, match=r"absent/train.jsonl: not found: no such file \(absent is not in .*\) — a "
                                        r"data path is a file, a directory of data files, or a glob"):
        expand_paths(tmp_path / "absent" / "train.jsonl")
    with pytest.raises(DataError, match="hf: a directory, not a file — this command reads one file: name it"):
        read_rows(tmp_path / "hf")


def test_read_paths_reads_the_files_of_a_glob_in_sorted_order(tmp_path: Path) -> None:
    for name, rows in (("part-2.jsonl", ['{"text": "c"}']), ("part-1.jsonl", ['{"text": "a"}', '{"text": "b"}'])):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    assert list(read_paths(tmp_path / "part-*.jsonl")) == [
        (f"{tmp_path / 'part-1.jsonl'}:1", {"text": "a"}), (f"{tmp_path / 'part-1.jsonl'}:2", {"text": "b"}),
        (f"{tmp_path / 'part-2.jsonl'}:1", {"text": "c"})]
    assert list(read_paths(tmp_path)) == list(read_paths(tmp_path / "part-*.jsonl"))
