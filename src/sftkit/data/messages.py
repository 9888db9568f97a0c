"""The one contract between dataset adapters and tokenization.

Adapters (`sftkit.data.formats`) turn rows of any supported shape into `Conversation`s (or
`RawText` for plain pre-training text) and never touch tokens; `sftkit.data.render` turns those
into `(input_ids, labels)` and never looks at file formats.

Every record carries `source` ("path:line" or "path:#index") so any later error can name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Message:
    """One turn. `extra` holds template-visible fields beyond role/content (e.g. `tool_calls`)."""

    role: str
    content: str
    extra: dict[str, Any] = field(default_factory=dict)

    def as_template_dict(self) -> dict[str, Any]:
        """The dict a Jinja chat template sees (`message['role']`, `message['content']`, ...)."""
        return {"role": self.role, "content": self.content, **self.extra}


@dataclass(slots=True)
class Conversation:
    """A chat: system/user/assistant/tool messages in order, plus where it came from."""

    messages: list[Message]
    source: str = "<memory>"
    tools: list[dict[str, Any]] | None = None

    def as_template_dicts(self) -> list[dict[str, Any]]:
        return [m.as_template_dict() for m in self.messages]


@dataclass(slots=True)
class RawText:
    """A plain document (pre-training text). Rendered as tokens + EOS; every token is trained."""

    text: str
    source: str = "<memory>"


Record = Union[Conversation, RawText]


class DataError(ValueError):
    """A record that cannot be used, with where it is and what to do about it.

    str(err) reads e.g.:  data/train.jsonl:12: field 'messages[1].role': unknown role 'bot'
    (expected one of system, user, assistant, tool) — map it with `--format` or a column mapping.
    """

    def __init__(self, source: str, problem: str, field_name: str | None = None, hint: str | None = None):
        self.source = source
        self.problem = problem
        self.field_name = field_name
        self.hint = hint
        where = f"{source}: field '{field_name}'" if field_name else source
        text = f"{where}: {problem}"
        if hint:
            text += f" — {hint}"
        super().__init__(text)

    def __reduce__(self) -> tuple:
        """Rebuild from the same arguments, so errors cross process boundaries (render num_proc > 1)."""
        return (self.__class__, (self.source, self.problem, self.field_name, self.hint))

    @property
    def kind(self) -> str:
        """A short category used to count skipped records ("unknown role", "empty reply", ...)."""
        return self.problem.split(":")[0].split("(")[0].strip()
