"""Distillation, measured: a student trained only on a teacher's answers vs one trained on written conversations.

    python -m sftkit_demo.distillation                 # teacher runs/demo/sft/final (made by `make demo`)
    python -m sftkit_demo.distillation --teacher DIR --work runs/distill --out reports/distillation.md

The seed's second source of SFT data is a stronger model. Here the teacher is the demo's fine-tuned
model; the prompts are new (the demo's SFT conversations drawn with another seed: other phrasings,
other order, the same trained countries), and the teacher answers them with `sftkit data distill`
(greedy, batched; replies that do not end their turn are dropped). The student is the demo base
model fine-tuned with the demo's own recipe on those answers alone. Both models (teacher = trained on
the written conversations, student = trained on the teacher's answers) answer every held-out question
(countries whose facts are only in the pre-training text), scored by the demo's judge.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from sftkit.distill import Teacher, distill
from sftkit_demo.chats import SftSpec, build_sft, heldout_questions
from sftkit_demo.dataset import write_jsonl
from sftkit_demo.run import DEFAULT_BASE, DemoOptions, _score, sft_config
from sftkit_demo.world import split_countries


def held_out_accuracy(model_dir: Path, seed: int) -> tuple[float, float, int]:
    """(answered %, correct %, questions) on every held-out question."""
    from sftkit.generate import load_for_generation
    from sftkit_demo.score import ask_chat

    _, heldout = split_countries(seed)
    rows = heldout_questions(heldout, seed)
    model, tokenizer = load_for_generation(model_dir, device="cpu")
    answered, correct = _score(ask_chat(model, tokenizer, [r["question"] for r in rows]), rows)
    return answered, correct, len(rows)


def run(teacher: Path, work: Path, out: Path, base: Path = DEFAULT_BASE, seed: int = 0) -> dict:
    import torch

    from sftkit.train import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or 1)  # as `sftkit demo`
    trained, _ = split_countries(seed)
    fresh, _ = build_sft(trained, seed + 1, SftSpec())  # new prompts about the same trained countries
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "teacher", ignore_errors=True)
    teacher = Path(shutil.copytree(teacher, work / "teacher"))  # a later `make demo` may replace the original
    prompts = work / "prompts.jsonl"
    write_jsonl(prompts, fresh)
    distilled = work / "distilled.jsonl"
    distilled.unlink(missing_ok=True)
    (work / "distilled.jsonl.dropped.jsonl").unlink(missing_ok=True)
    start = time.perf_counter()
    report = distill(Teacher(str(teacher), max_new_tokens=64, concurrency=16), prompts, distilled)
    distill_seconds = time.perf_counter() - start
    print(report.summary(distilled))

    options = DemoOptions(out=work / "student", base=base, seed=seed)
    student = train(sft_config(options, distilled), overwrite=True)
    teacher_fig, student_fig = held_out_accuracy(teacher, seed), held_out_accuracy(student, seed)
    table = "\n".join([
        "# Distillation in the demo world",
        "",
        "`python -m sftkit_demo.distillation` (see its docstring). Teacher: the demo's fine-tuned model, trained on",
        f"{len(build_sft(trained, seed, SftSpec())[0])} written conversations. Student: the same base and recipe, "
        f"trained only on the teacher's greedy answers to {len(fresh)} new prompts "
        f"({report.written} kept, {sum(report.dropped.values())} dropped: "
        f"{dict(report.dropped) or 'none'}; distilled in {distill_seconds:.0f} s).",
        "",
        "| model | trained on | held-out answered | held-out correct |",
        "|---|---|---|---|",
        f"| teacher | written conversations | {teacher_fig[0]:.0f}% | {teacher_fig[1]:.0f}% (n={teacher_fig[2]}) |",
        f"| student | teacher's answers only | {student_fig[0]:.0f}% | {student_fig[1]:.0f}% (n={student_fig[2]}) |",
        "",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    return {"prompts": len(fresh), "kept": report.written, "dropped": dict(report.dropped),
            "distill_seconds": distill_seconds, "n": teacher_fig[2], "teacher_correct": teacher_fig[1] / 100,
            "student_correct": student_fig[1] / 100, "teacher_answered": teacher_fig[0] / 100,
            "student_answered": student_fig[0] / 100, "report": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=Path("runs/demo/sft/final"))
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--work", type=Path, default=Path("runs/distill"))
    parser.add_argument("--out", type=Path, default=Path("reports/distillation.md"))
    args = parser.parse_args(argv)
    if not (args.teacher / "config.json").is_file():
        parser.error(f"--teacher {args.teacher}: no model there; run `make demo` first (it writes runs/demo/sft/final)")
    run(args.teacher, args.work, args.out, args.base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
