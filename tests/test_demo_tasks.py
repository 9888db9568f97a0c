"""The demo's questions as a task file judge every reply exactly as the demo's own scoring does, and the
prompt-first row of the evidence report follows its rule."""

from __future__ import annotations

from sftkit.evaluate.tasks import parse_task
from sftkit.evaluate.tasks import judge as task_judge
from sftkit_demo.chats import heldout_questions
from sftkit_demo.evidence_report import prompt_first
from sftkit_demo.score import judge as demo_judge
from sftkit_demo.tasks import task_item
from sftkit_demo.world import COUNTRIES, split_countries


def test_task_items_judge_as_the_demo_judges() -> None:
    _, heldout = split_countries(0)
    rows = heldout_questions(heldout, 0) + heldout_questions([c for c in COUNTRIES if "-" in c.name or
                                                               c.name in ("Mexico", "Sao Tome and Principe")], 0)
    for row in rows:
        task = parse_task("demo", task_item(row))
        other = "Paris" if row["answer"] != "Paris" else "Lima"
        replies = [row["reference"], f"{row['reference']} What else?", f"Is it {row['answer']}?",
                   f"{row['country']} is somewhere. {row['answer']}.", f"It is {other}.", "",
                   f"{row['country']}.", f"The answer: {row['answer'].upper()}", f"{row['answer']}\nmore"]
        for reply in replies:
            assert task_judge(task, reply) == demo_judge(reply, row["answer"], row["country"]).correct, (row, reply)


def figures(accuracy: float) -> dict:
    return {"accuracy": accuracy, "ci_low": accuracy - 0.05, "ci_high": accuracy + 0.05}


def test_prompt_first_verdict_follows_its_rule() -> None:
    def verdict(shots: dict[str, float], sft: float) -> str:
        r = {"prompting": {"n": 100, "sft_model": "m", "sft": figures(sft),
                           "shots": {k: figures(v) for k, v in shots.items()}}}
        return prompt_first(r)[2]

    assert verdict({"0": 0.02, "3": 0.30}, 0.97) == "prompting can't: fine-tune"
    assert verdict({"0": 0.02, "3": 0.93}, 0.97) == "prompting is enough"
    assert verdict({"0": 0.02, "3": 0.88}, 0.97) == "close"
    assert prompt_first({}) is None  # a campaign older than the row: no row


def test_the_demo_writes_its_held_out_questions_as_a_task_file(tmp_path) -> None:
    from sftkit.evaluate.tasks import read_tasks
    from sftkit_demo.tasks import write_heldout_tasks

    tasks = read_tasks(write_heldout_tasks(tmp_path / "heldout_tasks.jsonl"))
    _, heldout = split_countries(0)
    rows = heldout_questions(heldout, 0)
    assert [t.prompt[0]["content"] for t in tasks] == [r["question"] for r in rows] and len(tasks) == 216
    assert all(t.scope == "first_sentence" and t.solution for t in tasks)
