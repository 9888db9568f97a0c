"""The demo's questions as a task file for `sftkit eval`, judged exactly as the demo judges them.

    python -m sftkit_demo.tasks runs/demo/data/heldout_tasks.jsonl          # (sftkit demo writes it too)
    sftkit eval --model runs/demo/sft/final --tasks runs/demo/data/heldout_tasks.jsonl --max-new-tokens 32
    sftkit eval --model demo/base-model --tasks runs/demo/data/heldout_tasks.jsonl --few-shot 3 --max-new-tokens 32

`sftkit_demo.score.judge` as task-file fields: the fact must be in the reply's first sentence
(`scope: first_sentence`; a first sentence that is a question is no answer), outside the country's own
name (`ignore: [country]`, left out when the fact contains the name, as "Mexico City" does). The
full-sentence reference is the `solution` shown in few-shot prompts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sftkit_demo.chats import heldout_questions
from sftkit_demo.dataset import write_jsonl
from sftkit_demo.world import split_countries


def task_item(row: dict[str, Any]) -> dict[str, Any]:
    """A demo question row ({country, attribute, question, answer, reference}) as a task-file item."""
    item = {"id": f"{row['country']}/{row['attribute']}", "prompt": row["question"], "expected": row["answer"],
            "scope": "first_sentence", "solution": row["reference"]}
    if row["country"].lower() not in row["answer"].lower():
        item["ignore"] = [row["country"]]
    return item


def write_heldout_tasks(path: str | Path, seed: int = 0) -> Path:
    """Every held-out question of the demo (the 216 its closing table scores, in its order) as a task file."""
    _, heldout = split_countries(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, [task_item(r) for r in heldout_questions(heldout, seed)])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("runs/demo/data/heldout_tasks.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_heldout_tasks(args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
