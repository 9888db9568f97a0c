"""Task files: questions with the answer a reply must give, read with file:line errors, and judged.

    sftkit eval --model runs/sft/final --tasks tasks.jsonl          # sftkit.evaluate.task_eval runs them
    sftkit train RECIPE eval.tasks=tasks.jsonl                      # ... and at every eval while training

One JSON object a line (.jsonl; .json and .parquet are read too, as training data is):

    {"prompt": "What's the capital of Mali?", "expected": "Bamako"}                        # match: contains
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "expected": "42", "match": "numeric"}
    {"prompt": "2+2?", "expected": "^4\\b", "match": "regex"}
    {"prompt": "Capital of Peru?", "choices": ["Lima", "Quito"], "answer": 0}               # log-likelihood

`messages` ending with an assistant turn: that turn is the item's solution, everything before it the
prompt. Optional fields: `solution` (the solved answer shown in few-shot prompts), `scope` and `ignore`
(below), `id`. `expected` may be a list: any one of them matches.

Matching a reply (`match`), case-insensitive except `regex` (write `(?i)` for that):

    contains  the expected text appears in the reply (the default)
    exact     the reply equals it, ignoring surrounding white space and a final `.`
    regex     `re.search(expected, reply)` finds it
    numeric   the reply's last number equals it (commas dropped: "1,234" = 1234; "#### 18" -> 18)

`scope: first_sentence` judges only the reply's first sentence (up to `.`, `?` or `!` and a space, or
a line break), and a first sentence that is a question answers nothing. `ignore` lists texts taken out
of the reply before matching (a country's own name, so "Bissau" is not found in "Guinea-Bissau").
A reply *answered* when it is not empty and its first sentence is not a question.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit.data.messages import DataError
from sftkit.data.sources import json_type, read_rows

MATCHES = ("contains", "exact", "regex", "numeric")
SCOPES = ("reply", "first_sentence")
ROLES = ("system", "user", "assistant")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s|\n")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass
class Task:
    """One item of a task file: the prompt messages, what a correct reply gives, and where it was read."""

    source: str
    """file:line of the item."""
    prompt: list[dict[str, str]]
    expected: list[str] = field(default_factory=list)
    match: str = "contains"
    choices: list[str] | None = None
    answer: int | None = None
    """Index of the right choice (multiple choice)."""
    solution: str | None = None
    scope: str = "reply"
    ignore: list[str] = field(default_factory=list)
    id: str | None = None

    def solved(self) -> str:
        """The answer shown when this item is a few-shot example."""
        if self.solution is not None:
            return self.solution
        if self.choices is not None:
            return self.choices[self.answer or 0]
        if self.match == "regex":
            raise DataError(self.source, "a regex item needs a \"solution\" to be shown as a few-shot example",
                            hint="add \"solution\": the answer written out, or choose other items for --few-shot")
        return self.expected[0]


def read_tasks(path: str | Path) -> list[Task]:
    """Every item of a task file; the first bad one raises a DataError naming file:line and field."""
    tasks = []
    for source, row in read_rows(path):
        if isinstance(row, DataError):
            raise row
        tasks.append(parse_task(source, row))
    if not tasks:
        raise DataError(str(path), "no task items", hint="one JSON object a line with \"prompt\" or \"messages\"")
    return tasks


def parse_task(source: str, row: dict[str, Any]) -> Task:
    """One row of a task file, checked field by field."""
    known = {"prompt", "messages", "expected", "match", "choices", "answer", "solution", "scope", "ignore", "id"}
    if unknown := sorted(set(row) - known):
        raise DataError(source, f"unknown field {unknown[0]!r}", hint=f"a task item has {', '.join(sorted(known))}")
    prompt, solution = _prompt(source, row)
    solution = _text(source, row, "solution") if row.get("solution") is not None else solution
    task = Task(source, prompt, solution=solution, id=None if row.get("id") is None else str(row["id"]))
    if "choices" in row:
        choices = row["choices"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise DataError(source, f"expected a list of at least 2 non-empty strings, got {json_type(choices)}",
                            "choices")
        answer = row.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
            raise DataError(source, f"expected the index of the right choice (0..{len(choices) - 1}) or its text, "
                            f"got {answer!r}", "answer")
        task.choices, task.answer = choices, answer
        return task
    if "expected" not in row:
        raise DataError(source, "no \"expected\" answer", hint="add \"expected\" (with \"match\"), or "
                        "\"choices\" and \"answer\" for multiple choice")
    expected = row["expected"]
    expected = [expected] if isinstance(expected, (str, int, float)) and not isinstance(expected, bool) else expected
    if not (isinstance(expected, list) and expected and all(isinstance(e, (str, int, float)) for e in expected)):
        raise DataError(source, f"expected a string, a number or a list of them, got {json_type(row['expected'])}",
                        "expected")
    task.expected = [str(e) for e in expected]
    task.match = row.get("match", "contains")
    if task.match not in MATCHES:
        raise DataError(source, f"unknown match {task.match!r}", "match", hint=f"one of {', '.join(MATCHES)}")
    task.scope = row.get("scope", "reply")
    if task.scope not in SCOPES:
        raise DataError(source, f"unknown scope {task.scope!r}", "scope", hint=f"one of {', '.join(SCOPES)}")
    for e in task.expected:
        if task.match == "regex":
            try:
                re.compile(e)
            except re.error as err:
                raise DataError(source, f"not a regular expression: {e!r} ({err})", "expected") from None
        if task.match == "numeric" and _number(e) is None:
            raise DataError(source, f"not a number: {e!r}", "expected", hint="match: numeric compares numbers")
        if not e.strip():
            raise DataError(source, "an empty expected answer matches every reply", "expected")
    ignore = row.get("ignore", [])
    ignore = [ignore] if isinstance(ignore, str) else ignore
    if not (isinstance(ignore, list) and all(isinstance(i, str) and i for i in ignore)):
        raise DataError(source, "expected a string or a list of non-empty strings", "ignore")
    task.ignore = ignore
    return task


def _text(source: str, row: dict[str, Any], name: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise DataError(source, f"expected a string, got {json_type(value)}", name)
    return value


def _prompt(source: str, row: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    """(prompt messages, the final assistant turn if `messages` ends with one)."""
    if "prompt" in row:
        text = _text(source, row, "prompt")
        if not text.strip():
            raise DataError(source, "empty prompt", "prompt")
        return [{"role": "user", "content": text}], None
    if "messages" not in row:
        raise DataError(source, "no \"prompt\" or \"messages\"", hint="a task item is asked through one of them")
    messages = row["messages"]
    if not (isinstance(messages, list) and messages):
        raise DataError(source, f"expected a non-empty list, got {json_type(messages)}", "messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise DataError(source, "expected {\"role\": system|user|assistant, \"content\": string}",
                            f"messages[{i}]")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    solution = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
    if not messages or messages[-1]["role"] != "user":
        raise DataError(source, "the prompt must end with a user message (an optional assistant turn after it "
                        "is the solution)", "messages")
    return messages, solution


# -- judging ------------------------------------------------------------------------------------
def first_sentence(text: str) -> str:
    """Text up to the first sentence end or line break ("Paris. What is ..." -> "Paris.")."""
    text = text.strip()
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip() if text else ""


def answered(reply: str) -> bool:
    """Not empty, and the first sentence is a statement (a base model continuing a quiz writes a question)."""
    sentence = first_sentence(reply)
    return bool(sentence) and not sentence.endswith("?")


def _number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def judge(task: Task, reply: str) -> bool:
    """Is `reply` a correct answer to `task` (a generated item, not multiple choice)?"""
    text = first_sentence(reply) if task.scope == "first_sentence" else reply.strip()
    if task.scope == "first_sentence" and text.endswith("?"):
        return False
    for name in task.ignore:
        text = re.sub(re.escape(name), "", text, flags=re.IGNORECASE)
    return any(_matches(task.match, expected, text) for expected in task.expected)


def _matches(match: str, expected: str, text: str) -> bool:
    if match == "contains":
        return expected.lower() in text.lower()
    if match == "exact":
        def norm(s: str) -> str:
            return s.strip().removesuffix(".").strip().lower()
        return norm(text) == norm(expected)
    if match == "regex":
        return re.search(expected, text) is not None
    got, want = _number(text), _number(expected)
    return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a share `correct / n` (sound at 0%, 100% and small n)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# -- few-shot prompts ---------------------------------------------------------------------------
def shots_for(tasks: list[Task], index: int, k: int) -> list[Task]:
    """The K solved examples shown before item `index`: the first K items of the file other than itself."""
    return [t for i, t in enumerate(tasks) if i != index][:k]


def few_shot_messages(task: Task, shots: list[Task]) -> list[dict[str, str]]:
    """The prompt as a conversation with each shot a solved user/assistant exchange before it (after a
    leading system message): few-shot for a model with a chat template."""
    head = task.prompt[:1] if task.prompt[0]["role"] == "system" else []
    solved = []
    for shot in shots:
        solved += [m for m in shot.prompt if m["role"] != "system"] + [{"role": "assistant", "content": shot.solved()}]
    return head + solved + task.prompt[len(head):]


def plain_text(messages: list[dict[str, str]]) -> str:
    """A conversation as plain text for a model without a template: a system line, then `Question:` /
    `Answer:` lines, blank lines between exchanges, ending with `Answer:` for the model to complete."""
    parts: list[str] = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip() + "\n\n")
        elif m["role"] == "user":
            parts.append(f"Question: {m['content'].strip()}\n")
        else:
            parts.append(f"Answer: {m['content'].strip()}\n\n")
    return "".join(parts) + "Answer:"


PLAIN_STOPS = ("\n\n", "\nQuestion:")
"""Where a plain-text answer ends: the blank line before the next exchange, or a next question."""


def cut_plain(text: str) -> tuple[str, bool]:
    """A plain-text continuation up to its first PLAIN_STOPS (reply, True), or all of it (text, False)."""
    ends = [text.find(s) for s in PLAIN_STOPS if s in text]
    return (text[: min(ends)].strip(), True) if ends else (text.strip(), False)
