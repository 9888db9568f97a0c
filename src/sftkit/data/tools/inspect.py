"""Look at a dataset as the model will see it before spending GPU hours on it.

    sftkit data inspect data/train.jsonl
    sftkit data inspect lima.json --tokenizer ../shared/data/tokenizers/qwen2.5 --max-length 2048 \\
        --report reports/lima          # writes reports/lima/report.md, lengths.png, replies.png

What it measures (`inspect_file` -> `InspectReport`): examples, rows, turns, roles, system prompts;
characters per example; with a tokenizer, tokens per example rendered by the real renderer
(`sftkit.data.render`, the tokenizer's chat template) with percentiles, how many examples
`max_length` truncates and how many it drops (no trained token left: the figure training reports),
the trained-token share; replies shorter than `min_reply_chars`; exact and near duplicates
(`sftkit.data.tools.dedupe.find_duplicates`, the same test `sftkit data clean` removes by); the writing
systems of the letters (Latin, Han, Cyrillic, ...; from Unicode character names, no language model);
refusal boilerplate; and the 5 worst offenders of each kind, named by `file:line` / `file:#index`.
Invalid records are counted and listed, never fatal: inspecting is how one finds them.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sftkit.data.formats import stream_records
from sftkit.data.messages import Conversation, Record
from sftkit.data.tools.clean import compile_patterns, short_source
from sftkit.data.tools.dedupe import (
    DEFAULT_NEAR_THRESHOLD,
    DuplicateFinder,
    Sources,
    Unit,
    group_units,
    record_text,
    replies,
)
from sftkit.data.tools.ranks import WORST, Worst, percentiles
from sftkit.data.tools.scripts import letters_by_script, script_of  # noqa: F401  (script_of: this module's API too)

WORST_ORDER = ("invalid", "unrenderable", "dropped", "longest", "lowest", "shortest", "refusal", "exact", "near",
               "off")  # offender kinds in the report, by the first word of their name
CHUNK = 256  # records rendered at a time


@dataclass(frozen=True)
class Offender:
    """One example worth a look: where it is and what is wrong with it."""

    source: str
    detail: str


@dataclass
class TokenStats:
    """Tokens per example as rendered for training (before truncation), and what `max_length` does."""

    max_length: int
    lengths: array = field(default_factory=lambda: array("q"))  # one number per example, not an object
    trained: array = field(default_factory=lambda: array("q"))
    truncated: int = 0  # examples longer than max_length
    dropped: int = 0  # of those, examples with no trained token left: training drops them
    kept_tokens: int = 0  # tokens training sees: examples cut to max_length, dropped ones left out
    kept_trained: int = 0
    unrenderable: Counter[str] = field(default_factory=Counter)  # kind -> records the renderer rejects
    notes: Counter[str] = field(default_factory=Counter)  # the renderer's warnings

    @property
    def trained_share(self) -> float:
        return self.kept_trained / self.kept_tokens if self.kept_tokens else 0.0


@dataclass
class InspectReport:
    """Everything `sftkit data inspect` prints and writes for one file."""

    path: str
    format: str
    rows: int
    examples: int
    invalid: Counter[str]
    min_reply_chars: int
    near_threshold: float
    turns: int = 0
    roles: Counter[str] = field(default_factory=Counter)
    system_prompts: int = 0  # examples with a system message
    distinct_system: int = 0
    multi_turn: int = 0  # examples with more than one assistant reply
    raw_text: int = 0
    chars: array = field(default_factory=lambda: array("q"))
    reply_chars: array = field(default_factory=lambda: array("q"))
    near_empty: int = 0  # examples with a reply shorter than min_reply_chars
    exact_duplicates: int = 0  # rows whose normalised text repeats an earlier row
    near_duplicates: int = 0  # rows similar to an earlier kept row (Jaccard >= near_threshold)
    scripts: Counter[str] = field(default_factory=Counter)  # dominant script -> examples
    letters: Counter[str] = field(default_factory=Counter)  # script -> letters
    refusals: int = 0  # examples with a reply matching DEFAULT_REFUSALS
    tokens: TokenStats | None = None
    worst: dict[str, list[Offender]] = field(default_factory=dict)

    @property
    def main_script(self) -> str | None:
        return self.scripts.most_common(1)[0][0] if self.scripts else None

    def summary(self) -> str:
        """The terminal summary (plain text)."""
        lines = [f"{label}: {value}" for label, value in self._facts()] + ["worst offenders:"]
        for kind, items in self.worst.items():
            lines += [f"  {kind}:"] * bool(items) + [f"    {short_source(o.source)}  {o.detail}" for o in items]
        return "\n".join(lines)

    def markdown(self, images: list[str]) -> str:
        """`report.md`: the facts, the images, and a table of the worst offenders of each kind."""
        lines = [f"# Data report: `{self.path}`", ""]
        lines += [f"- **{label}**: {value}" for label, value in self._facts()]
        lines += [""] + [f"![{name}]({name})" for name in images] + ["", "## Worst offenders", ""]
        for kind, items in self.worst.items():
            if items:
                lines += [f"### {kind}", "", "| where | what |", "|---|---|"]
                lines += [f"| `{short_source(o.source)}` | {_cell(o.detail)} |" for o in items] + [""]
        return "\n".join(lines)

    def _facts(self) -> list[tuple[str, str]]:
        """(label, value) for each fact, shared by the terminal summary and report.md."""
        n = max(self.examples, 1)
        invalid = f"; INVALID, skipped: {_counts(self.invalid)}" if self.invalid else "; invalid: 0"
        facts = [("file", f"{self.path} ({self.format}): {self.examples} examples from {self.rows} rows"
                          + invalid),
                 ("turns", f"{self.turns} ({_counts(self.roles)}); multi-turn examples {self.multi_turn}; "
                           f"plain text {self.raw_text}"),
                 ("system prompts", f"{self.system_prompts} examples, {self.distinct_system} distinct"),
                 ("characters per example", _stats(self.chars))]
        if self.tokens is not None:
            t, kept = self.tokens, max(len(self.tokens.lengths), 1)
            facts += [("tokens per example", _stats(t.lengths)),
                      (f"max_length {t.max_length}", f"{t.truncated} truncated ({t.truncated / kept:.1%}), "
                                                     f"{t.dropped} dropped ({t.dropped / kept:.1%}): "
                                                     "no trained token left"),
                      ("trained tokens", f"{t.kept_trained} of {t.kept_tokens} ({t.trained_share:.1%}) "
                                         "within max_length")]
            if t.unrenderable or t.notes:
                facts.append(("renderer", f"unrenderable: {_counts(t.unrenderable) or 0}; "
                                          f"notes: {_counts(t.notes) or 'none'}"))
        scripts = ", ".join(f"{s} {c} ({c / n:.1%})" for s, c in self.scripts.most_common(8))
        facts += [(f"replies under {self.min_reply_chars} chars", f"{self.near_empty} examples; "
                                                                   f"chars per reply: {_stats(self.reply_chars)}"),
                  ("duplicate rows", f"{self.exact_duplicates} exact, {self.near_duplicates} near "
                                     f"(Jaccard >= {self.near_threshold})"),
                  ("main script (examples)", scripts or "no letters"),
                  ("letters by script", ", ".join(f"{s} {c} ({c / max(sum(self.letters.values()), 1):.2%})"
                                                  for s, c in self.letters.most_common(8)) or "none"),
                  ("refusal-like replies", f"{self.refusals} examples")]
        return facts


def inspect_file(path: str | Path, *, tokenizer: Any = None, max_length: int = 2048,
                 strategy: str = "assistant", template_kwargs: dict | None = None,
                 format: str = "auto", columns: dict[str, str] | None = None,
                 near_threshold: float = DEFAULT_NEAR_THRESHOLD, min_reply_chars: int = 10,
                 num_proc: int = 1, progress: bool = False) -> InspectReport:
    """Measure `path` (see the module docstring). `tokenizer` must carry its chat template
    (`sftkit.data.templates.prepare_tokenizer`); without one, token figures are left out.
    The file is read once, as a stream: each row is measured, compared and rendered as it comes, and
    what is kept per row is a few numbers (and the duplicate index, `dedupe.DuplicateFinder`)."""
    load, records = stream_records(Path(path), format=format, columns=columns, on_error="skip", max_errors=WORST)
    report = InspectReport(str(path), "", rows=0, examples=0, invalid=Counter(), min_reply_chars=min_reply_chars,
                           near_threshold=near_threshold)
    content = _Content(report)
    token_worst: dict[str, list[Offender]] = {}
    with DuplicateFinder(near_threshold) as finder:
        rows = _rows(group_units(records), content, finder, report, progress)
        if tokenizer is None:
            for _ in rows:
                pass
        else:
            report.tokens = _tokens(rows, tokenizer, max_length, strategy, template_kwargs, num_proc, token_worst)
    content.finish()
    report.format, report.examples, report.invalid = load.format, load.read, load.skipped
    report.worst["invalid"] = [Offender(e.source, str(e).removeprefix(e.source + ": ")) for e in load.errors]
    report.worst |= token_worst  # the longest in tokens replace the longest in characters
    report.worst = dict(sorted(report.worst.items(), key=lambda item: WORST_ORDER.index(re.split("[ -]", item[0])[0])))
    return report


def _rows(units: Iterable[Unit], content: _Content, finder: DuplicateFinder, report: InspectReport,
          progress: bool) -> Iterator[Record]:
    """Each row measured and compared with the earlier ones as it is read; its records passed on."""
    sources, exact, near = Sources(), [], Worst()
    for unit in tqdm(units, desc="inspect", unit="row", disable=None if progress else True):
        content.add(unit)
        match = finder.add(unit.text)
        sources.append(unit.source)
        if match is not None and match.kind == "exact":
            report.exact_duplicates += 1
            if len(exact) < WORST:
                exact.append(Offender(unit.source, f"same text as {short_source(sources[match.of])}"))
        elif match is not None:
            report.near_duplicates += 1
            near.add(match.score, Offender(unit.source, f"Jaccard {match.score:.3f} with "
                                                        f"{short_source(sources[match.of])}"))
        yield from unit.records
    report.rows = len(sources)
    report.worst["exact duplicate"], report.worst["near duplicate"] = exact, near.items()


class _Content:
    """Counts, lengths, scripts, short replies and refusals: everything that needs no tokenizer, a row
    at a time into `report`; `finish` writes the offenders once the main script is known."""

    def __init__(self, report: InspectReport) -> None:
        self.report, self.refusal_patterns = report, compile_patterns(refusals=True)
        self.systems: set[bytes] = set()  # digests of the distinct system prompts
        self.short, self.longest, self.refusals = Worst(largest=False), Worst(), []
        # Off-script rows, before the main script is known: a row's offender is its first (part, script,
        # share) whose script is not the main one. Under its first entry's script S, `off[S]` keeps the
        # worst first entries (the offender when S is not main) and the worst first entries in another
        # script than S (the offender when S is main): the worst of each case, chosen in `finish`.
        self.off: dict[str, tuple[Worst, Worst]] = defaultdict(lambda: (Worst(), Worst()))
        self.row = 0

    def add(self, unit: Unit) -> None:
        entries: list[tuple[str, str, float]] = []  # (part, dominant script, share of letters), in order
        for record in unit.records:
            self._record(record, entries)
        if entries:
            first = entries[0]
            other = next((e for e in entries if e[1] != first[1]), None)
            self.off[first[1]][0].add(first[2], (unit.source, first), order=self.row)
            if other is not None:
                self.off[first[1]][1].add(other[2], (unit.source, other), order=self.row)
        self.row += 1

    def _record(self, record: Record, entries: list[tuple[str, str, float]]) -> None:
        report = self.report
        text = record_text(record)
        report.chars.append(len(text))
        self.longest.add(len(text), Offender(record.source, f"{len(text)} chars"))
        letters = letters_by_script(text)
        report.letters.update(letters)
        if letters:
            script, n = letters.most_common(1)[0]
            report.scripts[script] += 1
            entries.append(("", script, n / sum(letters.values())))
        if not isinstance(record, Conversation):
            report.raw_text += 1
            return
        _count_turns(record, report, self.systems)
        answers = replies(record)
        if answer_letters := letters_by_script("\n".join(answers)):  # a reply in another script than asked
            script, n = answer_letters.most_common(1)[0]
            entries.append(("reply: ", script, n / sum(answer_letters.values())))
        report.reply_chars.extend(len(a.strip()) for a in answers)
        shortest = min((a.strip() for a in answers), key=len, default=None)
        if shortest is not None:
            report.near_empty += len(shortest) < report.min_reply_chars
            self.short.add(len(shortest), Offender(record.source, f"{len(shortest)} chars: {shortest[:60]!r}"))
        hit = next((m for a in answers for p in self.refusal_patterns if (m := p.search(a))), None)
        if hit:
            report.refusals += 1
            if len(self.refusals) < WORST:
                self.refusals.append(Offender(record.source, f"{hit.group(0)!r}"))

    def finish(self) -> None:
        report, main = self.report, self.report.main_script
        report.distinct_system = len(self.systems)
        report.worst["shortest reply"] = self.short.items()
        report.worst["refusal-like"] = self.refusals
        cases = [firsts for script, (firsts, _) in self.off.items() if script != main]
        cases += [self.off[main][1]] if main in self.off else []
        report.worst["off-script"] = [Offender(s, f"{part}{share:.0%} {script} letters (main: {main})")
                                      for s, (part, script, share) in (cases[0].items(*cases[1:]) if cases else [])]
        report.worst["longest"] = self.longest.items()


def _count_turns(record: Conversation, report: InspectReport, systems: set[bytes]) -> None:
    roles = [m.role for m in record.messages]
    report.turns += len(roles)
    report.roles.update(roles)
    report.multi_turn += roles.count("assistant") > 1
    system = [m.content for m in record.messages if m.role == "system"]
    if system:
        report.system_prompts += 1
        systems.add(hashlib.blake2b("\n".join(system).encode(), digest_size=16).digest())


def _tokens(records: Iterator[Record], tokenizer: Any, max_length: int, strategy: str,
            template_kwargs: dict | None, num_proc: int, worst: dict[str, list[Offender]]) -> TokenStats:
    """Render every record untruncated with the real renderer, `CHUNK` records at a time, then apply
    `max_length` exactly as the renderer does (cut to max_length; dropped when no trained token is left)."""
    from sftkit.data.messages import Problems
    from sftkit.data.render import IGNORE_INDEX, Renderer
    from sftkit.data.render_all import RenderReport, render_stream

    renderer = Renderer(tokenizer, strategy=strategy, template_kwargs=template_kwargs)
    rendered = RenderReport(examples=[], problems=Problems(skip=True, max_errors=WORST))
    stats, dropped, longest, lowest = TokenStats(max_length), [], Worst(), Worst(largest=False)
    chunks = iter(lambda: list(islice(records, CHUNK)), [])
    for examples in render_stream(chunks, renderer, rendered, num_proc=num_proc):
        worst["unrenderable"] = [Offender(e.source, e.problem) for e in rendered.errors]
        for example in examples:
            n, trained = len(example.input_ids), example.num_trained
            stats.lengths.append(n)
            stats.trained.append(trained)
            longest.add(n, Offender(example.source, f"{n} tokens"))
            lowest.add(trained / n, Offender(example.source, f"{trained / n:.1%} of {n} tokens trained"))
            if n > max_length:
                stats.truncated += 1
                trained = sum(1 for label in example.labels[:max_length] if label != IGNORE_INDEX)
                if not trained:
                    stats.dropped += 1
                    if len(dropped) < WORST:
                        dropped.append(Offender(example.source, f"{n} tokens, none trained in the first {max_length}"))
                    continue
            stats.kept_tokens += min(n, max_length)
            stats.kept_trained += trained
    stats.unrenderable.update(rendered.skipped)
    stats.notes.update(rendered.warnings)
    worst["longest"], worst[f"dropped at max_length {max_length}"] = longest.items(), dropped
    worst["lowest trained share"] = lowest.items()
    return stats


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counter.most_common())


def _stats(values: list[int]) -> str:
    stats = percentiles(values)
    if not stats:
        return "none"
    return " ".join(f"{k} {v}" for k, v in stats.items()) + f" (mean {sum(values) / len(values):.0f})"


def write_report(report: InspectReport, directory: str | Path) -> Path:
    """Write `report.md` with `lengths.png` and `replies.png` into `directory`; returns report.md."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = report.tokens
    lengths = tokens.lengths if tokens else report.chars
    unit = "tokens" if tokens else "characters"
    marks = {k: v for k, v in percentiles(lengths).items() if k in ("p50", "p90", "p99")}
    title = f"{unit} per example ({len(lengths)} examples)"
    if tokens:
        marks["max_length"] = tokens.max_length
        title += f"; {tokens.truncated} truncated at max_length, {tokens.dropped} dropped"
    _histogram(directory / "lengths.png", lengths, title, (unit, "examples (log scale)"), marks)
    _histogram(directory / "replies.png", [max(n, 1) for n in report.reply_chars],
               f"characters per reply ({len(report.reply_chars)} replies; {report.near_empty} examples "
               f"with a reply under {report.min_reply_chars})", ("characters (log scale)", "replies (log scale)"),
               {"min_reply_chars": report.min_reply_chars}, log=True)
    path = directory / "report.md"
    path.write_text(report.markdown(["lengths.png", "replies.png"]), encoding="utf-8")
    return path


def _histogram(path: Path, values: list[int], title: str, axis_labels: tuple[str, str], marks: dict[str, int],
               log: bool = False) -> None:
    """A histogram PNG with labelled vertical lines (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    marks = {label: value for label, value in marks.items() if value > 0}
    figure = Figure(figsize=(9, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if values:
        top = max(max(values), *marks.values(), 2)
        bins = np.geomspace(1, top, 60) if log else np.linspace(0, top, 60)
        axes.hist(values, bins=bins, color="#4C72B0")
    axes.set_yscale("log")  # the tails (what max_length cuts, the near-empty replies) matter most
    if log:
        axes.set_xscale("log")
    for (label, value), colour in zip(marks.items(), ("#55A868", "#DD8452", "#8172B2", "#C44E52")):
        axes.axvline(value, color=colour, linestyle="--", label=f"{label} = {value}")
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(axis_labels[0])
    axes.set_ylabel(axis_labels[1])
    if marks:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
