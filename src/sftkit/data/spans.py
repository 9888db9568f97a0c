"""Where each reply lies in a conversation rendered by its chat template: the prefix-difference rule.

`TemplateSpans` is the half of `sftkit.data.render.Renderer` that works on text: it applies the
template (a template error becomes a `DataError` naming the record) and finds the character span of
each assistant reply, `full[len(template(messages[:i], add_generation_prompt=True)) : end of turn]`,
counting where a template breaks the prefix property (`prompt_rewritten`, `reply_rewritten`,
`no_end_of_turn`; docs/renderer-notes.md). The renderer turns those spans into labels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError as JinjaTemplateError

from sftkit.data.control import find_unmarked
from sftkit.data.messages import DataError

_ALL_EXACT = 8  # conversations with up to this many trained replies check every reply's own prefix render


@dataclass(slots=True)
class _Chat:
    """What the template sees of one conversation, and where it came from."""

    messages: list[dict]
    tools: list[dict] | None
    source: str
    thoughts: list[str | None]  # each message's reasoning as the template receives it (None: none)


class TemplateSpans:
    """Template application and reply spans; the renderer sets `tokenizer`, `template_kwargs`,
    `reply_header`, `end_of_turn` and `warnings`."""

    tokenizer: Any
    template_kwargs: dict[str, Any]
    reply_header: str | None
    end_of_turn: str | None
    warnings: Counter[str]

    def _apply(self, chat: _Chat, upto: int | None = None, generation_prompt: bool = False) -> str:
        """The template applied to `chat.messages[:upto]` (all by default)."""
        try:
            return self.tokenizer.apply_chat_template(
                chat.messages[:upto],
                tools=chat.tools,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **self.template_kwargs,
            )
        except JinjaTemplateError as err:
            raise DataError(
                chat.source,
                f"chat template rejected the conversation: {err}",
                hint="this template constrains roles (e.g. strict user/assistant alternation, no system turn); "
                "fix the record or choose another template",
            ) from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:  # data the template cannot use
            raise DataError(
                chat.source,
                f"chat template failed on the conversation: {type(err).__name__}: {err}",
                hint="a field has a type the template does not expect (tool_calls, tools, extra message keys)",
            ) from None

    def _reply_spans(self, chat: _Chat, replies: list[int], full: str) -> list[tuple[int, int] | None]:
        """Spans of `replies` in `full`. Checking every reply against its own prefix render costs time
        quadratic in the number of turns, so beyond `_ALL_EXACT` replies only replies 1, 2, 4, 8, ...
        and the last are checked that way; the others are located by the rule those checks confirm:
        a reply starts after the first reply header (the generation prompt) past the previous reply.
        If the rule fails to locate a reply, or any check disagrees with it, every reply is checked
        against its prefix render."""
        if len(replies) <= _ALL_EXACT or self.reply_header is None:
            return [self._reply_span(chat, i, full) for i in replies]
        located = self._located_spans(full, len(replies))
        checked = {2**j - 1 for j in range(len(replies).bit_length())} | {len(replies) - 1}
        spans: list[tuple[int, int] | None] = [None] * len(replies)
        for pos in sorted(checked):
            spans[pos] = self._reply_span(chat, replies[pos], full)
        if None not in located and all(spans[pos] == located[pos] for pos in checked):
            for pos in set(range(len(replies))) - checked:
                self._check_tool_calls(chat, replies[pos], full[located[pos][0] : located[pos][1]])
                spans[pos] = located[pos]
            return spans
        return [spans[pos] if pos in checked else self._reply_span(chat, i, full) for pos, i in enumerate(replies)]

    def _located_spans(self, full: str, count: int) -> list[tuple[int, int] | None]:
        """The first `count` reply spans by the header rule (None from the first that breaks it)."""
        assert self.reply_header is not None
        spans: list[tuple[int, int] | None] = []
        after = 0
        for _ in range(count):
            at = find_unmarked(full, self.reply_header, after)
            end = self._end_of_reply(full, at + len(self.reply_header)) if at >= 0 else None
            if end is None:
                return spans + [None] * (count - len(spans))
            spans.append((at + len(self.reply_header), end))
            after = end
        return spans

    def _reply_span(self, chat: _Chat, i: int, full: str) -> tuple[int, int] | None:
        """Character span of reply `i` in `full`, or None when it cannot be trained faithfully."""
        prompt = self._apply(chat, upto=i, generation_prompt=True) if i else ""
        if not full.startswith(prompt):
            self.warnings["prompt_rewritten"] += 1
            return None
        start = len(prompt)
        # The reply as inference would produce it: the conversation rendered up to this reply.
        alone = full if i == len(chat.messages) - 1 else self._apply(chat, upto=i + 1)
        if self.end_of_turn is None:
            self.warnings["no_end_of_turn"] += 1
            end = len(alone) if full.startswith(alone) else len(full)
            return (start, end) if end > start else None
        end = self._end_of_reply(full, start)
        if end is None:
            self.warnings["no_end_of_turn"] += 1
            return None
        if alone is not full and alone[start : self._end_of_reply(alone, start) or len(alone)] != full[start:end]:
            self.warnings["reply_rewritten"] += 1
        self._check_tool_calls(chat, i, full[start:end])
        return start, end

    @staticmethod
    def _check_tool_calls(chat: _Chat, i: int, reply: str) -> None:
        """A template without tool support renders a tool call as an empty reply: refuse to train that."""
        calls = chat.messages[i].get("tool_calls")
        calls = [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
        functions = [c["function"] if isinstance(c.get("function"), dict) else c for c in calls]
        missing = [n for f in functions if isinstance(n := f.get("name"), str) and n and n not in reply]
        if missing:
            raise DataError(
                chat.source,
                f"tool call not rendered: the chat template drops tool_calls ({', '.join(missing)})",
                field_name=f"messages[{i}].tool_calls",
                hint="use a template with tool support (e.g. the Qwen2.5 tokenizer's own) or write the call as text",
            )

    def _end_of_reply(self, text: str, start: int) -> int | None:
        assert self.end_of_turn is not None
        at = find_unmarked(text, self.end_of_turn, start)
        return at + len(self.end_of_turn) if at >= 0 else None
