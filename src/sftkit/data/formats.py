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
* ``prompt_completion``  {"prompt", "completion"}: strings -> user + assistant; lists of
  messages (TRL's conversational form) are taken as messages.
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

Rules for every conversation: roles are system/user/assistant/tool; content is a string; there is a
user turn before the last assistant reply; no assistant reply is empty unless it makes tool calls.
Turns AFTER the last assistant reply train nothing and are removed, counted in
``report.dropped["trailing turn"]``. Any other problem is a `DataError` whose problem text starts
with its kind ("unknown role: 'bot' ..."); `load_records` raises them together as a
`DataFileError`, or with ``on_error="skip"`` skips those records and counts them by kind.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sftkit.data.messages import ROLES, Conversation, DataError, Message, RawText, Record
from sftkit.data.sources import DataFileError, LoadReport, Row, json_type, read_rows

__all__ = ["FORMATS", "DataFileError", "LoadReport", "detect_format", "load_records"]

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "oasst", "self_instruct",
           "dolly", "question_answer", "mt_bench")
PRESETS: dict[str, tuple[str, dict[str, str]]] = {  # name -> (format, columns: ours -> the file's)
    "dolly": ("alpaca", {"input": "context", "output": "response"}),
    "question_answer": ("prompt_completion", {"prompt": "question", "completion": "answer"}),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool",
                  "function_call": "assistant"}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
ROLE_HINT = "rename the role, or use format='sharegpt' for {from, value} turns"
MT_BENCH_HINT = ("MT-Bench questions and answers come in separate files: join them by question_id "
                 "into one row (turns + choices) or into `messages` rows")

Adapter = Callable[[Row, str, Counter], list[Record]]


def load_records(path: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None,
                 on_error: str = "raise", max_errors: int = 5) -> LoadReport:
    """Read `path` and turn every row into records of `format` (detected from the first row).

    `columns` renames the file's columns to ours before anything else, e.g. Dolly:
    ``{"instruction": "instruction", "input": "context", "output": "response"}``.
    on_error="raise": stop at `max_errors` invalid records and raise one `DataFileError` listing
    them (or at the end of the file, if fewer). on_error="skip": skip them, count them by kind in
    `skipped` and keep the first `max_errors` in `errors`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of auto, {', '.join(FORMATS)}")
    report = LoadReport([], Counter(), [], format, str(path))
    adapt: Adapter | None = None
    renames = dict(columns or {})
    invalid = rows = 0
    for source, row in read_rows(path):
        rows += 1
        if adapt is None and not isinstance(row, DataError):  # an unknown format raises here
            report.format, adapt, renames = _choose(format, row, source, renames)
        try:
            if isinstance(row, DataError):
                raise row
            assert adapt is not None
            report.records.extend(adapt(_rename(row, renames), source, report.dropped))
        except DataError as err:
            invalid += 1
            if len(report.errors) < max_errors:
                report.errors.append(_in_file_terms(err, renames))
            if on_error == "skip":
                report.skipped[err.kind] += 1
            elif invalid >= max(max_errors, 1):
                raise DataFileError(str(path), report.errors, invalid, rows, stopped=True) from None
    if rows == 0:
        raise DataError(str(path), "no records: the file holds no rows")
    if invalid and on_error == "raise":
        raise DataFileError(str(path), report.errors, invalid, rows, stopped=False)
    return report


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


# --- shared checks -------------------------------------------------------------------------------

def _get(row: Mapping[str, Any], key: str, source: str, prefix: str = "") -> Any:
    if row.get(key) is None:
        raise DataError(source, "missing field: absent or null", prefix + key)
    return row[key]


def _typed(value: Any, kind: type, source: str, field_name: str) -> Any:
    if not isinstance(value, kind):
        expected = "a list" if kind is list else "an object"
        raise DataError(source, f"wrong type: expected {expected}, got {json_type(value)}", field_name)
    return value


def _text(value: Any, source: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise DataError(source, f"non-string content: got {json_type(value)}", field_name,
                        hint="content must be a string")
    return value


def _optional_text(row: Mapping[str, Any], key: str, source: str, prefix: str = "") -> str:
    value = row.get(key)
    return "" if value is None else _text(value, source, prefix + key)


def _message(role: str, content: Any, source: str, field_name: str,
             extra: dict[str, Any] | None = None) -> Message:
    extra = extra or {}
    if content is None and extra.get("tool_calls"):
        content = ""
    text = _text(content, source, field_name)
    if role == "assistant" and not text.strip() and not extra.get("tool_calls"):
        raise DataError(source, "empty reply: the assistant message is empty", field_name,
                        hint="remove the record or write the reply")
    return Message(role, text, extra)


def _join(*parts: str) -> str:
    return "\n\n".join(part for part in parts if part.strip())


def _conversation(messages: list[Message], source: str, dropped: Counter, tools: Any = None,
                  hint: str | None = None) -> Conversation:
    """Checks a conversation as a whole and removes the turns after its last assistant reply."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
        raise DataError(source, "no assistant reply: nothing to train on", hint=hint)
    if not any(m.role == "user" for m in messages[:last]):
        raise DataError(source, "no user turn: no user message before the assistant reply", hint=hint)
    if last + 1 < len(messages):
        dropped["trailing turn"] += len(messages) - last - 1
    return Conversation(messages[:last + 1], source, tools)


def _tools(row: Mapping[str, Any], source: str) -> list[dict[str, Any]] | None:
    """Tool schemas as HF templates take them: [{"type": "function", "function": {...}}]."""
    tools = row.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError) as err:
            raise DataError(source, f"bad tools: not JSON ({_json_problem(err)})", "tools") from None
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(source, "bad tools: expected a list of tool schemas (objects)", "tools")
    return [t if "type" in t or "name" not in t else {"type": "function", "function": t} for t in tools]


def _arguments(value: Any) -> Any:
    """Tool-call arguments as an object when they are a JSON-object string (OpenAI wire format)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def _json_problem(err: ValueError | RecursionError) -> str:
    """What json.loads disliked: its message, or the limit it hit (deep nesting, a huge number)."""
    if isinstance(err, json.JSONDecodeError):
        return err.msg
    return "nested too deeply" if isinstance(err, RecursionError) else str(err).split(":")[0]


def _extra(turn: Mapping[str, Any], known: tuple[str, ...], source: str,
           field_name: str) -> dict[str, Any]:
    extra = {key: value for key, value in turn.items() if key not in known and value is not None}
    if "tool_calls" in extra:
        calls = _typed(extra["tool_calls"], list, source, f"{field_name}.tool_calls")
        for i, call in enumerate(calls):
            _check_tool_call(call, source, f"{field_name}.tool_calls[{i}]")
        extra["tool_calls"] = [_with_parsed_arguments(call) for call in calls]
    return extra


def _check_tool_call(call: Any, source: str, field_name: str) -> None:
    """A tool call is {"function": {"name": str, "arguments": ...}} (OpenAI) or {"name": str, ...}."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataError(source, "bad tool call: expected an object with a string function name", field_name,
                        hint='e.g. {"type": "function", "function": {"name": "f", "arguments": {...}}}')


def _with_parsed_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or "arguments" not in function:
        return call
    return {**call, "function": {**function, "arguments": _arguments(function["arguments"])}}


# --- adapters: (row, source, dropped) -> records ------------------------------------------------

def _role_content(turns: list[Any], key: str, source: str) -> list[Message]:
    messages = []
    for i, turn in enumerate(turns):
        name = f"{key}[{i}]"
        _typed(turn, dict, source, name)
        role = _get(turn, "role", source, f"{name}.")
        if role not in ROLES:
            raise DataError(source, f"unknown role: {role!r} (expected one of {', '.join(ROLES)})",
                            f"{name}.role", hint=ROLE_HINT)
        extra = _extra(turn, ("role", "content"), source, name)
        has_calls = bool(extra.get("tool_calls"))  # content may be null beside tool calls
        content = turn.get("content") if has_calls else _get(turn, "content", source, f"{name}.")
        messages.append(_message(role, content, source, f"{name}.content", extra))
    return messages


def _from_messages(row: Row, source: str, dropped: Counter) -> list[Record]:
    key = next((k for k in ("messages", "conversation", "conversations") if k in row), "messages")
    messages = _role_content(_typed(_get(row, key, source), list, source, key), key, source)
    system = _optional_text(row, "system", source)
    if system.strip() and not (messages and messages[0].role == "system"):
        messages.insert(0, Message("system", system))
    return [_conversation(messages, source, dropped, _tools(row, source))]


def _tool_call(value: Any, source: str, field_name: str, extra: dict[str, Any]) -> Message:
    hint = 'expected {"name": ..., "arguments": {...}} (or a list of them)'
    try:
        call = json.loads(_text(value, source, field_name))
    except (ValueError, RecursionError) as err:
        raise DataError(source, f"bad tool call: not JSON ({_json_problem(err)})", field_name, hint) from None
    calls = call if isinstance(call, list) else [call]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise DataError(source, "bad tool call: no function name", field_name, hint)
    tool_calls = [{"type": "function",
                   "function": {"name": c["name"], "arguments": _arguments(c.get("arguments", {}))}}
                  for c in calls]
    return Message("assistant", "", {**extra, "tool_calls": tool_calls})


def _from_sharegpt(row: Row, source: str, dropped: Counter) -> list[Record]:
    turns = _typed(_get(row, "conversations", source), list, source, "conversations")
    system = _optional_text(row, "system", source)
    messages = [Message("system", system)] if system.strip() else []
    for i, turn in enumerate(turns):
        name = f"conversations[{i}]"
        _typed(turn, dict, source, name)
        sender = _get(turn, "from", source, f"{name}.")
        if not isinstance(sender, str) or sender not in SHAREGPT_ROLES:
            expected = ", ".join(SHAREGPT_ROLES)
            raise DataError(source, f"unknown role: {sender!r} (expected one of {expected})",
                            f"{name}.from", hint="rename it, or load the file with another format=")
        value = _get(turn, "value", source, f"{name}.")
        extra = _extra(turn, ("from", "value"), source, name)
        if sender == "function_call":
            messages.append(_tool_call(value, source, f"{name}.value", extra))
        else:
            messages.append(_message(SHAREGPT_ROLES[sender], value, source, f"{name}.value", extra))
    return [_conversation(messages, source, dropped, _tools(row, source))]


def _from_alpaca(row: Row, source: str, dropped: Counter) -> list[Record]:
    instruction = _text(_get(row, "instruction", source), source, "instruction")
    prompt = _join(instruction, _optional_text(row, "input", source))
    if not prompt:
        raise DataError(source, "empty prompt: instruction and input are both empty", "instruction")
    system = _optional_text(row, "system", source)
    messages = [Message("system", system)] if system.strip() else []
    for i, pair in enumerate(_typed(row.get("history") or [], list, source, "history")):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(source, "bad history: each entry must be a [user, assistant] pair",
                            f"history[{i}]")
        messages.append(_message("user", pair[0], source, f"history[{i}][0]"))
        messages.append(_message("assistant", pair[1], source, f"history[{i}][1]"))
    messages.append(Message("user", prompt))
    messages.append(_message("assistant", _get(row, "output", source), source, "output"))
    return [_conversation(messages, source, dropped)]


def _from_prompt_completion(row: Row, source: str, dropped: Counter) -> list[Record]:
    messages = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = _get(row, key, source)
        if isinstance(value, list):
            messages += _role_content(value, key, source)
        else:
            messages.append(_message(role, value, source, key))
    return [_conversation(messages, source, dropped, _tools(row, source))]


def _from_text(row: Row, source: str, dropped: Counter) -> list[Record]:
    text = _text(_get(row, "text", source), source, "text")
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
    node, name = _typed(_get(row, "prompt", source), dict, source, "prompt"), "prompt"
    if not _oasst_usable(node):
        dropped["synthetic or deleted tree"] += 1
        return []
    messages = []
    while True:
        role = _get(node, "role", source, f"{name}.")
        if not isinstance(role, str) or role not in OASST_ROLES:
            raise DataError(source, f"unknown role: {role!r} (expected prompter or assistant)",
                            f"{name}.role")
        text = _get(node, "text", source, f"{name}.")
        messages.append(_message(OASST_ROLES[role], text, source, f"{name}.text"))
        replies = _typed(node.get("replies") or [], list, source, f"{name}.replies")
        usable = [(i, r) for i, r in enumerate(replies) if isinstance(r, dict) and _oasst_usable(r)]
        if not usable:
            return [_conversation(messages, source, dropped)]
        index, node = min(usable, key=_oasst_rank)  # min() keeps the first of equal ranks
        name = f"{name}.replies[{index}]"


def _from_self_instruct(row: Row, source: str, dropped: Counter) -> list[Record]:
    instruction = _text(_get(row, "instruction", source), source, "instruction")
    records: list[Record] = []
    for i, instance in enumerate(_typed(_get(row, "instances", source), list, source, "instances")):
        name = f"instances[{i}]"
        _typed(instance, dict, source, name)
        prompt = _join(instruction, _optional_text(instance, "input", source, f"{name}."))
        output = _get(instance, "output", source, f"{name}.")
        reply = _message("assistant", output, source, f"{name}.output")
        records.append(_conversation([Message("user", prompt), reply], source, dropped))
    if not records:
        raise DataError(source, "no assistant reply: 'instances' is empty", "instances")
    return records


def _from_mt_bench(row: Row, source: str, dropped: Counter) -> list[Record]:
    questions = _typed(row.get("turns") or [], list, source, "turns")
    choices = _typed(row.get("choices") or [{}], list, source, "choices")
    answers = _typed(_typed(choices[0], dict, source, "choices[0]").get("turns") or [], list, source,
                     "choices[0].turns")
    messages = []
    for i in range(max(len(questions), len(answers))):
        if i < len(questions):
            messages.append(_message("user", questions[i], source, f"turns[{i}]"))
        if i < len(answers):
            messages.append(_message("assistant", answers[i], source, f"choices[0].turns[{i}]"))
    return [_conversation(messages, source, dropped, hint=MT_BENCH_HINT)]


ADAPTERS: dict[str, Adapter] = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion, "text": _from_text, "oasst": _from_oasst,
    "self_instruct": _from_self_instruct, "mt_bench": _from_mt_bench,
}
