"""Every note the renderer counts is explained in docs/renderer-notes.md, and the summary points there."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from sftkit.data.render_all import RenderReport

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "renderer-notes.md"


def test_every_note_and_drop_the_code_counts_has_a_row_in_the_doc() -> None:
    render = "".join((REPO / "src" / "sftkit" / "data" / name).read_text() for name in ("render.py", "spans.py"))
    notes = set(re.findall(r'warnings\["(\w+)"\]', render))
    drops = {kind.split(":")[0] for kind in re.findall(r'DroppedExample\([^,]+, "([^"]+)"', render)}
    drops |= set(re.findall(r'dropped\["([^"]+)"\]', (REPO / "src" / "sftkit" / "data" / "formats.py").read_text()
                            + (REPO / "src" / "sftkit" / "data" / "fields.py").read_text()))
    assert {"reply_rewritten", "prompt_rewritten", "boundary_merge"} <= notes and "truncated" in drops
    rows = set(re.findall(r"^\| `([^`]+)`", DOC.read_text(), flags=re.MULTILINE))
    assert notes <= rows, notes - rows
    assert drops <= rows, drops - rows


def test_the_summary_points_at_the_doc() -> None:
    report = RenderReport(examples=[], warnings=Counter(boundary_merge=2, reply_rewritten=1), turns="whole")
    summary = report.summary()
    assert "notes: boundary_merge=2, reply_rewritten=1 (what each means and what to do: docs/renderer-notes.md)" \
        in summary
    assert report.rewritten_note().endswith("(docs/renderer-notes.md)")
    assert "[docs/renderer-notes.md](docs/renderer-notes.md)" in (REPO / "README.md").read_text()
