"""Clean a dataset file: duplicates, near-duplicates, short or over-long replies, boilerplate.

    sftkit data clean data/train.jsonl --out data/train.clean.jsonl
    sftkit data clean lima.json --out lima.clean.json --near-dup-threshold 0.8 --min-reply-chars 20 \\
        --tokenizer ../shared/data/tokenizers/qwen2.5 --max-tokens 2048 --drop-refusals \\
        --drop-pattern '^sorry,' --report lima.clean.md

The cleaned file has the input's format and row schema: the original rows, filtered, in their
order (JSONL lines are copied byte for byte). It is written to a temporary name beside `--out` and
renamed; the input is never modified. A report says what was removed and why, with line numbers:
`<out>.report.md` and `<out>.report.json` unless `--report FILE.md` names another place.

The unit of cleaning is the row (one `source`): a row that gives several records (self-instruct
instances) is kept or removed whole, and removed when any of its records fails a check. Checks run
in this order and a row is counted under the first it fails: invalid (`--skip-invalid`),
unrenderable / too long (`--max-tokens`, needs `--tokenizer`), short reply (`--min-reply-chars`),
pattern (`--drop-pattern`, `--drop-refusals`), then among the rows left: exact duplicate, near
duplicate (a later row is removed, the first one kept; `sftkit.data.tools.dedupe` says how: normalised
text for exact duplicates, Jaccard of word 3-grams via MinHash LSH, confirmed exactly, for near ones).

The file is read as a stream (`formats.stream_records`), a row at a time, rendered 4096 records at a
time when `--max-tokens` asks: memory holds the duplicate index (`dedupe.DuplicateFinder`) and the
removed rows' sources, not the records.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sftkit.data.formats import stream_records
from sftkit.data.messages import DataError, Problems, Record
from sftkit.data.sources import write_rows_like
from sftkit.data.tools.dedupe import (
    DEFAULT_NEAR_THRESHOLD,
    DuplicateFinder,
    Sources,
    Unit,
    group_units,
    replies,
)

RENDER_CHUNK = 4096  # records rendered at a time for --max-tokens

# Boilerplate of distilled chat data (the phrases removed by the "unfiltered" Alpaca/Vicuna/WizardLM
# cleanups); matched case-insensitively anywhere in an assistant reply. `--drop-refusals` uses them.
DEFAULT_REFUSALS = (
    r"\bas an ai language model\b",
    r"\bas an ai (?:assistant|model|chatbot)\b",
    r"\bi(?:['’]m| am) (?:sorry|afraid),? but i (?:can(?:not|['’]t)|am unable|(?:['’]m|am) not able)\b",
    r"\bi (?:can(?:not|['’]t)|am unable to|(?:['’]m|am) not able to) (?:help|assist|comply) with (?:that|this)\b",
    r"\bi do(?: not|n['’]t) have (?:personal )?(?:opinions|feelings|emotions|beliefs|preferences)\b",
    r"\bmy (?:knowledge )?cut-?off date\b",
    r"\bas of my (?:last )?(?:knowledge )?(?:update|training)\b",
    r"\b(?:openai|my developers) (?:has|have) (?:programmed|trained) me\b",
)


def short_source(source: str) -> str:
    """`dir/file.jsonl:12` -> `file.jsonl:12` (reports name the file once, in full)."""
    where, sep, line = source.rpartition(":")
    return f"{Path(where).name}{sep}{line}" if sep else source


# --- filters -------------------------------------------------------------------------------------

def compile_patterns(patterns: Sequence[str] = (), refusals: bool = False) -> list[re.Pattern[str]]:
    """`patterns` (plus `DEFAULT_REFUSALS` when asked), compiled case-insensitively."""
    compiled = []
    for pattern in [*(DEFAULT_REFUSALS if refusals else ()), *patterns]:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as err:
            raise DataError("--drop-pattern", f"bad regular expression {pattern!r}: {err}") from None
    return compiled


def reply_problem(record: Record, min_reply_chars: int = 0,
                  patterns: Sequence[re.Pattern[str]] = ()) -> tuple[str, str] | None:
    """(reason, detail) for the first reply that is too short or matches a pattern, else None."""
    for reply in replies(record):
        if len(reply.strip()) < min_reply_chars:
            return "short reply", f"{len(reply.strip())} chars: {reply.strip()[:60]!r}"
    for reply in replies(record):
        for pattern in patterns:
            hit = pattern.search(reply)
            if hit:
                return "pattern", f"/{pattern.pattern}/ matched {hit.group(0)!r}"
    return None


# --- writing the input's own shape ----------------------------------------------------------------

def check_output(path: Path, out: Path) -> None:
    """Refuse to write over the input or to change the file type (cleaning never converts)."""
    if out.resolve() == path.resolve() or (out.exists() and os.path.samefile(out, path)):
        raise DataError(str(out), "refusing to overwrite the input: --out names the input file",
                        hint="write the cleaned data to a new file")
    if out.suffix.lower() != path.suffix.lower():
        raise DataError(str(out), f"--out must have the input's suffix {path.suffix!r}",
                        hint="cleaning keeps the input's format; convert files separately")


# --- the command ----------------------------------------------------------------------------------

@dataclass
class CleanOptions:
    """What `clean_file` removes. Defaults: exact and near duplicates only."""

    dedupe: str = "near"  # near (exact + near) | exact | none
    near_threshold: float = DEFAULT_NEAR_THRESHOLD
    min_reply_chars: int = 0  # replies shorter than this (stripped) remove the row; 0 = off
    max_tokens: int | None = None  # rendered length limit; needs a tokenizer
    drop_patterns: tuple[str, ...] = ()
    drop_refusals: bool = False
    skip_invalid: bool = False  # remove invalid rows instead of stopping
    format: str = "auto"
    columns: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.dedupe not in ("near", "exact", "none"):
            raise DataError("--dedupe", f"must be near, exact or none, not {self.dedupe!r}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise DataError("--near-dup-threshold", f"must be in (0, 1], not {self.near_threshold}")


@dataclass
class CleanReport:
    """Rows in and out, and every removed row's source under the reason it was removed for."""

    input: str
    output: str
    rows_in: int
    records_in: int
    rows_out: int = 0
    removed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # reason -> (source, detail)
    options: dict[str, Any] = field(default_factory=dict)

    def remove(self, reason: str, source: str, detail: str = "") -> None:
        self.removed.setdefault(reason, []).append((source, detail))

    @property
    def counts(self) -> Counter[str]:
        return Counter({reason: len(rows) for reason, rows in self.removed.items()})

    def summary(self) -> str:
        lines = [f"{self.input}: {self.rows_in} rows ({self.records_in} records) -> "
                 f"{self.output}: {self.rows_out} rows"]
        lines += [f"  removed {n:>6}  {reason}" for reason, n in self.counts.items()]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "rows_in": self.rows_in,
                "records_in": self.records_in, "rows_out": self.rows_out,
                "removed": dict(self.counts), "options": self.options,
                "removed_rows": {reason: [{"source": s, "detail": d} for s, d in rows]
                                 for reason, rows in self.removed.items()}}

    def markdown(self, examples: int = 20) -> str:
        lines = [f"# Cleaning report: `{self.input}`", "",
                 f"- output: `{self.output}`", f"- rows: {self.rows_in} in, {self.rows_out} out "
                 f"({self.rows_in - self.rows_out} removed); records in: {self.records_in}",
                 f"- options: `{json.dumps(self.options, ensure_ascii=False)}`", "",
                 "| reason | rows removed |", "|---|---:|"]
        lines += [f"| {reason} | {n} |" for reason, n in self.counts.items()] or ["| (nothing) | 0 |"]
        for reason, rows in self.removed.items():
            lines += ["", f"## {reason} ({len(rows)})", ""]
            lines += [f"- `{source}` {detail}".rstrip() for source, detail in rows[:examples]]
            if len(rows) > examples:
                lines.append(f"- … {len(rows) - examples} more in the JSON report")
        return "\n".join(lines) + "\n"


def clean_file(path: str | Path, out: str | Path, options: CleanOptions | None = None, *,
               tokenizer: Any = None, template_kwargs: dict | None = None,
               progress: bool = False) -> CleanReport:
    """Filter `path` into `out` (same format and rows, see the module docstring); returns the report.
    `tokenizer` (with its chat template installed) is needed for `max_tokens`."""
    options = options or CleanOptions()
    path, out = Path(path), Path(out)
    check_output(path, out)
    if options.max_tokens is not None and tokenizer is None:
        raise DataError(str(path), "--max-tokens needs --tokenizer: lengths are counted in tokens")
    patterns = compile_patterns(options.drop_patterns, options.drop_refusals)
    load, records = stream_records(path, format=options.format, columns=options.columns,
                                   on_error="skip" if options.skip_invalid else "raise", max_errors=sys.maxsize)
    problems: dict[str, list[tuple[str, str]]] = {}  # reason -> (source, detail), the rows' own faults
    duplicates: dict[str, list[tuple[str, str]]] = {}  # then, among the rows left, the repeats
    threshold = options.near_threshold if options.dedupe == "near" else None
    with DuplicateFinder(threshold) as finder:
        kept = Sources()  # the rows compared for duplicates, by the finder's numbers
        for unit, failed in _rendered_units(records, tokenizer, options.max_tokens, template_kwargs, progress):
            problem = failed or next(
                (p for r in unit.records if (p := reply_problem(r, options.min_reply_chars, patterns))), None)
            if problem:
                problems.setdefault(problem[0], []).append((unit.source, problem[1]))
            elif options.dedupe != "none" and (match := _duplicate(finder, kept, unit)):
                duplicates.setdefault(match[0], []).append((unit.source, match[1]))
    chosen = {key: value for key, value in vars(options).items() if value not in (None, (), False)}
    report = CleanReport(str(path), str(out), rows_in=0, records_in=load.read, options=chosen)
    for err in load.errors:
        report.remove("invalid", err.source, err.problem)
    report.removed |= problems | duplicates  # the order `remove` gives: invalid, faults, then duplicates
    removed = {source for rows in report.removed.values() for source, _ in rows}
    report.rows_out = write_rows_like(path, out, lambda source: source not in removed)
    report.rows_in = report.rows_out + len(removed)  # every row is written or removed, once
    return report


def _duplicate(finder: DuplicateFinder, kept: Sources, unit: Unit) -> tuple[str, str] | None:
    """(reason, detail) when `unit` repeats an earlier row compared, else None."""
    match = finder.add(unit.text)
    kept.append(unit.source)
    if match is None:
        return None
    if match.kind == "exact":
        return "exact duplicate", f"same as {short_source(kept[match.of])}"
    return "near duplicate", f"Jaccard {match.score:.3f} with {short_source(kept[match.of])}"


def _rendered_units(records: Iterable[Record], tokenizer: Any, max_tokens: int | None,
                    template_kwargs: dict | None, progress: bool) -> Iterator[tuple[Unit, tuple[str, str] | None]]:
    """Each row (as read) with (reason, detail) when the renderer rejects one of its records or renders
    one longer than `max_tokens`, else None. Rendered `RENDER_CHUNK` records at a time; a row whose
    records run into the next chunk waits for it."""
    bar = tqdm(desc="clean", unit="row", disable=None if progress else True)
    if max_tokens is None:
        for unit in group_units(records):
            bar.update()
            yield unit, None
        bar.close()
        return
    from sftkit.data.render import Renderer
    from sftkit.data.render_all import RenderReport, render_stream

    renderer = Renderer(tokenizer, template_kwargs=template_kwargs)
    rendered = RenderReport(examples=[], problems=Problems(skip=True, max_errors=sys.maxsize))
    pending: list[Unit] = []  # the rows of the chunks read and not yet judged
    failed: dict[str, tuple[str, str]] = {}  # source -> (reason, detail), for the pending rows

    def chunks() -> Iterator[list[Record]]:
        chunk: list[Record] = []
        for record in records:
            if pending and pending[-1].source == record.source:
                pending[-1].records.append(record)
            else:
                pending.append(Unit(record.source, [record]))
            chunk.append(record)
            if len(chunk) == RENDER_CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    for examples in render_stream(chunks(), renderer, rendered):  # one chunk read, then rendered
        failed.update({err.source: ("unrenderable", err.problem) for err in rendered.errors})
        rendered.errors.clear()
        for example in examples:
            if len(example.input_ids) > max_tokens and example.source not in failed:
                failed[example.source] = ("too long", f"{len(example.input_ids)} tokens > {max_tokens}")
        done, pending[:] = pending[:-1], pending[-1:]  # the last row may go on in the next chunk
        for unit in done:
            bar.update()
            yield unit, failed.pop(unit.source, None)
    for unit in pending:
        yield unit, failed.pop(unit.source, None)
    bar.close()


def write_clean_report(report: CleanReport, out: str | Path, report_path: str | Path | None = None) -> Path:
    """Write the markdown report (`report_path`, else `<out>.report.md`) and the JSON one beside it
    (`FILE.json`, else `<out>.report.json`); returns the markdown path."""
    out = Path(out)
    md = Path(report_path) if report_path else out.with_name(out.name + ".report.md")
    js = md.with_suffix(".json") if report_path else out.with_name(out.name + ".report.json")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(report.markdown(), encoding="utf-8")
    js.write_text(json.dumps(report.as_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return md
