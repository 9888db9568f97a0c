"""Long multi-turn conversations: masks stay exact while the work stays linear in the turns.

Up to `_ALL_EXACT` replies every reply is checked against its own prefix render; beyond that,
replies 1, 2, 4, 8, ... and the last are, and the rest are located by the reply header those checks
confirm. These tests hold the shortcut to the all-exact result on every real template, and count
the characters the template renders to show the cost no longer grows with the square of the turns.
"""

from __future__ import annotations

import pytest

import sftkit.data.spans as spans_module
from sftkit.data.messages import Conversation, Message
from sftkit.data.render import IGNORE_INDEX, Renderer
from sftkit.data.templates import prepare_tokenizer
from tests.test_render import DATE, EXPECTED, load

FAMILIES = sorted(family for family, (plain, _) in EXPECTED.items() if plain is not None)
# No generation prompt ([INST] ... [/INST] then the reply), or one in plain text that a user could
# type (TinyLlama's <|assistant|> is not a special token): every reply is checked against its prefix.
NO_HEADER = {"llama2", "mistral_v0.1", "mistral_v0.3", "tinyllama"}


def long_conversation(replies: int, system: bool = False) -> Conversation:
    messages = [Message("system", "Answer with numbers.")] if system else []
    for t in range(replies):
        messages.append(Message("user", f"Question {t}: what is {t} times {t + 1}?"))
        messages.append(Message("assistant", f"{t} times {t + 1} is {t * (t + 1)}."))
    return Conversation(messages, "long:1")


def all_exact(monkeypatch: pytest.MonkeyPatch, renderer: Renderer, conversation: Conversation):
    with monkeypatch.context() as patch:
        patch.setattr(spans_module, "_ALL_EXACT", 10**9)
        return renderer.render(conversation)


def render_as_all_exact(monkeypatch: pytest.MonkeyPatch, renderer: Renderer, conversation: Conversation):
    """The shortcut's render, asserted equal to checking every reply; warnings are the shortcut's own."""
    exact = all_exact(monkeypatch, renderer, conversation)
    renderer.warnings.clear()
    fast = renderer.render(conversation)
    assert (fast.input_ids, fast.labels) == (exact.input_ids, exact.labels)
    return fast


def trained_replies(labels: list[int]) -> int:
    return sum(1 for j, label in enumerate(labels) if label != IGNORE_INDEX and (j == 0 or labels[j - 1] == IGNORE_INDEX))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("system", [False, True])
def test_long_conversation_masks_equal_checking_every_prefix(
    family: str, system: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = load(family)
    renderer = Renderer(tokenizer, template_kwargs=DATE)
    conversation = long_conversation(20, system)
    try:
        exact = all_exact(monkeypatch, renderer, conversation)
    except Exception as err:  # the template rejects a system turn (checked in test_render)
        assert system, err
        return
    fast = Renderer(tokenizer, template_kwargs=DATE).render(conversation)
    assert fast.input_ids == exact.input_ids
    assert fast.labels == exact.labels
    if family in NO_HEADER:  # every reply is checked against its prefix render
        assert renderer.reply_header is None
    else:
        assert renderer.reply_header is not None
        assert trained_replies(fast.labels) == 20


@pytest.mark.parametrize("builtin", ["chatml", "llama3", "mistral"])
def test_long_conversation_on_builtin_templates(builtin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = load("gpt2")
    prepare_tokenizer(tokenizer, builtin)
    renderer = Renderer(tokenizer)
    conversation = long_conversation(30)
    exact = all_exact(monkeypatch, renderer, conversation)
    fast = renderer.render(conversation)
    assert (fast.input_ids, fast.labels) == (exact.input_ids, exact.labels)
    assert trained_replies(fast.labels) == 30


def rendered_characters(tokenizer, renderer: Renderer, conversation: Conversation) -> tuple[int, int]:
    """(characters the template rendered for this conversation, length of the full render)."""
    calls: list[int] = []
    original = tokenizer.apply_chat_template

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a transparent wrapper
        text = original(*args, **kwargs)
        calls.append(len(text))
        return text

    tokenizer.apply_chat_template = counting
    try:
        renderer.render(conversation)
    finally:
        del tokenizer.apply_chat_template
    return sum(calls), max(calls)


@pytest.mark.parametrize("family", ["qwen2.5", "phi3"])
def test_template_work_grows_linearly_with_turns(family: str) -> None:
    tokenizer = load(family)
    renderer = Renderer(tokenizer)
    ratios = []
    for replies in (16, 64, 256):
        rendered, full = rendered_characters(tokenizer, renderer, long_conversation(replies))
        ratios.append(rendered / full)
    # Checking every prefix would render about replies/2 x the conversation (8x, 32x, 128x).
    assert max(ratios) < 5, ratios
    assert ratios[-1] < ratios[0] + 1, ratios


def test_history_rewriting_template_falls_back_to_checking_every_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """A template with a reply header that still rewrites history (it tags the last user turn, as
    Mistral v0.3 moves the system prompt there): the checks disagree with the header rule, so every
    reply is checked, and only the last (whose prompt is what inference sees) is trained."""
    tokenizer = load("qwen2.5")
    tokenizer.chat_template = (
        "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
        "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.index0 == ns.last %}(latest) {% endif %}"
        "{{ m.content }}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    renderer = Renderer(tokenizer)
    assert renderer.reply_header == "<|im_start|>assistant\n"
    fast = render_as_all_exact(monkeypatch, renderer, long_conversation(12))
    assert trained_replies(fast.labels) == 1
    assert renderer.warnings["prompt_rewritten"] == 11


def test_replies_the_header_rule_cannot_locate_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers stop appearing part-way (later replies open with `bot`): the rule locates only the
    first five replies, so every reply is checked; the rest are counted, never indexed blindly."""
    tokenizer = load("qwen2.5")
    tokenizer.chat_template = (
        "{%- for m in messages %}{% if m.role == 'assistant' and loop.index0 > 10 %}<|im_start|>bot\n"
        "{% else %}<|im_start|>{{ m.role }}\n{% endif %}{{ m.content }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    renderer = Renderer(tokenizer)
    fast = render_as_all_exact(monkeypatch, renderer, long_conversation(12))
    assert trained_replies(fast.labels) == 5
    assert renderer.warnings["prompt_rewritten"] == 7
