"""Write every demo data file from the world, deterministically.

    >>> from sftkit_demo.dataset import write_demo_data
    >>> write_demo_data("demo/data", seed=0)

Files written (all JSON Lines except split.json):
  pretrain.jsonl            {"text": ...}          one pre-training document per row (all countries)
  sft_train.jsonl           {"messages": [...]}    SFT conversations, trained countries only
  sft_eval.jsonl            {"messages": [...]}    SFT evaluation conversations, trained countries only
  heldout_questions.jsonl   {"country", "attribute", "question", "answer", "reference"}
  split.json                {"seed", "trained": [...], "heldout": [...]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sftkit_demo.chats import build_sft, heldout_questions
from sftkit_demo.corpus import build_corpus
from sftkit_demo.world import split_countries

FILES = ("pretrain.jsonl", "sft_train.jsonl", "sft_eval.jsonl", "heldout_questions.jsonl", "split.json")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON Lines (UTF-8, one object per line); return how many."""
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file written by `write_jsonl`."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_demo_data(out_dir: str | Path, seed: int = 0) -> dict[str, int]:
    """Write the demo's data files to `out_dir`; return the number of rows per file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained, heldout = split_countries(seed)
    sft_train, sft_eval = build_sft(trained, seed)
    counts = {
        "pretrain.jsonl": write_jsonl(out / "pretrain.jsonl", ({"text": t} for t in build_corpus(seed))),
        "sft_train.jsonl": write_jsonl(out / "sft_train.jsonl", sft_train),
        "sft_eval.jsonl": write_jsonl(out / "sft_eval.jsonl", sft_eval),
        "heldout_questions.jsonl": write_jsonl(out / "heldout_questions.jsonl", heldout_questions(heldout, seed)),
    }
    split = {"seed": seed, "trained": [c.name for c in trained], "heldout": [c.name for c in heldout]}
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
    return counts
