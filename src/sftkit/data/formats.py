"""Dataset rows of any common shape  ->  `Conversation` / `RawText` (see `sftkit.data.messages`).

    from sftkit.data.formats import load_records
    report = load_records("data/train.jsonl")                  # format detected from the first row
    report = load_records("qa.jsonl", columns={"prompt": "question", "completion": "answer"})
    report = load_records("big.jsonl", on_error="skip")   # report.skipped: {"unknown role": 3}
    print(report.summary())

Used by `sftkit train` and `sftkit data preview` (`--format`, `--skip-invalid`). Formats (`FORMATS`):

* ``messages``  {"messages": [{"role", "content", ...}], "tools"?, "system"?} (OpenAI / HF chat).
  Also under the key ``conversation``, or ``conversations`` when its turns carry ``role``. Extra
  message keys (``tool_calls``, ``name``, ``reasoning_content``, ...) go to `Message.extra`;
  ``tool_calls[].function.arguments`` given as a JSON string is parsed into an object, as HF
  chat templates expect. A top-level ``system`` is prepended unless the turns start with one.
* ``sharegpt``  {"conversations": [{"from", "value"}], "system"?, "tools"?}; from = human/user,
  gpt/assistant/chatgpt/bard/model, system, observation/tool (-> tool role) and function_call
  (LLaMA-Factory / glaive): an assistant turn with ``content == ""`` and
  ``extra["tool_calls"] = [{"type": "function", "function": {"name", "arguments"}}]`` parsed
  from the JSON call text, so the tokenizer's own template renders the call.
* ``alpaca``  {"instruction", "input"?, "output", "system"?, "history"?}: input is joined to the
  instruction with a blank line; history = [[user, assistant], ...] turns BEFORE the instruction.
* ``prompt_completion``  {"prompt", "completion", "reasoning"?}: strings -> user + assistant; lists
  of messages (TRL's conversational form) are taken as messages.
* ``deepseek_columns`` = prompt_completion with prompt <- ``problem``, completion <-
  ``deepseek_solution``, reasoning <- ``deepseek_reasoning`` (OpenThoughts-114k ``metadata``).
* ``text``  {"text"} (and no ``role``) -> `RawText`; also every .txt / .md file.
* ``oasst``  an OpenAssistant export tree {"message_tree_id", "prompt": {text, role, replies}}:
  the best path (lowest ``rank`` at each node; no rank or a tie -> the first reply), leaving out
  messages flagged synthetic or deleted or failing review. A tree whose root is one of those is
  dropped (counted in ``report.dropped["synthetic or deleted tree"]``).
* ``self_instruct``  {"instruction", "instances": [{"input", "output"}]} -> one conversation per
  instance.
* ``dolly`` = alpaca with input <- ``context``, output <- ``response``;  ``question_answer`` =
  prompt_completion with prompt <- ``question``, completion <- ``answer`` (GSM8K).
* ``mt_bench``  {"question_id", "turns"} questions and/or {"question_id", "choices"} answers:
  user turns from ``turns``, assistant turns from ``choices[0].turns``. FastChat ships them as two
  files, so each file alone fails with "no assistant reply" / "no user turn" (MT-Bench is an
  eval set: a prompts file is not training data; ``reference`` is ignored).

Reasoning, in every format: an assistant turn's ``reasoning_content`` / ``reasoning`` / ``thinking``
key (gpt-oss), a ``reasoning`` column beside alpaca's ``output`` or a string ``completion``, or
``<think>…</think>`` / OpenThoughts' ``<|begin_of_thought|>…<|end_of_thought|>`` at the start of a
reply all become ``Message.extra["reasoning_content"]``, the reply keeping only its answer
(`sftkit.data.fields.reasoning_of`).

Rules for every conversation: roles are system/user/assistant/tool; content is a string; there is a
user turn before the last assistant reply; no assistant reply is empty unless it makes tool calls.
Turns AFTER the last assistant reply train nothing and are removed, counted in
``report.dropped["trailing turn"]``. Any other problem is a `DataError` whose problem text starts
with its kind ("unknown role: 'bot' ..."); `load_records` raises them together as a
`DataFileError`, or with ``on_error="skip"`` skips those records and counts them by kind.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit.data.fields import (
    as_text,
    conversation,
    join,
    message,
    message_extra,
    optional_text,
    required,
    role_content,
    tool_call_message,
    tool_schemas,
    typed,
)
from sftkit.data.messages import DataError, DataFileError, Message, Problems, RawText, Record
from sftkit.config import ConfigError
from sftkit.data.sources import Row, read_paths

__all__ = ["FORMATS", "DataFileError", "LoadReport", "detect_format", "load_records", "stream_records"]

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "oasst", "self_instruct",
           "dolly", "question_answer", "mt_bench", "deepseek_columns")
PRESETS: dict[str, tuple[str, dict[str, str]]] = {  # name -> (format, columns: ours -> the file's)
    "dolly": ("alpaca", {"input": "context", "output": "response"}),
    "question_answer": ("prompt_completion", {"prompt": "question", "completion": "answer"}),
    "deepseek_columns": ("prompt_completion", {"prompt": "problem", "completion": "deepseek_solution",
                                               "reasoning": "deepseek_reasoning"}),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool",
                  "function_call": "assistant"}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
MT_BENCH_HINT = ("MT-Bench questions and answers come in separate files: join them by question_id "
                 "into one row (turns + choices) or into `messages` rows")

Adapter = Callable[[Row, str, Counter], list[Record]]


@dataclass
class LoadReport:
    """What `load_records` read: the records, and what it skipped or dropped on the way."""

    records: list[Record]  # Conversation | RawText, in file order
    problems: Problems  # invalid records: skipped and counted by kind (on_error="skip"), the first few kept
    format: str  # the detected / used format name
    path: str
    dropped: Counter[str] = field(default_factory=Counter)  # removed on purpose, not errors
    read: int = 0  # records read (`records` stays empty when they are streamed: `stream_records`)

    @property
    def skipped(self) -> Counter[str]:
        return self.problems.skipped if self.problems.skip else Counter()

    @property
    def errors(self) -> list[DataError]:
        return self.problems.errors

    def summary(self) -> str:
        """One line for people, e.g. "x.jsonl (messages): 9 records; skipped invalid: 1 bad JSON"."""
        text = f"{self.path} ({self.format}): {self.read} records"
        for label, counts in (("skipped invalid", self.skipped), ("dropped", self.dropped)):
            if counts:
                text += f"; {label}: " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
        return text


def load_records(path: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None,
                 on_error: str = "raise", max_errors: int = 5) -> LoadReport:
    """Read `path` and turn every row into records of `format` (detected from the first row).

    `path` is a file, a glob or a directory (`sources.expand_paths`): one dataset, one format.

    `columns` renames the file's columns to ours before anything else, e.g. Dolly:
    ``{"instruction": "instruction", "input": "context", "output": "response"}``.
    on_error="raise": stop at `max_errors` invalid records and raise one `DataFileError` listing
    them (or at the end of the file, if fewer). on_error="skip": skip them, count them by kind in
    `skipped` and keep the first `max_errors` in `errors`.
    """
    report, records = stream_records(path, format=format, columns=columns, on_error=on_error, max_errors=max_errors)
    report.records.extend(records)
    return report


def stream_records(path: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None,
                   on_error: str = "raise", max_errors: int = 5) -> tuple[LoadReport, Iterator[Record]]:
    """`load_records` one record at a time, for files too big to hold: the report (its `records` left
    empty; `read`, skips and drops counted as the iterator goes) and the records, read as they are
    asked for. Errors are raised where `load_records` raises them; a bad `format` at once."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if format != "auto" and format not in FORMATS:  # a user's typo: one message, before any file is read
        close = difflib.get_close_matches(format, ("auto", *FORMATS), n=1)
        raise ConfigError(f"--format / data.format: {format!r} is not a format"
                          + (f" — did you mean {close[0]!r}?" if close else "")
                          + f" (one of auto, {', '.join(FORMATS)})")
    report = LoadReport([], Problems(on_error == "skip", max_errors), format, str(path))
    return report, _records(path, report, format, dict(columns or {}))


def _records(path: str | Path, report: LoadReport, format: str, renames: dict[str, str]) -> Iterator[Record]:
    adapt: Adapter | None = None
    rows = 0
    for source, row in read_paths(path):
        rows += 1
        if adapt is None and not isinstance(row, DataError):  # an unknown format raises here
            if missing := [theirs for theirs in renames.values() if theirs not in row]:
                raise DataError(source, f"no column {', '.join(map(repr, missing))} (named by --columns / "
                                f"data.columns); this row has {', '.join(map(repr, row)) or 'no columns'}",
                                hint="map sftkit's names to the file's, e.g. prompt=question,completion=answer")
            report.format, adapt, renames = _choose(format, row, source, renames)
        try:
            if isinstance(row, DataError):
                raise row
            assert adapt is not None
            records = adapt(_rename(row, renames), source, report.dropped)
        except DataError as err:
            report.problems.add(_in_file_terms(err, renames))
            if report.problems.full:
                report.problems.raise_if_any(str(path), rows, stopped=True)
            continue
        report.read += len(records)
        yield from records
    if rows == 0:
        raise DataError(str(path), "no records: the file holds no rows")
    report.problems.raise_if_any(str(path), rows)


def detect_format(row: Mapping[str, Any], source: str = "<row>") -> str:
    """The format name of one row, from its keys; `DataError` when no format matches."""
    keys = set(row)
    for key in ("messages", "conversation", "conversations"):
        turns = row.get(key)
        if isinstance(turns, list):
            first = next((t for t in turns if isinstance(t, dict)), {})
            if "role" in first or (key == "messages" and "from" not in first):
                return "messages"
            if key == "conversations":
                return "sharegpt"
    if "message_tree_id" in keys or isinstance(row.get("prompt"), dict):
        return "oasst"
    if "instruction" in keys:
        if "instances" in keys:
            return "self_instruct"
        return "dolly" if "response" in keys and "output" not in keys else "alpaca"
    if "problem" in keys and "deepseek_solution" in keys:
        return "deepseek_columns"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "question" in keys and "answer" in keys:
        return "question_answer"
    if "question_id" in keys and ("turns" in keys or "choices" in keys):
        return "mt_bench"
    if "text" in keys and "role" not in keys:
        return "text"
    raise DataError(source, f"unknown format: no known format has the keys {sorted(keys)}",
                    hint=f"pass format= one of {', '.join(FORMATS)}, or columns= to rename columns")


def _choose(format: str, row: Row, source: str,
            columns: dict[str, str]) -> tuple[str, Adapter, dict[str, str]]:
    """The format's name, its adapter and the full column renaming (a preset's plus the user's)."""
    name = detect_format(_rename(row, columns), source) if format == "auto" else format
    base, preset = PRESETS.get(name, (name, {}))
    return name, ADAPTERS[base], {**preset, **columns}


def _rename(row: Row, columns: Mapping[str, str]) -> Row:
    """The row with the file's column names replaced by ours (`columns`: ours -> the file's)."""
    if not columns:
        return row
    theirs = set(columns.values())
    renamed = {key: value for key, value in row.items() if key not in theirs}
    renamed.update({ours: row[col] for ours, col in columns.items() if col in row})
    return renamed


def _in_file_terms(err: DataError, columns: Mapping[str, str]) -> DataError:
    """The error with its field named as the file names it (``output`` -> ``response``)."""
    if not err.field_name or not columns:
        return err
    head, rest = re.match(r"([^.\[]*)(.*)", err.field_name).groups()  # type: ignore[union-attr]
    if head not in columns:
        return err
    return DataError(err.source, err.problem, columns[head] + rest, err.hint)


# --- adapters: (row, source, dropped) -> records ------------------------------------------------

def _from_messages(row: Row, source: str, dropped: Counter) -> list[Record]:
    key = next((k for k in ("messages", "conversation", "conversations") if k in row), "messages")
    messages = role_content(typed(required(row, key, source), list, source, key), key, source)
    system = optional_text(row, "system", source)
    if system.strip() and not (messages and messages[0].role == "system"):
        messages.insert(0, Message("system", system))
    return [conversation(messages, source, dropped, tool_schemas(row, source))]


def _from_sharegpt(row: Row, source: str, dropped: Counter) -> list[Record]:
    turns = typed(required(row, "conversations", source), list, source, "conversations")
    system = optional_text(row, "system", source)
    messages = [Message("system", system)] if system.strip() else []
    for i, turn in enumerate(turns):
        name = f"conversations[{i}]"
        typed(turn, dict, source, name)
        sender = required(turn, "from", source, f"{name}.")
        if not isinstance(sender, str) or sender not in SHAREGPT_ROLES:
            expected = ", ".join(SHAREGPT_ROLES)
            raise DataError(source, f"unknown role: {sender!r} (expected one of {expected})",
                            f"{name}.from", hint="rename it, or load the file with another format=")
        value = required(turn, "value", source, f"{name}.")
        extra = message_extra(turn, ("from", "value"), source, name)
        if sender == "function_call":
            messages.append(tool_call_message(value, source, f"{name}.value", extra))
        else:
            messages.append(message(SHAREGPT_ROLES[sender], value, source, f"{name}.value", extra))
    return [conversation(messages, source, dropped, tool_schemas(row, source))]


def _from_alpaca(row: Row, source: str, dropped: Counter) -> list[Record]:
    instruction = as_text(required(row, "instruction", source), source, "instruction")
    prompt = join(instruction, optional_text(row, "input", source))
    if not prompt:
        raise DataError(source, "empty prompt: instruction and input are both empty", "instruction")
    system = optional_text(row, "system", source)
    messages = [Message("system", system)] if system.strip() else []
    for i, pair in enumerate(typed(row.get("history") or [], list, source, "history")):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(source, "bad history: each entry must be a [user, assistant] pair",
                            f"history[{i}]")
        messages.append(message("user", pair[0], source, f"history[{i}][0]"))
        messages.append(message("assistant", pair[1], source, f"history[{i}][1]"))
    messages.append(Message("user", prompt))
    messages.append(message("assistant", required(row, "output", source), source, "output", _reasoning_column(row)))
    return [conversation(messages, source, dropped)]


def _from_prompt_completion(row: Row, source: str, dropped: Counter) -> list[Record]:
    messages = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = required(row, key, source)
        if isinstance(value, list):
            messages += role_content(value, key, source)
        else:
            messages.append(message(role, value, source, key, _reasoning_column(row) if role == "assistant" else None))
    return [conversation(messages, source, dropped, tool_schemas(row, source))]


def _reasoning_column(row: Row) -> dict[str, Any]:
    """A row-level `reasoning` column, handed to the reply as its reasoning (`fields.reasoning_of`)."""
    return {"reasoning": row["reasoning"]} if row.get("reasoning") is not None else {}


def _from_text(row: Row, source: str, dropped: Counter) -> list[Record]:
    text = as_text(required(row, "text", source), source, "text")
    if not text.strip():
        raise DataError(source, "empty text: the document is empty", "text")
    return [RawText(text, source)]


def _oasst_usable(node: Mapping[str, Any]) -> bool:
    flagged = node.get("synthetic") or node.get("deleted") or node.get("review_result") is False
    return not flagged


def _oasst_rank(pair: tuple[int, Mapping[str, Any]]) -> tuple[bool, float]:
    rank = pair[1].get("rank")
    return (not isinstance(rank, (int, float)), rank if isinstance(rank, (int, float)) else 0)


def _from_oasst(row: Row, source: str, dropped: Counter) -> list[Record]:
    node, name = typed(required(row, "prompt", source), dict, source, "prompt"), "prompt"
    if not _oasst_usable(node):
        dropped["synthetic or deleted tree"] += 1
        return []
    messages = []
    while True:
        role = required(node, "role", source, f"{name}.")
        if not isinstance(role, str) or role not in OASST_ROLES:
            raise DataError(source, f"unknown role: {role!r} (expected prompter or assistant)",
                            f"{name}.role")
        text = required(node, "text", source, f"{name}.")
        messages.append(message(OASST_ROLES[role], text, source, f"{name}.text"))
        replies = typed(node.get("replies") or [], list, source, f"{name}.replies")
        usable = [(i, r) for i, r in enumerate(replies) if isinstance(r, dict) and _oasst_usable(r)]
        if not usable:
            return [conversation(messages, source, dropped)]
        index, node = min(usable, key=_oasst_rank)  # min() keeps the first of equal ranks
        name = f"{name}.replies[{index}]"


def _from_self_instruct(row: Row, source: str, dropped: Counter) -> list[Record]:
    instruction = as_text(required(row, "instruction", source), source, "instruction")
    records: list[Record] = []
    for i, instance in enumerate(typed(required(row, "instances", source), list, source, "instances")):
        name = f"instances[{i}]"
        typed(instance, dict, source, name)
        prompt = join(instruction, optional_text(instance, "input", source, f"{name}."))
        output = required(instance, "output", source, f"{name}.")
        reply = message("assistant", output, source, f"{name}.output")
        records.append(conversation([Message("user", prompt), reply], source, dropped))
    if not records:
        raise DataError(source, "no assistant reply: 'instances' is empty", "instances")
    return records


def _from_mt_bench(row: Row, source: str, dropped: Counter) -> list[Record]:
    questions = typed(row.get("turns") or [], list, source, "turns")
    choices = typed(row.get("choices") or [{}], list, source, "choices")
    answers = typed(typed(choices[0], dict, source, "choices[0]").get("turns") or [], list, source,
                     "choices[0].turns")
    messages = []
    for i in range(max(len(questions), len(answers))):
        if i < len(questions):
            messages.append(message("user", questions[i], source, f"turns[{i}]"))
        if i < len(answers):
            messages.append(message("assistant", answers[i], source, f"choices[0].turns[{i}]"))
    return [conversation(messages, source, dropped, hint=MT_BENCH_HINT)]


ADAPTERS: dict[str, Adapter] = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion, "text": _from_text, "oasst": _from_oasst,
    "self_instruct": _from_self_instruct, "mt_bench": _from_mt_bench,
}
