"""Conversation + tokenizer -> (input_ids, labels): the one place loss masks are made.

    sftkit data preview --tokenizer DIR --data FILE --strategy assistant --json

How masks are made (any Jinja template, no `{% generation %}` markers needed):

    full  = template(messages)                                  rendered once
    p_i   = template(messages[:i], add_generation_prompt=True)   what inference feeds before reply i
    reply i = full[len(p_i) : end of the first end-of-turn token after it]

`p_i` must be a prefix of `full` (the prefix property). Then the tokens before each trained reply
are exactly what `apply_chat_template(messages[:i], add_generation_prompt=True)` gives at inference,
and the reply is trained through its end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`,
`<|end|>`, ...) so the model learns to stop. The text is tokenized once (`sftkit.data.encode`), and
labels come from each token's offsets in it, so they can never drift from the ids.

Rendering every `p_i` costs time quadratic in the number of turns (each is as long as the chat so
far). Beyond 8 replies, only replies 1, 2, 4, 8, ... and the last are checked that way; the others
are located by the rule those checks confirm (a reply starts after the first generation prompt past
the previous reply, e.g. `<|im_start|>assistant\n`, which users cannot spell once control tokens
are sanitised). If a check disagrees, every reply is checked. Linear, and the same labels.

Which turns become examples (`Turns`, `data.turns`):

    whole      one example per conversation, the template applied once: each reply trained as the
               template shows it in the full chat (fast; exact when history is rendered as generated)
    per_turn   one example per assistant reply i:  ids = template(messages[:i], add_generation_prompt)
               + reply i as the template renders it as the LAST turn, through its end-of-turn token;
               only reply i is trained. Exactly what inference fed and generated, at the cost of
               repeating each prompt (counted in `Renderer.tally["repeated_tokens"]`).
    last       the final reply only, rendered the per_turn way.
    auto       per_turn when the template rewrites history (`templates.history_rewrite`: Qwen3 drops
               earlier reasoning, Mistral v0.3 moves the system prompt), else whole; `Renderer.turns_note`
               says which and why.

Reasoning (`Message.extra["reasoning_content"]`) reaches the template the way it reads it
(`templates.reasoning_style`: a message field, or `<think>` inline in the content) and is then
trained, masked (in context, no loss) or dropped (removed before rendering) per `Reasoning`.

Where a template breaks the prefix property the renderer is deterministic and counts it in
`Renderer.warnings`, never guessing:
  prompt_rewritten   the template rewrites history before reply i (Mistral v0.3 moves the system
                     prompt into the last user turn): that reply is not trained.
  reply_rewritten    reply i renders differently once later turns follow (Qwen3 drops the empty
                     think block from history): trained as it appears in the full conversation.
  boundary_merge     one token straddles the prompt/reply boundary: it is left untrained.
  no_end_of_turn     the template closes turns with plain text only: the model cannot learn to stop.
  reasoning_not_shown  a reply has reasoning the template never renders: it cannot be trained.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from transformers import PreTrainedTokenizerBase

from sftkit.data.control import contains_control, encode_marked, mark
from sftkit.data.encode import Encoded, TextEncoder
from sftkit.data.messages import Conversation, DataError, RawText, Record
from sftkit.data.policy import Reasoning, Turns, place_reasoning, resolve_turns
from sftkit.data.spans import TemplateSpans, _Chat
from sftkit.data.templates import (
    INLINE,
    control_pattern,
    find_end_of_turn,
    find_generation_prompt,
    missing_template_message,
    reasoning_style,
)

IGNORE_INDEX = -100
_THINK_CLOSE = re.compile(r"\s*(?:</think>\s*)?")  # what closes reasoning before a reply without an answer


class Strategy(str, Enum):
    """Which tokens carry loss."""

    ASSISTANT = "assistant"  # every assistant turn (default)
    LAST = "last"  # the last assistant turn only
    ALL = "all"  # every token (pre-training style)


@dataclass(slots=True)
class Tokenized:
    """One training example. `labels[j]` is `input_ids[j]` where loss is taken, else -100."""

    input_ids: list[int]
    labels: list[int]
    source: str

    @property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)  # list.count runs in C


class DroppedExample(DataError):
    """A valid record that cannot be trained within `max_length`: counted, not an error."""


@dataclass(slots=True)
class _Plan:
    """A rendered record before tokenization: its text and the character spans that carry loss."""

    text: str
    spans: list[tuple[int, int]]
    source: str
    add_special_tokens: bool = False
    append_eos: bool = False
    marked: bool = False  # user strings spell control tokens: encode them as text (sftkit.data.control)
    repeated: bool = False  # a per_turn example before its conversation's last: its tokens repeat a prompt


class Renderer(TemplateSpans):
    """Renders records with one tokenizer, one masking strategy, one turns policy (`whole` unless given:
    `data.turns` defaults to auto), one reasoning switch and one `max_length`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        strategy: Strategy | str = Strategy.ASSISTANT,
        max_length: int | None = None,
        template_kwargs: dict | None = None,
        sanitize_control_tokens: bool = True,
        fast_bpe: bool = True,
        turns: Turns | str = Turns.WHOLE,
        reasoning: Reasoning | str = Reasoning.TRAIN,
    ) -> None:
        self.tokenizer = tokenizer
        self.encoder = TextEncoder(tokenizer, fast_bpe)  # fast_bpe: tiktoken where it gives the same ids
        self.control = control_pattern(tokenizer) if sanitize_control_tokens else None
        self.strategy = Strategy(strategy)
        self.max_length = max_length
        self.template_kwargs = dict(template_kwargs or {})
        self.end_of_turn = find_end_of_turn(tokenizer, self.template_kwargs) if tokenizer.chat_template else None
        self.reply_header = self._reply_header()
        self.warnings: Counter[str] = Counter()
        self.tally: Counter[str] = Counter()  # repeated_tokens: per_turn's cost over one render per conversation
        self.reasoning = Reasoning(reasoning)
        self.reasoning_style = reasoning_style(tokenizer, self.template_kwargs) if tokenizer.chat_template else None
        style = None if self.reasoning is Reasoning.DROP else self.reasoning_style
        self.turns, self.turns_note = resolve_turns(
            Turns(turns), tokenizer, every_token=self.strategy is Strategy.ALL, last_only=self.strategy is Strategy.LAST,
            end_of_turn=self.end_of_turn, template_kwargs=self.template_kwargs, style=style)

    def _reply_header(self) -> str | None:
        """The generation prompt, when it can locate replies in a long conversation: it must hold a
        control token (which user text cannot spell once sanitised) and turns must end in one."""
        if not self.tokenizer.chat_template or self.control is None or self.end_of_turn is None:
            return None
        header = find_generation_prompt(self.tokenizer, self.template_kwargs)
        return header if header and self.control.search(header) else None

    # -- public ---------------------------------------------------------------------------------
    def render(self, record: Record) -> Tokenized:
        """Render one record into one example (whole); raises DataError (or DroppedExample) with its source."""
        examples = self.render_turns(record)
        if len(examples) != 1:
            raise ValueError(f"{record.source}: {len(examples)} examples under turns={self.turns.value}: "
                             "use render_turns")
        return examples[0]

    def render_turns(self, record: Record) -> list[Tokenized]:
        """Every example one record makes under the turns policy; raises its DataError."""
        results = self.render_many([record])
        for result in results:
            if isinstance(result, DataError):
                raise result
        return results  # type: ignore[return-value]

    def render_many(self, records: Sequence[Record]) -> list[Tokenized | DataError]:
        """Render a batch (one tokenizer call): each record's examples in order (one, or one per turn
        under per_turn/last), or its DataError in their place."""
        plans: list[_Plan | DataError] = []
        for record in records:
            try:
                plans.extend([_encodable(plan) for plan in self._plans(record)])
            except DataError as err:
                plans.append(err)
            except RecursionError:  # e.g. tool arguments nested hundreds of levels deep
                plans.append(DataError(getattr(record, "source", "<unknown>"), "too deeply nested: the record "
                                       "cannot be rendered", hint="flatten its nested fields"))
        ready = [p for p in plans if isinstance(p, _Plan)]
        encoded = iter(self._tokenize(ready))
        return [p if isinstance(p, DataError) else self._finish(p, next(encoded)) for p in plans]

    # -- plans: the text of each example and the spans it trains --------------------------------
    def _plans(self, record: Record) -> list[_Plan]:
        if isinstance(record, RawText):
            marked = self.control is not None and contains_control(record.text, self.control)
            text = mark(record.text, self.control) if marked else record.text
            return [_Plan(text, [(0, len(text))], record.source, add_special_tokens=True, append_eos=True,
                          marked=marked)]
        if not isinstance(record, Conversation):
            raise DataError("<unknown>", f"cannot render a {type(record).__name__}; expected Conversation or RawText")
        if not self.tokenizer.chat_template:
            raise DataError(record.source, "a conversation needs a chat template: " +
                            missing_template_message(self.tokenizer), hint="raw text ({\"text\": ...}) needs none")
        messages, tools = record.as_template_dicts(), record.tools
        marked = self.control is not None and contains_control([messages, tools], self.control)
        if marked:
            messages, tools = mark(messages, self.control), mark(tools, self.control)
        chat = _Chat(messages, tools, record.source, place_reasoning(messages, self.reasoning_style, self.reasoning))
        replies = [i for i, m in enumerate(chat.messages) if m["role"] == "assistant"]
        if self.strategy is Strategy.LAST or self.turns is Turns.LAST:
            replies = replies[-1:]
        if self.strategy is not Strategy.ALL and self.reasoning_style is None and self.reasoning is not Reasoning.DROP:
            self.warnings["reasoning_not_shown"] += sum(1 for i in replies if chat.thoughts[i])
        if self.turns in (Turns.PER_TURN, Turns.LAST):
            plans = [plan for plan in self._turn_plans(chat, replies, marked) if plan]
            for plan in plans[:-1]:
                plan.repeated = True
        else:
            full = self._apply(chat)
            if self.strategy is Strategy.ALL:
                return [_Plan(full, [(0, len(full))], record.source, marked=marked)]
            spans = [self._trained(chat, i, full, span)
                     for i, span in zip(replies, self._reply_spans(chat, replies, full)) if span]
            plans = [_Plan(full, [s for part in spans for s in part], record.source, marked=marked)] if spans else []
        if not plans:
            raise DataError(
                record.source,
                "no trained token: no assistant reply can be trained with this template",
                hint=f"see the warnings ({dict(self.warnings)}); check the roles or pick another template"
                + ("; with reasoning in the data and a prompt that closes it (enable_thinking=false), "
                   "set data.reasoning=drop" if any(chat.thoughts) else ""),
            )
        return plans

    def _turn_plans(self, chat: _Chat, replies: list[int], marked: bool) -> list[_Plan | None]:
        """per_turn / last: reply i rendered as the last turn after exactly the prompt inference fed."""
        plans: list[_Plan | None] = []
        for k, i in enumerate(replies, 1):
            prompt = self._apply(chat, upto=i, generation_prompt=True)
            alone = self._apply(chat, upto=i + 1)
            if not alone.startswith(prompt):
                self.warnings["prompt_rewritten"] += 1
                plans.append(None)
                continue
            end = self._end_of_reply(alone, len(prompt)) if self.end_of_turn is not None else None
            if end is None:
                self.warnings["no_end_of_turn"] += 1
                if self.end_of_turn is not None:
                    plans.append(None)
                    continue
                end = len(alone)
            self._check_tool_calls(chat, i, alone[len(prompt) : end])
            source = chat.source if len(replies) == 1 else f"{chat.source} turn {k}/{len(replies)}"
            plans.append(_Plan(alone[:end], self._trained(chat, i, alone, (len(prompt), end)), source, marked=marked))
        return plans

    def _trained(self, chat: _Chat, i: int, text: str, span: tuple[int, int]) -> list[tuple[int, int]]:
        """The trained part of reply `i` at `span` of `text`: all of it, or under `Reasoning.MASK` what
        follows its reasoning (the reasoning and the markup around it stay untrained context)."""
        thought = chat.thoughts[i]
        if self.reasoning is not Reasoning.MASK or not thought:
            return [span]
        start, end = span
        at = text.find(thought.strip(), start, end)
        if at < 0:  # this render does not show the reasoning (e.g. dropped from history)
            return [span]
        after = at + len(thought.strip())
        answer = str(chat.messages[i].get("content") or "")
        if self.reasoning_style == INLINE:
            answer = answer.rpartition("</think>")[2]
        found = text.find(answer.strip(), after, end) if answer.strip() else -1
        cut = found if found >= 0 else _THINK_CLOSE.match(text, after).end()  # type: ignore[union-attr]
        return [(cut, end)] if cut < end else []

    # -- tokens ---------------------------------------------------------------------------------
    def _tokenize(self, plans: list[_Plan]) -> list[Encoded]:
        """Each plan's tokens; plain texts go to the encoder in batches, marked ones piece by piece."""
        out: list = [None] * len(plans)
        for special in (False, True):
            slots = [i for i, p in enumerate(plans) if p.add_special_tokens is special and not p.marked]
            if slots:
                for i, encoded in zip(slots, self.encoder.encode_batch([plans[i].text for i in slots], special)):
                    out[i] = encoded
        for i, plan in enumerate(plans):
            if plan.marked:
                ids, offsets = encode_marked(self.tokenizer, plan.text)
                if plan.add_special_tokens:  # e.g. Llama's BOS in front of raw text
                    prefix = self.tokenizer("", add_special_tokens=True)["input_ids"]
                    ids, offsets = prefix + ids, [(0, 0)] * len(prefix) + offsets
                out[i] = Encoded.from_offsets(ids, offsets)
        return out

    def _finish(self, plan: _Plan, encoded: Encoded) -> Tokenized | DataError:
        ids = encoded.ids
        labels = self._labels(encoded, encoded.spans_in_units(plan.text, plan.spans))
        if plan.append_eos and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
            labels.append(self.tokenizer.eos_token_id)
        if labels:
            labels[0] = IGNORE_INDEX  # position 0 is never predicted: nothing comes before it
        example = Tokenized(ids, labels, plan.source)
        if self.max_length is not None and len(ids) > self.max_length:
            example = Tokenized(ids[: self.max_length], labels[: self.max_length], plan.source)
            self.warnings["truncated"] += 1
        if plan.repeated and example.num_trained:
            self.tally["repeated_tokens"] += len(example.input_ids)
        if example.num_trained == 0:
            if len(example.input_ids) < len(ids):
                return DroppedExample(plan.source, "truncated: no trained token left within max_length",
                                      hint=f"raise max_length (now {self.max_length})")
            return DataError(plan.source, "no trained token: the replies are empty after tokenization")
        return example

    def _labels(self, encoded: Encoded, spans: list[tuple[int, int]]) -> list[int]:
        """Label each token whose first character (or byte) lies inside a trained span; a token that
        straddles a span's start stays untrained (`boundary_merge`)."""
        ids, starts, ends = encoded.ids, encoded.starts, encoded.ends
        labels = [IGNORE_INDEX] * len(ids)
        for begin, end in spans:
            first = bisect.bisect_left(starts, begin)
            last = bisect.bisect_left(starts, end)
            if first > 0 and ends[first - 1] > begin and starts[first - 1] < begin:
                self.warnings["boundary_merge"] += 1
            labels[first:last] = ids[first:last]
        return labels


def _encodable(plan: _Plan) -> _Plan:
    """The plan, if its text is valid Unicode: tokenizers cannot take unpaired surrogates ("\\ud800" in JSON)."""
    try:
        plan.text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(plan.source, f"invalid text: unpaired surrogate {plan.text[err.start]!r} is not Unicode",
                        hint="remove or fix the broken escape in the record") from None
    return plan


def text_windows(tokenizer: PreTrainedTokenizerBase, documents: Sequence[tuple[str, str]],
                 max_length: int) -> list[Tokenized]:
    """Plain (source, text) documents scored whole, without a template: each tokenized as the tokenizer
    does by itself (BOS included) and cut into windows of `max_length` tokens, every token after a
    window's first trained. What the forgetting monitor's reference perplexity is measured on."""
    out = []
    for source, text in documents:
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), max_length):
            piece = ids[start : start + max_length]
            if len(piece) > 1:
                where = f"{source} tokens {start}-{start + len(piece)}"
                out.append(Tokenized(piece, [IGNORE_INDEX, *piece[1:]], where))
    return out
