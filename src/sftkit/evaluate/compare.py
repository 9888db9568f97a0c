"""Side by side: what the base model and the tuned model reply to the same prompts, greedily.

    sftkit compare models/base runs/sft/final --prompts prompts.txt [--out compare.md] [--max-new-tokens 128]

Both models get exactly the prompt training used: the tuned directory's tokenizer and chat template
(with the `data.template_kwargs` of its run), and its end-of-turn stop tokens. A base model without
that template's control tokens is grown to the tuned tokenizer the way training grew it (new rows at
the mean of the old ones), so both read the same ids. TUNED may be a LoRA adapter directory.

Prompts: a .txt file with one prompt per line, or .jsonl rows with a "prompt" string or "messages"
(everything before the last assistant message is the prompt). The table shows each reply and whether
it ended its turn (`stop`) or ran into --max-new-tokens (`...`).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit.generate import (
    Reply,
    generate_reply,
    load_for_generation,
    training_template_kwargs,
)
from sftkit.lora import load_base_for_adapter
from sftkit.model import check_local_dir, resolve_device


@dataclass
class Row:
    """One prompt and the two replies."""

    prompt: list[dict[str, Any]]
    base: Reply
    tuned: Reply

    @property
    def question(self) -> str:
        return self.prompt[-1]["content"]


def read_prompts(path: str | Path) -> list[list[dict[str, Any]]]:
    """Message lists from a .txt (one user prompt per line) or .jsonl ({"prompt"} or {"messages"}) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: {path} is not a file")
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        return [[{"role": "user", "content": line.strip()}] for _, line in lines]
    prompts = []
    for number, line in lines:
        row = json.loads(line)
        if isinstance(row.get("prompt"), str):
            prompts.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row.get("messages"), list):
            messages = row["messages"]
            roles = [m.get("role") for m in messages]
            end = len(roles) - 1 - roles[::-1].index("assistant") if "assistant" in roles else len(roles)
            prompts.append(messages[:end])
        else:
            raise ValueError(f"--prompts: {path}:{number}: expected a \"prompt\" string or a \"messages\" list")
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompt")
    return prompts


def compare(base: str | Path, tuned: str | Path, prompts: list[list[dict[str, Any]]], *, max_new_tokens: int = 128,
            device: str = "auto") -> list[Row]:
    """Greedy replies of both models to every prompt, with the tuned model's template and stop tokens."""
    check_local_dir(base, "BASE")
    target = resolve_device(device)
    tuned_model, tokenizer = load_for_generation(tuned, device=device)
    base_model, _ = load_base_for_adapter(tuned, base=base)  # the base, grown to the tuned tokenizer if needed
    base_model = base_model.to(target).eval()
    kwargs = training_template_kwargs(tuned)
    rows = []
    for prompt in prompts:
        replies = [generate_reply(model, tokenizer, prompt, max_new_tokens=max_new_tokens, template_kwargs=kwargs)
                   for model in (base_model, tuned_model)]
        rows.append(Row(prompt, *replies))
    return rows


def _mark(reply: Reply) -> str:
    return reply.text + ("" if reply.stopped else " ...")


def table(rows: list[Row], width: int | None = None) -> str:
    """Three wrapped columns, prompt | base | tuned, sized to the terminal."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    col = max(20, (width - 6) // 3)
    lines = [f"{'prompt':<{col}}  {'base':<{col}}  {'tuned':<{col}}", "-" * (3 * col + 4)]
    for row in rows:
        cells = [textwrap.wrap(text, col) or [""] for text in (row.question, _mark(row.base), _mark(row.tuned))]
        for i in range(max(map(len, cells))):
            lines.append("  ".join(f"{(c[i] if i < len(c) else ''):<{col}}" for c in cells).rstrip())
        lines.append("")
    lines.append(f"'...' = stopped by --max-new-tokens before the end of the turn; ended their turn: {_ended(rows)}")
    return "\n".join(lines)


def _ended(rows: list[Row]) -> str:
    n = len(rows)
    return f"base {sum(r.base.stopped for r in rows)}/{n}, tuned {sum(r.tuned.stopped for r in rows)}/{n}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def markdown(rows: list[Row], base: str | Path, tuned: str | Path) -> str:
    """A markdown table of the same comparison, headed by the command that made it."""
    short = ["/".join(Path(p).parts[-2:]) for p in (tuned, base)]
    lines = [f"# {short[0]} vs {short[1]}", "",
             f"Greedy replies, the tuned model's chat template for both. Base: `{base}`; tuned: `{tuned}`.", "",
             "| # | prompt | base | tuned |", "|---|---|---|---|"]
    for n, row in enumerate(rows, 1):
        lines.append(f"| {n} | {_cell(row.question)} | {_cell(_mark(row.base))} | {_cell(_mark(row.tuned))} |")
    lines += ["", f"`...` = cut by the token limit before the end of the turn. Ended their turn: {_ended(rows)}.", ""]
    return "\n".join(lines)
