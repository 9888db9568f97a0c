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
* ``.parquet`` / ``.arrow`` (pyarrow; Arrow IPC file or stream)  source ``path:#INDEX``.
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

            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
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
    import pyarrow as pa

    with pa.OSFile(str(path)) as source:  # read into memory: no batch outlives a mapping
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # `datasets` caches are Arrow *streams*, not files
            source.seek(0)
            table = pa.ipc.open_stream(source).read_all()
    yield from table.to_batches(max_chunksize=1024)


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
    """Kept objects as a list (or the one object), with the input's indent and escaping."""
    text = path.read_text(encoding="utf-8-sig")
    rows = [row for source, row in read_rows(path) if keep(source)]
    indent = re.search(r"\n([ \t]+)\S", text[:100_000])
    document: Any = rows
    if not text.lstrip().startswith("[") and len(rows) == 1:
        document = rows[0]
    dumped = json.dumps(document, indent=indent.group(1) if indent else None, ensure_ascii=text.isascii())
    temp.write_text(dumped + ("\n" if text.endswith("\n") else ""), encoding="utf-8")
    return len(rows)


def _write_table(path: Path, temp: Path, keep: Callable[[str], bool]) -> int:
    """Parquet / Arrow: the same schema and metadata, rows filtered by a mask."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    mask = pa.array([keep(source) for source, _ in read_rows(path)], type=pa.bool_())
    if path.suffix.lower() == ".parquet":
        table = pq.read_table(path).filter(mask)
        pq.write_table(table, temp)
        return table.num_rows
    with pa.OSFile(str(path)) as source:
        try:
            reader, new = pa.ipc.open_file(source), pa.ipc.new_file
        except pa.ArrowInvalid:
            source.seek(0)
            reader, new = pa.ipc.open_stream(source), pa.ipc.new_stream
        table = reader.read_all().filter(mask)
    with new(str(temp), table.schema) as writer:
        writer.write_table(table)
    return table.num_rows


def _write_text(path: Path, temp: Path, keep: Callable[[str], bool]) -> int:
    """Plain-text documents: kept ones, separated by `---` lines in a .txt file."""
    documents = [row["text"] for source, row in read_rows(path) if keep(source) and isinstance(row, dict)]
    temp.write_text("\n\n---\n\n".join(documents) + ("\n" if documents else ""), encoding="utf-8")
    return len(documents)


_WRITERS: dict[str, Callable[[Path, Path, Callable[[str], bool]], int]] = {
    ".jsonl": _write_jsonl, ".json": _write_json, ".parquet": _write_table, ".arrow": _write_table,
    ".txt": _write_text, ".md": _write_text,
}
