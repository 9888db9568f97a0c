"""Prompt first? Few-shot prompting of the base model vs SFT, measured with `sftkit eval`'s own scoring.

    make evidence                                                   # part of the campaign (sftkit_demo.evidence)
    python -m sftkit_demo.evidence --prompting-only runs/demo/sft/final   # this row alone, into reports/evidence.md

The seed's rule is "use prompting first; fine-tune when prompting can't". Here the base model (no chat
template) is asked the held-out questions as plain text with K solved examples from the same question
set (`Question:` / `Answer:` lines, `sftkit.evaluate.task_eval`), K = 0, 3, 8, and the fine-tuned model
is asked the same questions through its chat template, zero-shot; all judged as the demo judges
(`sftkit_demo.tasks`: the fact in the first sentence, outside the country's name).

`demo_check` scores the demo's own 216 held-out questions with `sftkit eval`'s path and with the demo's
(`sftkit_demo.score.ask_chat` + `judge`): the two must agree reply for reply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftkit.evaluate.task_eval import Asker, score_tasks
from sftkit.evaluate.tasks import parse_task
from sftkit.generate import load_for_generation, training_template_kwargs
from sftkit.model import load_tokenizer, read_weights
from sftkit_demo.chats import heldout_questions
from sftkit_demo.score import ask_chat, judge
from sftkit_demo.tasks import task_item
from sftkit_demo.world import split_countries

SHOTS = (0, 3, 8)
MAX_NEW_TOKENS = 32  # as the demo and the rest of the evidence ask


def _tasks(questions: list[dict[str, Any]]) -> list:
    return [parse_task(f"question {i + 1}", task_item(q)) for i, q in enumerate(questions)]


def _figures(scored: Any, examples: int = 2) -> dict[str, Any]:
    return {"asked": scored.how, **scored.figures(),
            "examples": [{"q": r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"],
                          "reply": r["reply"], "correct": r["correct"]} for r in scored.rows[-examples:]]}


def prompting(base: Path, sft_dir: Path, questions: list[dict[str, Any]], device: str = "cpu") -> dict[str, Any]:
    """Accuracy of the base with K-shot plain-text prompts (K in SHOTS) and of the SFT model, same questions."""
    tasks = _tasks(questions)
    base_model = read_weights(base, "float32").to(device).eval()
    base_asker = Asker(base_model, load_tokenizer(base), chat=False)
    out: dict[str, Any] = {"base": str(base), "sft_model": str(sft_dir), "n": len(tasks), "shots": {}}
    for k in SHOTS:
        base_asker.few_shot = k
        out["shots"][str(k)] = _figures(score_tasks(base_asker, tasks, "base", max_new_tokens=MAX_NEW_TOKENS))
    del base_model
    model, tokenizer = load_for_generation(sft_dir, device=device)
    sft = Asker(model, tokenizer, template_kwargs=training_template_kwargs(sft_dir))
    out["sft"] = _figures(score_tasks(sft, tasks, "model", max_new_tokens=MAX_NEW_TOKENS))
    return out


def demo_check(sft_dir: Path, base: Path, seed: int = 0, device: str = "cpu", shots: int = 3) -> dict[str, Any]:
    """The demo's 216 held-out questions: `sftkit eval`'s figure and the demo's own, on the same model; and the
    base prompted with `shots` solved examples of that file, per attribute."""
    _, heldout = split_countries(seed)
    questions = heldout_questions(heldout, seed)
    tasks = _tasks(questions)
    base_model = read_weights(base, "float32").to(device).eval()
    prompted = score_tasks(Asker(base_model, load_tokenizer(base), chat=False, few_shot=shots), tasks, "base",
                           max_new_tokens=MAX_NEW_TOKENS)
    del base_model
    by_attribute: dict[str, list[int]] = {}
    for q, row in zip(questions, prompted.rows):
        by_attribute.setdefault(q["attribute"], [0, 0])[0] += row["correct"]
        by_attribute[q["attribute"]][1] += 1
    model, tokenizer = load_for_generation(sft_dir, device=device)
    scored = score_tasks(Asker(model, tokenizer, template_kwargs=training_template_kwargs(sft_dir)),
                         tasks, "model", max_new_tokens=MAX_NEW_TOKENS)
    replies = ask_chat(model, tokenizer, [q["question"] for q in questions], max_new_tokens=MAX_NEW_TOKENS)
    verdicts = [judge(r, q["answer"], q["country"]) for r, q in zip(replies, questions)]
    return {"sft_model": str(sft_dir), "n": len(questions), "sftkit_eval": scored.figures(),
            "demo_correct": sum(v.correct for v in verdicts), "demo_answered": sum(v.answered for v in verdicts),
            "same_replies": sum(a == r["reply"] for a, r in zip(replies, scored.rows)),
            "same_verdicts": sum(v.correct == r["correct"] for v, r in zip(verdicts, scored.rows)),
            "base_shots": shots, "base": {**prompted.figures(), "by_attribute": by_attribute,
                                          "shots_shown": [t.solved() for t in tasks[:shots]]}}
