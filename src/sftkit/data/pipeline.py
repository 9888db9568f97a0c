"""Files -> records -> tokenized examples: the data path shared by `train` and `data preview`.

Both commands call `build_examples`, so what the preview shows is exactly what training uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from sftkit.data.formats import LoadReport, load_records
from sftkit.data.messages import Record
from sftkit.data.render import Renderer, Strategy
from sftkit.data.render_all import RenderReport, render_records


@dataclass
class DataReport:
    """What each file gave, and what rendering kept, dropped and noticed."""

    loads: list[LoadReport] = field(default_factory=list)
    render: RenderReport | None = None

    def summary(self) -> str:
        lines = []
        for load in self.loads:
            line = f"{load.path}: {len(load.records)} records ({load.format})"
            if load.skipped:
                line += ", skipped invalid: " + ", ".join(f"{n} ({k})" for k, n in load.skipped.items())
            if load.dropped:
                line += ", dropped: " + ", ".join(f"{n} ({k})" for k, n in load.dropped.items())
            lines.append(line)
        if self.render is not None:
            lines.append(self.render.summary())
        return "\n".join(lines)


def load_all(
    paths: Sequence[str | Path],
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Record], list[LoadReport]]:
    """Read every file in order; invalid records raise (listing the first few) or are counted."""
    records: list[Record] = []
    loads: list[LoadReport] = []
    for path in paths:
        load = load_records(path, format=format, columns=columns, on_error="skip" if skip_invalid else "raise")
        records.extend(load.records)
        loads.append(load)
    return records, loads


def build_examples(
    paths: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    strategy: Strategy | str = Strategy.ASSISTANT,
    max_length: int | None = None,
    template_kwargs: dict | None = None,
    skip_invalid: bool = False,
    num_proc: int = 1,
    progress: bool = False,
    fast_bpe: bool = True,
) -> DataReport:
    """Load `paths` and render them with `tokenizer`'s chat template (install it first with
    `sftkit.data.templates.prepare_tokenizer`)."""
    records, loads = load_all(paths, format=format, columns=columns, skip_invalid=skip_invalid)
    renderer = Renderer(tokenizer, strategy=strategy, max_length=max_length, template_kwargs=template_kwargs,
                        fast_bpe=fast_bpe)
    rendered = render_records(
        records, renderer, on_error="skip" if skip_invalid else "raise", num_proc=num_proc, progress=progress
    )
    return DataReport(loads=loads, render=rendered)
