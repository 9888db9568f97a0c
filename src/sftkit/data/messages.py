"""The one contract between dataset adapters and tokenization.

Adapters (`sftkit.data.formats`) turn rows of any supported shape into `Conversation`s (or
`RawText` for plain pre-training text) and never touch tokens; `sftkit.data.render` turns those
into `(input_ids, labels)` and never looks at file formats.

Every record carries `source` ("path:line" or "path:#index") so any later error can name it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Union

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Message:
    """One turn. `extra` holds template-visible fields beyond role/content: `tool_calls`, and on an
    assistant turn `reasoning_content` (its thinking; `content` is then the answer alone), whatever
    field or inline markers the dataset used (`sftkit.data.fields.reasoning_of`)."""

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


def skip_hint(switch: str = "data.skip_invalid=true in a recipe, --skip-invalid on the command line") -> str:
    """What to do about invalid records; `switch` is how the command at hand skips them (`sftkit.cli`
    names its own: `data.skip_invalid=true` for a recipe, `--skip-invalid` for `data preview --data` / `clean`)."""
    return f"fix the records, or skip and count invalid ones: {switch}"


SKIP_HINT = skip_hint()


class DataFileError(DataError):
    """Invalid records, listed with file:line and field: what reading (a file) or rendering (a split) met."""

    def __init__(self, path: str, errors: list[DataError], count: int, rows: int, stopped: bool):
        scope = f"in the first {rows} rows (stopped at max_errors)" if stopped else f"in {rows} rows"
        what = f"{count} invalid record{'s' if count != 1 else ''} {scope}"
        super().__init__(path, f"invalid records: {what}", hint=SKIP_HINT)
        self._init_args = (path, errors, count, rows, stopped)
        self.errors = errors
        self.count = count
        listed = "\n".join(f"  {err}" for err in errors)
        self.args = (f"{path}: {what}:\n{listed}\n{SKIP_HINT}",)

    def __reduce__(self) -> tuple:
        return (self.__class__, self._init_args)

    def naming(self, switch: str) -> str:
        """The message with the skip hint of one command's `switch`, e.g. `--skip-invalid`."""
        return self.args[0].removesuffix(SKIP_HINT) + skip_hint(switch)


@dataclass
class Problems:
    """The one raise-or-skip rule for invalid records, used while reading files and while rendering.

    `skip`: every invalid record is counted by kind and left out. Otherwise the first `max_errors`
    are kept and `raise_if_any` raises them together as one `DataFileError`; `full` tells a
    reader it may stop early.
    """

    skip: bool = False
    max_errors: int = 5
    errors: list[DataError] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.skipped.values())

    @property
    def full(self) -> bool:
        return not self.skip and self.count >= max(self.max_errors, 1)

    def add(self, err: DataError) -> None:
        self.skipped[err.kind] += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(err)

    def raise_if_any(self, where: str, rows: int, stopped: bool = False) -> None:
        """Raise the invalid records met in `rows` rows of `where` (unless skipping); `stopped`: before the end."""
        if self.count and not self.skip:
            raise DataFileError(where, self.errors, self.count, rows, stopped)
