"""Which renders of a conversation become examples, and where its reasoning goes: the two policies
`sftkit.data.render` applies (it alone decides the labels).

    sftkit data preview --tokenizer ../shared/data/tokenizers/qwen3 --data FILE --turns per_turn --reasoning mask
    sftkit train RECIPE.yaml data.turns=auto data.reasoning=train

    Turns      whole | per_turn | last | auto     (data.turns; auto: decided by rendering a probe chat)
    Reasoning  train | mask | drop                (data.reasoning)

Both are decided from what the tokenizer's own template does (`sftkit.data.templates` probes it),
never from a model's name.
"""

from __future__ import annotations

from enum import Enum

from transformers import PreTrainedTokenizerBase

from sftkit.data.templates import INLINE, history_rewrite, inline_reasoning


class Turns(str, Enum):
    """Which renders of a conversation become examples (see `sftkit.data.render`)."""

    AUTO = "auto"  # per_turn when the template rewrites history, else whole
    WHOLE = "whole"  # one render of the whole conversation
    PER_TURN = "per_turn"  # one example per assistant reply, exactly as inference generated it
    LAST = "last"  # the final reply only, as generated


class Reasoning(str, Enum):
    """What happens to an assistant turn's reasoning."""

    TRAIN = "train"  # rendered and trained, like the answer
    MASK = "mask"  # rendered as context, no loss: only the answer is trained
    DROP = "drop"  # removed before rendering


def resolve_turns(turns: Turns, tokenizer: PreTrainedTokenizerBase, *, every_token: bool, last_only: bool,
                  end_of_turn: str | None, template_kwargs: dict, style: str | None) -> tuple[Turns, str]:
    """The policy to apply and a line saying which and why (what `sftkit train` and `data preview` print).
    `auto` is per_turn exactly when the template renders a probe chat's history otherwise than each
    reply was generated (`templates.history_rewrite`, with reasoning in `style` unless it is dropped)."""
    if every_token or not tokenizer.chat_template:
        return Turns.WHOLE, "whole (every token is trained)" if every_token else "whole"
    if turns is not Turns.AUTO:
        return turns, f"{turns.value} (data.turns)"
    if last_only:
        return Turns.WHOLE, "whole (auto: only the last reply is trained, and it is rendered as generated)"
    why = history_rewrite(tokenizer, end_of_turn, template_kwargs, style)
    if why:
        return Turns.PER_TURN, f"per_turn (auto: the chat template {why.removeprefix('it ')})"
    return Turns.WHOLE, "whole (auto: the chat template renders history as it was generated)"


def place_reasoning(messages: list[dict], style: str | None, reasoning: Reasoning) -> list[str | None]:
    """Put each assistant message's `reasoning_content` where the template reads it, in place: the
    field `style` names, or inline in the content (`templates.INLINE`), or nowhere (`Reasoning.DROP`).
    Returns each message's reasoning as the template receives it (None: none), for masking."""
    thoughts: list[str | None] = []
    for message in messages:
        thought = message.pop("reasoning_content", None) if message["role"] == "assistant" else None
        if not thought or reasoning is Reasoning.DROP:
            thoughts.append(None)
            continue
        if style == INLINE:
            message["content"] = inline_reasoning(thought, message["content"])
        else:
            message[style or "reasoning_content"] = thought
        thoughts.append(thought)
    return thoughts
