"""A whole dataset through the renderer: in order, in worker processes when asked, with a report.

    render_records(records, Renderer(tokenizer), num_proc=4)   # -> RenderReport
    for examples in render_stream(chunks, renderer, report): ...   # chunk by chunk, for data beyond memory

Invalid records raise one `DataFileError` listing the first few, or are skipped and counted (the
`Problems` rule reading uses too); examples whose trained tokens all fall beyond `max_length` are
dropped and counted.

The worker pool is written by hand rather than `datasets.map` for what crosses the process
boundary. The workers are forked with the records and the renderer already in memory, so only
`(start, stop)` ranges go out, and each chunk's examples come back as two flat int32 arrays
(pickled as raw bytes) instead of lists of Python ints.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from sftkit.data.messages import DataError, Problems, Record
from sftkit.data.render import DroppedExample, Renderer, Tokenized

_CHUNK = 256


@dataclass
class RenderReport:
    """Examples in input order, plus what was dropped (counted) and what was noticed."""

    examples: list[Tokenized]
    dropped: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    problems: Problems = field(default_factory=lambda: Problems(skip=True))
    turns: str = ""  # the turns policy applied and why (`Renderer.turns_note`)
    repeated_tokens: int = 0  # tokens of per_turn examples before each conversation's last: its repeated prompts

    @property
    def skipped(self) -> Counter[str]:
        return self.problems.skipped

    @property
    def errors(self) -> list[DataError]:
        return self.problems.errors

    @property
    def trained_tokens(self) -> int:
        if hasattr(self.examples, "trained_tokens"):  # mapped from the token cache: counted on the arrays
            return self.examples.trained_tokens
        return sum(e.num_trained for e in self.examples)

    @property
    def total_tokens(self) -> int:
        if hasattr(self.examples, "total_tokens"):
            return self.examples.total_tokens
        return sum(len(e.input_ids) for e in self.examples)

    def policy_lines(self) -> list[str]:
        """The turns policy and why, what per_turn costs, and a warning when replies are trained otherwise
        than inference generates them (printed by `data preview` and in the run summary)."""
        lines = [f"turns: {self.turns}"] if self.turns else []
        if self.repeated_tokens:
            once = self.total_tokens - self.repeated_tokens  # each conversation's last example: the chat once
            lines.append(f"per_turn cost: {self.total_tokens} tokens where one render per conversation takes {once} "
                         f"(x{self.total_tokens / max(once, 1):.2f}): earlier turns repeat as prompts")
        return lines + ([note] if (note := self.rewritten_note()) else [])

    def rewritten_note(self) -> str:
        """A warning when replies were trained (or left out) otherwise than inference generates them."""
        differ, untrained = self.warnings["reply_rewritten"], self.warnings["prompt_rewritten"]
        if not differ and not untrained:
            return ""
        parts = [f"{differ} trained repl{'y differs' if differ == 1 else 'ies differ'} from how inference "
                 "generates them (the template rewrites them in history)"] if differ else []
        parts += [f"{untrained} repl{'y is' if untrained == 1 else 'ies are'} not trained (the prompt before "
                  "them is rewritten)"] if untrained else []
        fix = " — data.turns=per_turn trains every reply as generated" if "per_turn" not in self.turns else ""
        return "warning: " + "; ".join(parts) + fix + " (docs/renderer-notes.md)"

    def summary(self) -> str:
        lines = [f"{len(self.examples)} examples, {self.total_tokens} tokens, {self.trained_tokens} trained"]
        lines += self.policy_lines()
        if self.dropped:
            lines.append("dropped: " + ", ".join(f"{n} ({kind})" for kind, n in self.dropped.items()))
        if self.skipped:
            lines.append("skipped invalid: " + ", ".join(f"{n} ({kind})" for kind, n in self.skipped.items()))
        if self.warnings:
            lines.append("notes: " + ", ".join(f"{kind}={n}" for kind, n in sorted(self.warnings.items()))
                         + " (what each means and what to do: docs/renderer-notes.md)")
        return "\n".join(lines)


def render_records(
    records: Sequence[Record],
    renderer: Renderer,
    *,
    on_error: str = "raise",
    num_proc: int = 1,
    progress: bool = False,
    max_errors: int = 5,
    where: str = "data",
) -> RenderReport:
    """Render every record in order. Invalid records raise a `DataFileError` listing the first
    `max_errors` (on_error="raise"; `where` names the data) or are skipped and counted
    (on_error="skip"); examples whose trained tokens all fall beyond `max_length` are always
    dropped and counted."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    report = RenderReport(examples=[], problems=Problems(on_error == "skip", max_errors), turns=renderer.turns_note)
    renderer.encoder.prepare(len(records))  # tiktoken for large sets, built here once, not in every worker
    bar = tqdm(total=len(records), desc="render", unit="ex", disable=not progress)
    if num_proc > 1 and len(records) > _CHUNK:
        for size, counted in zip(_sizes(len(records)), render_in_pool(records, renderer, num_proc, _CHUNK)):
            _collect(report, *counted)
            bar.update(size)
    else:
        for start, size in zip(range(0, len(records), _CHUNK), _sizes(len(records))):
            _collect(report, *_render_counted(renderer, records[start : start + size]))
            bar.update(size)
    bar.close()
    report.problems.raise_if_any(where, len(records))
    return report


def render_stream(chunks: Iterable[Sequence[Record]], renderer: Renderer, report: RenderReport, *,
                  num_proc: int = 1, bar: tqdm | None = None) -> Iterator[list[Tokenized]]:
    """Each chunk's examples, in order, as soon as it is rendered: `render_records` for data that does
    not fit in memory (`sftkit.data.stream`). Drops, warnings and invalid records are counted into
    `report`, which keeps no examples; the caller raises `report.problems` at the end, knowing the
    count. With `num_proc` > 1 each chunk is pickled to a worker, a few per worker in flight."""
    rendered = (_pool_stream(chunks, renderer, num_proc) if num_proc > 1
                else ((len(chunk), *_render_counted(renderer, chunk)) for chunk in chunks))
    for size, results, warnings, tally in rendered:
        _collect(report, results, warnings, tally)
        examples, report.examples = report.examples, []
        if bar is not None:
            bar.update(size)
        yield examples


def _sizes(count: int) -> Iterator[int]:
    """Records per chunk, in order (the bar counts records: one may give several examples under per_turn)."""
    for start in range(0, count, _CHUNK):
        yield min(_CHUNK, count - start)


def _render_counted(renderer: Renderer, chunk: Sequence[Record]
                    ) -> tuple[list[Tokenized | DataError], Counter[str], Counter[str]]:
    """The chunk's results, and the warnings and tally rendering it added."""
    warnings, tally = Counter(renderer.warnings), Counter(renderer.tally)
    results = renderer.render_many(chunk)
    return results, renderer.warnings - warnings, renderer.tally - tally


def _collect(report: RenderReport, results: list, warnings: Counter[str], tally: Counter[str]) -> None:
    report.warnings.update(warnings)
    report.repeated_tokens += tally["repeated_tokens"]
    for item in results:
        if isinstance(item, DroppedExample):
            report.dropped[item.kind] += 1
        elif isinstance(item, DataError):
            report.problems.add(item)
        else:
            report.examples.append(item)


# -- worker processes ----------------------------------------------------------------------------
_records: Sequence[Record] = ()
_renderer: Renderer | None = None


@dataclass(slots=True)
class PackedChunk:
    """One chunk's results: examples as flat arrays plus their lengths and sources; errors as they are."""

    input_ids: array
    labels: array
    lengths: list[int]
    sources: list[str]
    errors: dict[int, DataError]  # slot in the chunk -> the record's error
    warnings: Counter[str]
    tally: Counter[str]

    @classmethod
    def pack(cls, results: Sequence[Tokenized | DataError], warnings: Counter[str], tally: Counter[str]
             ) -> PackedChunk:
        packed = cls(array("i"), array("i"), [], [], {}, warnings, tally)
        for slot, item in enumerate(results):
            if isinstance(item, DataError):
                packed.errors[slot] = item
                continue
            packed.input_ids.extend(item.input_ids)
            packed.labels.extend(item.labels)
            packed.lengths.append(len(item.input_ids))
            packed.sources.append(item.source)
        return packed

    def unpack_counted(self) -> tuple[list[Tokenized | DataError], Counter[str], Counter[str]]:
        return self.unpack(), self.warnings, self.tally

    def unpack(self) -> list[Tokenized | DataError]:
        ids, labels = self.input_ids.tolist(), self.labels.tolist()
        examples = iter(zip(self.lengths, self.sources))
        results: list[Tokenized | DataError] = []
        at = 0
        for slot in range(len(self.lengths) + len(self.errors)):
            if slot in self.errors:
                results.append(self.errors[slot])
                continue
            length, source = next(examples)
            results.append(Tokenized(ids[at : at + length], labels[at : at + length], source))
            at += length
        return results


def _init(renderer: Renderer, records: Sequence[Record]) -> None:
    global _renderer, _records
    _renderer, _records = renderer, records
    renderer.warnings, renderer.tally = Counter(), Counter()


def _render_range(bounds: tuple[int, int]) -> PackedChunk:
    assert _renderer is not None
    return PackedChunk.pack(*_render_counted(_renderer, _records[bounds[0] : bounds[1]]))


def render_in_pool(
    records: Sequence[Record], renderer: Renderer, num_proc: int, chunk: int
) -> Iterator[tuple[list[Tokenized | DataError], Counter[str], Counter[str]]]:
    """Each chunk's results (in input order), and the warnings and tally it added, rendered by
    `num_proc` forked workers."""
    ranges = [(start, min(start + chunk, len(records))) for start in range(0, len(records), chunk)]
    # fork: the workers inherit `records` and `renderer` (no pickling), as the initializer's arguments.
    # Frozen first: a worker's garbage collector would otherwise walk every inherited object, writing to
    # each and so copying the parent's whole heap page by page (measured: 22% more worker CPU at 50k).
    # Then the parent's collector is paused while it only turns arrays into lists of ints (no cycles to
    # collect): its passes over those lists cost 1-2 s of the cores the workers need.
    collecting = gc.isenabled()
    gc.freeze()
    try:
        with mp.get_context("fork").Pool(num_proc, initializer=_init, initargs=(renderer, records)) as pool:
            gc.disable()
            for packed in pool.imap(_render_range, ranges):
                yield packed.unpack(), packed.warnings, packed.tally
    finally:
        if collecting:
            gc.enable()
        gc.unfreeze()


def _render_chunk(chunk: Sequence[Record]) -> PackedChunk:
    assert _renderer is not None
    return PackedChunk.pack(*_render_counted(_renderer, chunk))


def _pool_stream(chunks: Iterable[Sequence[Record]], renderer: Renderer, num_proc: int
                 ) -> Iterator[tuple[int, list[Tokenized | DataError], Counter[str], Counter[str]]]:
    """`render_in_pool` for chunks that come one by one: sent as they are read, results in order. Not
    `pool.imap`: its feeder thread would read the whole input ahead, into memory."""
    in_flight: deque[tuple[int, Any]] = deque()
    gc.freeze()  # the forked workers leave the parent's objects unwritten (see render_in_pool)
    try:
        with mp.get_context("fork").Pool(num_proc, initializer=_init, initargs=(renderer, ())) as pool:
            for chunk in chunks:
                in_flight.append((len(chunk), pool.apply_async(_render_chunk, (list(chunk),))))
                if len(in_flight) >= 2 * num_proc:
                    size, result = in_flight.popleft()
                    yield size, *result.get().unpack_counted()
            while in_flight:
                size, result = in_flight.popleft()
                yield size, *result.get().unpack_counted()
    finally:
        gc.unfreeze()
