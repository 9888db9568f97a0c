"""`sftkit demo` end to end on the committed base model: a shortened run (fast) and the full one (slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors import safe_open
from sftkit_demo.report import Figures, final_line
from sftkit_demo.run import DEFAULT_BASE, DemoOptions, run_demo
from sftkit_demo.score import first_sentence, judge
from transformers import AutoTokenizer

from sftkit.cli import main

LAST_LINE = re.compile(r"^held-out: base answered (\d+)%, SFT correct (\d+)%$")


def test_base_model_is_committed_small_and_template_free() -> None:
    assert (DEFAULT_BASE / "model.safetensors").stat().st_size <= 25 * 2**20
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_BASE, local_files_only=True)
    assert not tokenizer.chat_template
    assert "<|im_start|>" not in tokenizer.get_vocab()  # SFT adds the template's tokens
    with safe_open(DEFAULT_BASE / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == len(tokenizer)


def test_judge_separates_answers_from_continued_lists() -> None:
    assert first_sentence("What's the capital of Spain? What's ...") == "What's the capital of Spain?"
    assert judge("What's the capital of Spain? Paris.", "Paris", "France").answered is False
    assert judge("The capital of France is Paris.", "Paris", "France").correct
    assert not judge("The capital of Mexico is Mexico.", "Mexico City", "Mexico").correct
    assert judge("The capital of Mexico is Mexico City.", "Mexico City", "Mexico").correct
    assert not judge("Sao Tome and Principe is in Africa.", "Sao Tome", "Sao Tome and Principe").correct


def _figures(stdout: str) -> tuple[int, int]:
    last = stdout.rstrip("\n").splitlines()[-1]
    match = LAST_LINE.match(last)
    assert match, f"last line is {last!r}"
    return int(match[1]), int(match[2])


def test_shortened_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One short epoch on 160 conversations, 24 held-out questions: every step, every file, the table."""
    options = DemoOptions(out=tmp_path / "demo", epochs=1, lr=1e-4, sft_rows=160, heldout_limit=24, trained_checks=8)
    figures = run_demo(options)
    out = capsys.readouterr().out
    assert _figures(out) == (round(figures.base_answered_heldout), round(figures.sft_correct_heldout))
    assert out.rstrip("\n").splitlines()[-1] == final_line(figures)
    assert "continues the pattern" in out and "base:" in out and "SFT:" in out
    for row in ("answered, trained countries (8 prompts)", "answered, held-out countries (24 prompts)",
                "correct, held-out countries", "trained tokens (SFT, all epochs)"):
        assert row in out
    # the base model continues the list; the fine-tune went through `sftkit train` with ChatML
    assert figures.base_answered_heldout <= 10
    assert figures.sft_answered_heldout > figures.base_answered_heldout
    assert 1000 < figures.trained_tokens < 5000  # replies only: 160 short answers, one epoch
    final = tmp_path / "demo" / "sft" / "final"
    assert (final / "model.safetensors").is_file() and (final / "chat_template.jinja").is_file()
    assert "<|im_end|>" in AutoTokenizer.from_pretrained(final, local_files_only=True).get_vocab()
    report = (tmp_path / "demo" / "report.md").read_text()
    assert final_line(figures) in report and "loss.png" in report
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 1000


def test_demo_command_names_what_to_do_without_a_base_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--base", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "demo/build_base.py" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_meets_the_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's bar: base answers <= 10% of held-out prompts, SFT answers >= 70% of them correctly."""
    figures: Figures = run_demo(DemoOptions(out=tmp_path / "demo"))
    base, sft = _figures(capsys.readouterr().out)
    assert base <= 10 and figures.base_answered_heldout <= 10
    assert sft >= 70 and figures.sft_correct_heldout >= 70
    assert figures.total_seconds < 300


@pytest.mark.slow
def test_build_base_rebuilds_a_template_free_base_model(tmp_path: Path) -> None:
    """demo/build_base.py end to end with 3 pre-training steps: data, tokenizer, `sftkit train`, install."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "demo" / "build_base.py"
    out = tmp_path / "model"
    done = subprocess.run(
        [sys.executable, str(script), "--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"),
         "--out", str(out), "train.max_steps=3",
         "train.log_every=1"], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert not tokenizer.chat_template and "<|im_start|>" not in tokenizer.get_vocab()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == len(tokenizer)
    assert "pre-train   done" in done.stdout and "base model" in done.stdout
