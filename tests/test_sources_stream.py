"""Arrow / Parquet / JSON / text files read and written (`sftkit data clean`) a batch at a time
(sftkit.data.sources, issue 18): memory flat in the file's size, outputs exactly what the whole-file
code wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftkit.data import sources
from sftkit.data.messages import DataError
from sftkit.data.sources import read_rows, write_rows_like
from tests.conftest import ASSETS, SHARED_DATA

IPC = {"file": (pa.ipc.new_file, pa.ipc.open_file), "stream": (pa.ipc.new_stream, pa.ipc.open_stream)}


def write_ipc(path: Path, kind: str, batches: list[pa.RecordBatch], schema: pa.Schema) -> Path:
    with IPC[kind][0](str(path), schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return path


def read_ipc(path: Path) -> tuple[str, pa.Table]:
    """(file | stream, the whole table) of an Arrow IPC file, read the plain way."""
    with pa.OSFile(str(path)) as source:
        try:
            return "file", pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return "stream", pa.ipc.open_stream(source).read_all()


def drop_every_third(source: str) -> bool:
    """Keep a row unless its number (`path:#INDEX` 0-based, `path:LINE` 1-based) is 2 mod 3."""
    return int(re.split(r":#?", source)[-1]) % 3 != 2


# -- 1. Arrow IPC read a batch at a time ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "stream"])
def test_arrow_batches_are_read_one_at_a_time_and_resliced_to_1024_rows(tmp_path: Path, kind: str) -> None:
    schema = pa.schema([("n", pa.int64()), ("text", pa.string())], metadata={b"origin": b"test"})
    sizes = [3000, 5, 0, 1500]
    batches, start = [], 0
    for size in sizes:
        batches.append(pa.record_batch([list(range(start, start + size)),
                                        [f"row {i} é" for i in range(start, start + size)]], schema=schema))
        start += size
    path = write_ipc(tmp_path / "data.arrow", kind, batches, schema)

    assert [b.num_rows for b in sources._arrow_batches(path)] == [1024, 1024, 952, 5, 1024, 476]
    rows = list(read_rows(path))
    assert rows == [(f"{path}:#{i}", {"n": i, "text": f"row {i} é"}) for i in range(4505)]


@pytest.mark.parametrize("kind", ["file", "stream"])
def test_a_damaged_offset_is_a_data_error_not_a_crash(tmp_path: Path, kind: str) -> None:
    """A mapped batch is checked before it is read: an offset past its data would read past the mapping."""
    offsets = pa.py_buffer(np.array([0, 10_000_000, 6], dtype=np.int32).tobytes())
    bad = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"abcdef")])
    schema = pa.schema([("text", pa.string())])
    good = pa.record_batch([["fine"] * 3], schema=schema)
    path = write_ipc(tmp_path / "bad.arrow", kind, [good, pa.record_batch([bad], schema=schema)], schema)
    seen = []
    with pytest.raises(DataError, match=r"bad\.arrow: unreadable arrow file: .*out of bounds"):
        for source, _ in read_rows(path):
            seen.append(source)
    assert seen == [f"{path}:#{i}" for i in range(3)]  # the good batch first, as with Parquet


@pytest.mark.parametrize("kind", ["file", "stream"])
def test_reading_a_100_mb_arrow_file_holds_one_batch_not_the_file(tmp_path: Path, kind: str) -> None:
    rows, text = 200_000, "x" * 500
    schema = pa.schema([("n", pa.int64()), ("text", pa.string())])
    path = tmp_path / "big.arrow"
    with IPC[kind][0](str(path), schema) as writer:
        for start in range(0, rows, 50_000):  # 4 batches of ~25 MB
            writer.write_batch(pa.record_batch([pa.array(range(start, start + 50_000)),
                                                pa.array([text] * 50_000)], schema=schema))
    size = path.stat().st_size
    assert size > 100e6
    base, peak, count = pa.total_allocated_bytes(), 0, 0
    for source, row in read_rows(path):
        assert row["n"] == count and source == f"{path}:#{count}"
        count += 1
        if count % 500 == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
    assert count == rows and row["text"] == text
    assert peak < size / 10, (peak, size)

    def keep(source: str) -> bool:  # `data clean` writing the same file back: as flat
        nonlocal peak
        peak = max(peak, pa.total_allocated_bytes() - base)
        return drop_every_third(source)

    out = tmp_path / "out.arrow"
    assert write_rows_like(path, out, keep) == rows - rows // 3
    assert peak < size / 10, (peak, size)
    written = read_ipc(out)
    assert written[0] == kind and written[1].column("n").to_pylist() == [n for n in range(rows) if n % 3 != 2]


# -- 2. write_rows_like a batch / an object / a document at a time ----------------------------------------
def expected_json(path: Path, keep) -> str:
    """What the whole-file writer wrote: `json.dumps` of the kept list (or the one object)."""
    text = path.read_text(encoding="utf-8-sig")
    document = json.loads(text)
    listed = isinstance(document, list)
    rows = [row for i, row in enumerate(document if listed else [document]) if keep(f"{path}:#{i}")]
    indent = re.search(r"\n([ \t]+)\S", text[:100_000])
    return json.dumps(rows if listed or len(rows) != 1 else rows[0], indent=indent.group(1) if indent else None,
                      ensure_ascii=text.isascii()) + ("\n" if text.endswith("\n") else "")


def json_fixtures() -> list[Path]:
    files = sorted((ASSETS / "data").glob("*.json"))
    if (SHARED_DATA / "instructions").is_dir():
        files += sorted((SHARED_DATA / "instructions").glob("*.json"))
    return files


@pytest.mark.parametrize("path", json_fixtures(), ids=lambda p: p.name)
def test_json_written_an_object_at_a_time_is_json_dumps_byte_for_byte(tmp_path: Path, path: Path) -> None:
    try:
        bad = {source for source, row in read_rows(path) if not isinstance(row, dict)}  # clean drops these
    except DataError:
        pytest.skip("not JSON: clean never writes it")
    for rule in (drop_every_third, lambda source: True, lambda source: False):
        keep = lambda source, rule=rule: source not in bad and rule(source)  # noqa: E731
        out = tmp_path / "out.json"
        written = write_rows_like(path, out, keep)
        assert out.read_text(encoding="utf-8") == expected_json(path, keep)
        assert written == len(json.loads(out.read_text()))


ROWS = [{"instruction": "Say hi", "output": "hi\nthere", "tags": [], "meta": {}},
        {"instruction": "Größe?", "output": "中文 \"quoted\" \\ tab\t", "tags": ["a", {"b": [1, 2.5, None]}]},
        {"instruction": "three", "output": "", "n": True},
        {"instruction": "four", "output": "x"}]


@pytest.mark.parametrize("indent", [None, 2, 4, "\t", " \t"], ids=repr)
@pytest.mark.parametrize("ascii_only", [True, False], ids=["ascii", "utf8"])
@pytest.mark.parametrize("rows", [ROWS, ROWS[:1], ROWS[1:2], []], ids=["four", "one", "one-non-ascii", "none"])
@pytest.mark.parametrize("newline", ["\n", ""], ids=["newline", "no-newline"])
def test_json_edge_cases_byte_for_byte(tmp_path: Path, indent, ascii_only: bool, rows: list, newline: str) -> None:
    path = tmp_path / "in.json"
    path.write_text(json.dumps(rows, indent=indent, ensure_ascii=ascii_only) + newline, encoding="utf-8")
    for keep in (drop_every_third, lambda source: True, lambda source: False, lambda source: source.endswith("#0")):
        out = tmp_path / "out.json"
        write_rows_like(path, out, keep)
        assert out.read_text(encoding="utf-8") == expected_json(path, keep)


def test_json_exact_bytes_of_a_tab_indented_non_ascii_list(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_text('\ufeff[\r\n\t{"a": "é", "b": [1, {}]},\r\n\t{"a": "x"},\r\n\t{"a": "y"}\r\n]\r\n',
                    encoding="utf-8")  # a BOM and CRLF: read as `read_text` reads them, written with \n
    out = tmp_path / "out.json"
    assert write_rows_like(path, out, lambda source: not source.endswith("#1")) == 2
    assert out.read_bytes() == ('[\n\t{\n\t\t"a": "é",\n\t\t"b": [\n\t\t\t1,\n\t\t\t{}\n\t\t]\n\t},\n'
                                '\t{\n\t\t"a": "y"\n\t}\n]\n').encode()


@pytest.mark.parametrize("keep, expected", [(True, '{\n  "a": "é"\n}'), (False, "[]")])
def test_a_json_file_of_one_object_keeps_its_shape(tmp_path: Path, keep: bool, expected: str) -> None:
    path = tmp_path / "one.json"
    path.write_text('{\n  "a": "é"\n}', encoding="utf-8")
    out = tmp_path / "out.json"
    assert write_rows_like(path, out, lambda source: keep) == int(keep)
    assert out.read_text(encoding="utf-8") == expected


def test_text_documents_written_as_they_come(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(f"doc {i}\nline two\n---" for i in range(7)) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert write_rows_like(path, out, lambda source: source != f"{path}:7") == 6  # drops doc 2
    expected = "\n\n---\n\n".join(f"doc {i}\nline two" for i in range(7) if i != 2) + "\n"
    assert out.read_bytes() == expected.encode()
    assert write_rows_like(path, out, lambda source: False) == 0 and out.read_bytes() == b""
    md = ASSETS / "data" / "pretrain.md"
    assert write_rows_like(md, out, lambda source: True) == 1
    assert out.read_text(encoding="utf-8") == next(read_rows(md))[1]["text"] + "\n"


def table_of(n: int) -> pa.Table:
    schema = pa.schema([("n", pa.int64()), ("text", pa.string()), ("tags", pa.list_(pa.string()))],
                       metadata={b"huggingface": b'{"info": {"features": {}}}'})
    return pa.table([list(range(n)), [f"row {i} ü" if i % 7 else None for i in range(n)],
                     [[str(i)] * (i % 3) for i in range(n)]], schema=schema)


def test_parquet_filtered_a_batch_at_a_time_keeps_schema_metadata_and_few_row_groups(tmp_path: Path) -> None:
    table = table_of(5000)
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=1500)
    out = tmp_path / "out.parquet"
    assert write_rows_like(path, out, drop_every_third) == 5000 - 1666
    expected = table.filter(pa.array([i % 3 != 2 for i in range(5000)]))
    written = pq.ParquetFile(out)
    assert written.schema_arrow.equals(pq.ParquetFile(path).schema_arrow, check_metadata=True)
    assert written.read().equals(expected) and written.metadata.num_row_groups == 1
    assert write_rows_like(path, out, lambda source: False) == 0
    assert pq.read_table(out).num_rows == 0
    assert pq.read_schema(out).equals(pq.read_schema(path), check_metadata=True)


@pytest.mark.parametrize("kind", ["file", "stream"])
def test_arrow_filtered_a_batch_at_a_time_keeps_its_format_and_schema(tmp_path: Path, kind: str) -> None:
    table = table_of(5000)
    path = write_ipc(tmp_path / "in.arrow", kind, table.to_batches(max_chunksize=1800), table.schema)
    out = tmp_path / "out.arrow"
    assert write_rows_like(path, out, drop_every_third) == 5000 - 1666
    written_kind, written = read_ipc(out)
    assert written_kind == kind and written.schema.equals(table.schema, check_metadata=True)
    assert written.equals(table.filter(pa.array([i % 3 != 2 for i in range(5000)])))
    assert write_rows_like(path, out, lambda source: False) == 0
    assert read_ipc(out)[0] == kind and read_ipc(out)[1].equals(table.slice(0, 0))


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".md", ".parquet"])
def test_every_asset_file_written_back_without_every_third_row(tmp_path: Path, suffix: str) -> None:
    """The rows `write_rows_like` keeps read back as exactly the kept rows of the original (same sources
    for the line-numbered formats, same rows in order for all)."""
    files = sorted((ASSETS / "data").glob(f"*{suffix}"))
    assert files
    for path in files:
        rows = [(source, row) for source, row in read_rows(path) if drop_every_third(source)]
        out = tmp_path / f"out{suffix}"
        assert write_rows_like(path, out, drop_every_third) == len(rows), path  # bad JSON lines too, as they were
        kept = [row for _, row in rows if isinstance(row, dict)]
        assert [row for _, row in read_rows(out) if isinstance(row, dict)] == kept, path
