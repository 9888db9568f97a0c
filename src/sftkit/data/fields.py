"""One row's fields  ->  checked `Message`s and `Conversation`s, each problem a `DataError`.

The field-level rules every format in `sftkit.data.formats` shares: a required field is present, a
value has the right JSON type, content is a string, an assistant reply is not empty unless it calls
tools, tool calls and tool schemas have the shape HF chat templates take (arguments parsed from a
JSON string into an object), and a conversation has a user turn before its last assistant reply.

Reasoning ("thinking") is normalised into `Message.extra["reasoning_content"]`, the field HF chat
templates read, whatever shape the row gives it in (`reasoning_of`):
  {"reasoning_content": R} / {"reasoning": R} / {"thinking": R} (gpt-oss)   on an assistant turn
  "<think>R</think>A"                                   inline, at the start of the content (DeepSeek-R1, Qwen3)
  "<|begin_of_thought|>R<|end_of_thought|> <|begin_of_solution|>A<|end_of_solution|>"   (OpenThoughts, Bespoke-Stratos)
The content keeps only the answer A; how the reasoning reaches the template is `sftkit.data.render`'s job.
Every error names the field as the file names it, so `load_records` can point at it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from sftkit.data.messages import ROLES, Conversation, DataError, Message
from sftkit.data.sources import json_type

ROLE_HINT = "rename the role, or use format='sharegpt' for {from, value} turns"
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # message keys that hold an assistant's reasoning
_INLINE_REASONING = (  # (reasoning, answer) at the start of a reply: <think>R</think>A, OpenThoughts' markers
    re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL),
    re.compile(r"\s*<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>\s*"
               r"(?:<\|begin_of_solution\|>(.*?)<\|end_of_solution\|>\s*\Z|(.*))", re.DOTALL),
)


def required(row: Mapping[str, Any], key: str, source: str, prefix: str = "") -> Any:
    if row.get(key) is None:
        raise DataError(source, "missing field: absent or null", prefix + key)
    return row[key]


def typed(value: Any, kind: type, source: str, field_name: str) -> Any:
    if not isinstance(value, kind):
        expected = "a list" if kind is list else "an object"
        raise DataError(source, f"wrong type: expected {expected}, got {json_type(value)}", field_name)
    return value


def as_text(value: Any, source: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise DataError(source, f"non-string content: got {json_type(value)}", field_name,
                        hint="content must be a string")
    return value


def optional_text(row: Mapping[str, Any], key: str, source: str, prefix: str = "") -> str:
    value = row.get(key)
    return "" if value is None else as_text(value, source, prefix + key)


def message(role: str, content: Any, source: str, field_name: str,
            extra: dict[str, Any] | None = None) -> Message:
    extra = extra or {}
    if content is None and extra.get("tool_calls"):
        content = ""
    text = as_text(content, source, field_name)
    if role == "assistant":
        text, extra = reasoning_of(text, extra, source, field_name)
    if role == "assistant" and not text.strip() and not extra.get("tool_calls"):
        raise DataError(source, "empty reply: the assistant message is empty", field_name,
                        hint="remove the record or write the reply")
    return Message(role, text, extra)


def reasoning_of(text: str, extra: dict[str, Any], source: str,
                 field_name: str) -> tuple[str, dict[str, Any]]:
    """(answer, extra with `reasoning_content`) of an assistant turn: the reasoning from a message key
    (`REASONING_KEYS`) or inline at the start of the content; an error when it is given twice."""
    extra = dict(extra)
    keys = [key for key in REASONING_KEYS if key in extra]
    given = [as_text(extra.pop(key), source, field_name.rpartition(".")[0] + "." + key if "." in field_name
                     else key) for key in keys]
    for pattern in _INLINE_REASONING:
        match = pattern.match(text)
        if match:
            if given:
                raise DataError(source, "reasoning given twice: in a reasoning field and inline in the content",
                                field_name, hint="keep one of the two")
            # the answer: the rest of the content, or OpenThoughts' solution inside its own markers
            answer = next(g.strip("\n") for g in match.groups()[1:] if g is not None)
            given, text = [match.group(1)], answer
            break
    if len(given) > 1:
        raise DataError(source, f"reasoning given twice: fields {', '.join(keys)}", field_name,
                        hint="keep one of them")
    if given and given[0].strip():
        extra["reasoning_content"] = given[0].strip("\n")
    return text, extra


def join(*parts: str) -> str:
    return "\n\n".join(part for part in parts if part.strip())


def conversation(messages: list[Message], source: str, dropped: Counter, tools: Any = None,
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


def tool_schemas(row: Mapping[str, Any], source: str) -> list[dict[str, Any]] | None:
    """Tool schemas as HF templates take them: [{"type": "function", "function": {...}}]."""
    tools = row.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError) as err:
            raise DataError(source, f"bad tools: not JSON ({json_problem(err)})", "tools") from None
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(source, "bad tools: expected a list of tool schemas (objects)", "tools")
    return [t if "type" in t or "name" not in t else {"type": "function", "function": t} for t in tools]


def parse_arguments(value: Any) -> Any:
    """Tool-call arguments as an object when they are a JSON-object string (OpenAI wire format)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def json_problem(err: ValueError | RecursionError) -> str:
    """What json.loads disliked: its message, or the limit it hit (deep nesting, a huge number)."""
    if isinstance(err, json.JSONDecodeError):
        return err.msg
    return "nested too deeply" if isinstance(err, RecursionError) else str(err).split(":")[0]


def message_extra(turn: Mapping[str, Any], known: tuple[str, ...], source: str,
                  field_name: str) -> dict[str, Any]:
    extra = {key: value for key, value in turn.items() if key not in known and value is not None}
    if "tool_calls" in extra:
        calls = typed(extra["tool_calls"], list, source, f"{field_name}.tool_calls")
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
    return {**call, "function": {**function, "arguments": parse_arguments(function["arguments"])}}


def tool_call_message(value: Any, source: str, field_name: str, extra: dict[str, Any]) -> Message:
    hint = 'expected {"name": ..., "arguments": {...}} (or a list of them)'
    try:
        call = json.loads(as_text(value, source, field_name))
    except (ValueError, RecursionError) as err:
        raise DataError(source, f"bad tool call: not JSON ({json_problem(err)})", field_name, hint) from None
    calls = call if isinstance(call, list) else [call]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise DataError(source, "bad tool call: no function name", field_name, hint)
    tool_calls = [{"type": "function",
                   "function": {"name": c["name"], "arguments": parse_arguments(c.get("arguments", {}))}}
                  for c in calls]
    _, extra = reasoning_of("", extra, source, field_name)
    return Message("assistant", "", {**extra, "tool_calls": tool_calls})


def role_content(turns: list[Any], key: str, source: str) -> list[Message]:
    messages = []
    for i, turn in enumerate(turns):
        name = f"{key}[{i}]"
        typed(turn, dict, source, name)
        role = required(turn, "role", source, f"{name}.")
        if role not in ROLES:
            raise DataError(source, f"unknown role: {role!r} (expected one of {', '.join(ROLES)})",
                            f"{name}.role", hint=ROLE_HINT)
        extra = message_extra(turn, ("role", "content"), source, name)
        has_calls = bool(extra.get("tool_calls"))  # content may be null beside tool calls
        content = turn.get("content") if has_calls else required(turn, "content", source, f"{name}.")
        messages.append(message(role, content, source, f"{name}.content", extra))
    return messages
