"""Dataset files <-> rows: read into rows tagged with where they came from; written back in their own shape.

    from sftkit.data.sources import read_rows
    for source, row in read_rows("data/train.jsonl"):
        ...   # source == "data/train.jsonl:12"; row is a dict, or a DataError for an unreadable row

Used by `sftkit.data.formats.load_records` (and so by `sftkit train` / `sftkit data preview`),
which reads every file `expand_paths` names: a file, a glob (``data/part-*.jsonl``, ``**`` too; the
matches in sorted order) or a directory (its data files in sorted order). A glob or a directory is
one dataset: its files share one format, detected from the first row.

Supported files, by suffix:

* ``.jsonl``  one JSON object per line; empty lines are skipped; source ``path:LINE`` (1-based).
* ``.json``   a top-level list of objects, or ONE object (one row); source ``path:#INDEX`` (0-based).
* ``.parquet`` / ``.arrow`` (pyarrow; Arrow IPC file, memory-mapped, or stream)  source ``path:#INDEX``;
  read 1024 rows at a time, so memory does not grow with the file.
* ``.txt`` / ``.md``  plain text for pre-training, yielded as ``{"text": ...}`` rows.
  A ``.txt`` file holds one document, or several separated by lines that contain only ``---``;
  a ``.md`` file is always ONE document (in Markdown ``---`` is a rule or front matter).
  Blank lines around a document are removed, empty documents are ignored; source ``path:LINE``
  names the document's first line.

A row that cannot be read (a bad JSON line, a list where an object belongs) is yielded as a
`DataError` in place of the row, so the caller decides whether to raise or to skip it while the
rest of the file still loads. Problems that spoil the whole file (missing file, unknown suffix,
a ``.json`` document that does not parse) raise `DataError` at once.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from sftkit.data.messages import DataError
from sftkit.durable import atomic_file

Row = dict[str, Any]
RowOrError = tuple[str, Row | DataError]

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow") + TEXT_SUFFIXES
DOC_SEPARATOR = "---"
STRUCTURED = (".jsonl", ".json", ".parquet", ".arrow")
GLOB_CHARS = frozenset("*?[")
BATCH_ROWS = 1024  # rows of a Parquet / Arrow file converted at a time


def expand_paths(path: str | Path) -> list[Path]:
    """The files `path` names: itself (a file), the sorted matches of a glob, or a directory's data files.

    A directory gives its files with a structured suffix (.jsonl .json .parquet .arrow), or, when it
    has none, its .txt / .md files; hidden files are left out, subdirectories are not searched. A
    directory holding several structured suffixes (a `datasets` save: .arrow shards + state.json) is
    a `DataError` that asks for a glob, as are an empty glob and a directory without data files.
    """
    text = str(path)
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _directory_files(path)
    if GLOB_CHARS & set(text):
        matches = sorted(Path(match) for match in glob.glob(text, recursive=True) if Path(match).is_file())
        if not matches:
            raise DataError(text, "no file matches this pattern",
                            hint="check the directory and the suffix, e.g. data/*.jsonl (** for subdirectories)")
        return matches
    parent = next((p for p in path.parents if p.is_dir()), Path("."))
    missing = path if parent == path.parent else path.relative_to(parent).parts[0]
    raise DataError(text, f"not found: no such file{'' if parent == path.parent else f' ({missing} is not in {parent})'}",
                    hint="a data path is a file, a directory of data files, or a glob such as data/*.jsonl")


def _directory_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    structured = [p for p in files if p.suffix.lower() in STRUCTURED]
    chosen = structured or [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    suffixes = sorted({p.suffix.lower() for p in chosen})
    if len(suffixes) > 1:
        raise DataError(str(directory), f"a directory with {' and '.join(suffixes)} files: which are the data?",
                        hint=f"name them with a glob, e.g. {directory / ('*' + suffixes[0])}")
    if not chosen:
        below = sorted({p.suffix.lower() for p in directory.rglob("*") if p.suffix.lower() in SUFFIXES})
        where = (f"; its subdirectories hold {', '.join(below)} files: use a glob such as "
                 f"{directory / '**' / ('*' + below[0])}" if below else "")
        raise DataError(str(directory), f"a directory without data files ({', '.join(SUFFIXES)}){where}")
    return chosen


def read_paths(path: str | Path) -> Iterator[RowOrError]:
    """`read_rows` of every file `expand_paths(path)` names, one after the other."""
    return chain.from_iterable(read_rows(file) for file in expand_paths(path))


def read_rows(path: str | Path) -> Iterator[RowOrError]:
    """Yield `(source, row)` for every row of the file `path`; see the module docstring for the formats."""
    path = Path(path)
    if path.is_dir():
        raise DataError(str(path), "a directory, not a file", hint="this command reads one file: name it")
    if not path.is_file():
        raise DataError(str(path), "not found: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".parquet", ".arrow"):
        return _read_arrow(path)
    if suffix in TEXT_SUFFIXES:
        return _read_text(path)
    raise DataError(
        str(path), f"unsupported file type: {suffix or 'no suffix'!r}",
        hint=f"use one of {', '.join(SUFFIXES)}",
    )


def _object_or_error(source: str, value: Any) -> Row | DataError:
    if isinstance(value, dict):
        return value
    return DataError(
        source, f"not an object: got {json_type(value)}",
        hint="each record must be a JSON object ({...})",
    )


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
             float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_jsonl(path: Path) -> Iterator[RowOrError]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            source = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                problem = f"bad encoding: {err.reason} at byte {err.start} of the line"
                yield source, DataError(source, problem, hint="save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))  # so that columns count on this line
            except json.JSONDecodeError as err:
                yield source, DataError(source, f"bad JSON: {err.msg} (column {err.colno})",
                                        hint="each line must be one complete JSON object")
                continue
            except (ValueError, RecursionError) as err:
                yield source, _beyond_limits(source, err)
                continue
            yield source, _object_or_error(source, value)


def _beyond_limits(source: str, err: ValueError | RecursionError) -> DataError:
    """Valid JSON that Python will not decode: nested too deeply, or a number of thousands of digits."""
    if isinstance(err, RecursionError):
        return DataError(source, "bad JSON: nested too deeply to read", hint="flatten the record")
    return DataError(source, f"bad JSON: {str(err).split(':')[0]}", hint="write huge numbers as strings")


def _read_json(path: Path) -> Iterator[RowOrError]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(str(path), f"bad encoding: {err.reason} at byte {err.start}",
                        hint="save the file as UTF-8") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        hint = "a .json file holds one JSON document; for one object per line name it .jsonl"
        raise DataError(f"{path}:{err.lineno}", f"bad JSON: {err.msg} (column {err.colno})",
                        hint=hint) from None
    except (ValueError, RecursionError) as err:
        raise _beyond_limits(str(path), err) from None
    rows = document if isinstance(document, list) else [document]
    return ((f"{path}:#{index}", _object_or_error(f"{path}:#{index}", value))
            for index, value in enumerate(rows))


def _read_arrow(path: Path) -> Iterator[RowOrError]:
    import pyarrow as pa

    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        else:
            batches = _arrow_batches(path)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}:#{index}", row
                index += 1
    except (pa.ArrowException, OSError, ValueError) as err:  # ValueError: e.g. invalid UTF-8 in a damaged page
        raise DataError(str(path), f"unreadable {path.suffix[1:]} file: {err}") from None


def _arrow_batches(path: Path) -> Iterator[Any]:
    """The record batches of an Arrow IPC file (memory-mapped, one batch at a time) or stream (what
    `datasets` caches hold), none over `BATCH_ROWS` rows. The mapping is open only while the generator
    runs: the consumer converts each batch (`to_pylist`) before it asks for the next."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        _, batches = _open_ipc(source)
        for batch in batches:
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(start, BATCH_ROWS)


def _open_ipc(source: Any) -> tuple[Any, Iterator[Any]]:
    """(reader, its batches one at a time, each checked) of a mapped Arrow IPC file, or stream."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:  # `datasets` caches are Arrow *streams*, not files
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        batches = iter(reader)
    return reader, (_checked(batch) for batch in batches)


def _checked(batch: Any) -> Any:
    """`batch`, its offsets and UTF-8 checked (ArrowInvalid): a damaged offset in a mapped file points
    past the mapping, and reading it would crash the process rather than raise."""
    batch.validate(full=True)
    return batch


def _read_text(path: Path) -> Iterator[RowOrError]:
    try:
        lines = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n").split("\n")
    except UnicodeDecodeError as err:
        raise DataError(str(path), f"bad encoding: {err.reason} at byte {err.start}",
                        hint="save the file as UTF-8") from None
    split = path.suffix.lower() == ".txt"
    start, block = 1, list[str]()
    for number, line in enumerate(lines, start=1):
        if split and line.rstrip() == DOC_SEPARATOR:
            yield from _text_document(path, start, block)
            start, block = number + 1, []
        else:
            block.append(line)
    yield from _text_document(path, start, block)


def _text_document(path: Path, start: int, block: list[str]) -> Iterator[RowOrError]:
    """One document from its lines, without the blank lines around it; nothing if it is empty."""
    first = next((i for i, line in enumerate(block) if line.strip()), None)
    if first is None:
        return
    last = max(i for i, line in enumerate(block) if line.strip())
    yield f"{path}:{start + first}", {"text": "\n".join(block[first:last + 1])}


# -- writing rows in the shape they were read (`sftkit data clean`) -----------------------------
def write_rows_like(path: Path, out: Path, keep: Callable[[str], bool]) -> int:
    """Write the rows of `path` whose source `keep` accepts to `out`, in `path`'s own format and
    shape (a temporary file in `out`'s directory, then an atomic rename); returns rows written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as temp:
        return _WRITERS[path.suffix.lower()](path, temp, keep)


def _write_jsonl(path: Path, temp: Path, keep: Callable[[str], bool]) -> int:
    """Kept lines byte for byte (numbered as `read_rows` numbers them)."""
    written = 0
    with path.open("rb") as source, temp.open("wb") as target:
        for number, line in enumerate(source, start=1):
            if line.strip() and keep(f"{path}:{number}"):
                target.write(line if line.endswith(b"\n") else line + b"\n")
                written += 1
    return written


def _write_json(path: Path, temp: Path, keep: Callable[[str], bool]) -> int:
    """Kept objects as a list (or the one object), with the input's indent and escaping: the bytes
    `json.dumps(kept, indent=..., ensure_ascii=...)` gives, written an object at a time."""
    indent, ascii_only, listed, end = _json_layout(path)
    kept = (row for source, row in read_rows(path) if keep(source))
    with temp.open("w", encoding="utf-8") as target:
        if not listed:  # ONE object: itself if kept, else an empty list
            rows = list(kept)
            target.write(json.dumps(rows[0] if len(rows) == 1 else rows, indent=indent,
                                    ensure_ascii=ascii_only) + end)
            return len(rows)
        written = 0
        for row in kept:
            item = json.dumps(row, indent=indent, ensure_ascii=ascii_only)
            if indent is None:
                target.write(("[" if not written else ", ") + item)
            else:  # one level deeper than on its own: every line of it indented once more
                target.write(("[\n" if not written else ",\n") + indent + item.replace("\n", "\n" + indent))
            written += 1
        target.write(("[]" if not written else "]" if indent is None else "\n]") + end)
    return written


def _json_layout(path: Path) -> tuple[str | None, bool, bool, str]:
    """(indent, ASCII only, a top-level list, final newline) of a .json file, read in chunks: the indent
    of its first indented line within 100,000 characters; newlines read as `read_text` reads them."""
    with path.open(encoding="utf-8-sig") as handle:
        head = handle.read(100_000)
        indent = re.search(r"\n([ \t]+)\S", head)
        ascii_only, first, last = head.isascii(), head.lstrip()[:1], head[-1:]
        for chunk in iter(lambda: handle.read(1 << 20), ""):
            ascii_only = ascii_only and chunk.isascii()
            first, last = first or chunk.lstrip()[:1], chunk[-1]
    return indent.group(1) if indent else None, ascii_only, first == "[", "\n" if last == "\n" else ""


def _write_table(path: Path, temp: Path, keep: Callable[[str], bool]) -> int:
    """Parquet / Arrow: the same schema and metadata (Arrow: the same file or stream format), rows
    filtered a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".parquet":
        parquet = pq.ParquetFile(path)
        with pq.ParquetWriter(temp, parquet.schema_arrow) as writer:
            return _write_kept(path, parquet.iter_batches(batch_size=BATCH_ROWS), keep, writer.write_table,
                               group_bytes=64 << 20)  # a row group per batch would make thousands of tiny ones
    with pa.memory_map(str(path)) as source:
        reader, batches = _open_ipc(source)
        new = pa.ipc.new_file if isinstance(reader, pa.ipc.RecordBatchFileReader) else pa.ipc.new_stream
        with new(str(temp), reader.schema) as writer:
            return _write_kept(path, batches, keep, writer.write_table, group_bytes=0)


def _write_kept(path: Path, batches: Iterator[Any], keep: Callable[[str], bool], write: Callable[[Any], None],
                group_bytes: int) -> int:
    """Write the rows of `batches` whose source (`path:#INDEX`) `keep` accepts, `BATCH_ROWS` at a time,
    gathered into tables of at least `group_bytes` (the last one less) before each `write`."""
    import pyarrow as pa

    index = written = size = 0
    group: list[Any] = []
    for batch in batches:
        for start in range(0, batch.num_rows, BATCH_ROWS):
            part = batch.slice(start, BATCH_ROWS)
            mask = pa.array([keep(f"{path}:#{index + i}") for i in range(part.num_rows)], type=pa.bool_())
            index += part.num_rows
            kept = part.filter(mask)  # written before the mapping closes
            if kept.num_rows:
                group.append(kept)
                written += kept.num_rows
                size += kept.nbytes
            if group and size >= group_bytes:
                write(pa.Table.from_batches(group))
                group, size = [], 0
    if group:
        write(pa.Table.from_batches(group))
    return written


def _write_text(path: Path, temp: Path, keep: Callable[[str], bool]) -> int:
    """Plain-text documents: kept ones, separated by `---` lines in a .txt file, written as they come."""
    written = 0
    with temp.open("w", encoding="utf-8") as target:
        for source, row in read_rows(path):
            if keep(source) and isinstance(row, dict):
                target.write(("\n\n---\n\n" if written else "") + row["text"])
                written += 1
        target.write("\n" if written else "")
    return written


_WRITERS: dict[str, Callable[[Path, Path, Callable[[str], bool]], int]] = {
    ".jsonl": _write_jsonl, ".json": _write_json, ".parquet": _write_table, ".arrow": _write_table,
    ".txt": _write_text, ".md": _write_text,
}
