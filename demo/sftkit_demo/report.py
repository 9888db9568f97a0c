"""The demo's closing table, its last line and `report.md` (sftkit_demo.run writes them).

    >>> print(figures_table(figures))      # share answered base vs SFT, held-out accuracy, tokens, time
    >>> print(final_line(figures))         # held-out: base answered 0%, SFT correct 81%
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Figures:
    """Everything the demo measured; percentages are 0..100."""

    trained_prompts: int
    heldout_prompts: int
    base_answered_trained: float
    sft_answered_trained: float
    base_answered_heldout: float
    sft_answered_heldout: float
    sft_correct_trained: float
    sft_correct_heldout: float
    base_correct_heldout: float
    trained_tokens: int
    sft_seconds: float
    total_seconds: float
    epochs: int
    lr: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Showcase:
    """One question asked to both models."""

    question: str
    split: str
    """"trained" (its country is in the SFT data) or "held-out"."""
    base: str
    sft: str
    correct: bool

    def console(self) -> str:
        mark = "ok" if self.correct else "wrong"
        return (f"  [{self.split}] {self.question}\n"
                f"    base: {_clip(self.base)}\n"
                f"    SFT:  {self.sft}   ({mark})")


def _clip(text: str, width: int = 90) -> str:
    return textwrap.shorten(text.replace("\n", " / "), width, placeholder=" ...")


def figures_table(f: Figures) -> str:
    """The closing table, as fixed-width text."""
    rows = [
        ("", "base", "SFT"),
        (f"answered, trained countries ({f.trained_prompts} prompts)",
         f"{f.base_answered_trained:.0f}%", f"{f.sft_answered_trained:.0f}%"),
        (f"answered, held-out countries ({f.heldout_prompts} prompts)",
         f"{f.base_answered_heldout:.0f}%", f"{f.sft_answered_heldout:.0f}%"),
        ("correct, trained countries", "-", f"{f.sft_correct_trained:.0f}%"),
        ("correct, held-out countries", f"{f.base_correct_heldout:.0f}%", f"{f.sft_correct_heldout:.0f}%"),
        ("trained tokens (SFT, all epochs)", "", f"{f.trained_tokens:,}"),
        (f"time (SFT {f.epochs} epochs at lr {f.lr:g} / whole demo)", "",
         f"{f.sft_seconds:.0f}s / {f.total_seconds:.0f}s"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>6}  {c:>14}" for a, b, c in rows)


def final_line(f: Figures) -> str:
    """`held-out: base answered A%, SFT correct B%` (the demo's last line)."""
    return f"held-out: base answered {f.base_answered_heldout:.0f}%, SFT correct {f.sft_correct_heldout:.0f}%"


def write_report(out: Path, figures: Figures, showcase: list[Showcase], final: Path) -> Path:
    """out/report.md and out/loss.png (the SFT run's loss curve); returns the report's path."""
    curve = final.parent / "loss.png"
    if curve.is_file():
        shutil.copy2(curve, out / "loss.png")
    lines = [
        "# sftkit demo report",
        "",
        "A small Llama pre-trained by sftkit on raw text (demo/base-model), fine-tuned with `sftkit train`",
        f"on chat conversations about the trained countries (ChatML, assistant-only loss, {figures.epochs} "
        f"epochs, lr {figures.lr:g}). Held-out countries appear only in the pre-training text.",
        "",
        "| question | countries | base model (plain text) | fine-tuned model | |",
        "|---|---|---|---|---|",
    ]
    for s in showcase:
        cells = [s.question, s.split, _clip(s.base, 70), s.sft, "ok" if s.correct else "wrong"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "```", figures_table(figures), final_line(figures), "```", "",
              f"Fine-tuned model: `{final}`", "", "![SFT loss](loss.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
