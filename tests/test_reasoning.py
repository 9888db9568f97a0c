"""Reasoning in the data: every common shape normalised into `reasoning_content`, shown the way each
template reads it, then trained, masked or dropped (`data.reasoning`); Qwen3's `enable_thinking`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sftkit.data.formats import load_records
from sftkit.data.messages import Conversation, DataError, DataFileError, Message
from sftkit.data.preview import coloured
from sftkit.data.render import IGNORE_INDEX, Renderer
from sftkit.data.templates import reasoning_style
from tests.conftest import tokenizer_dir
from tests.qwen3 import qwen3
from tests.test_turns import assert_as_generated

NO_THINKING = {"enable_thinking": False}


def write(tmp_path: Path, rows: list[dict], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def replies(path: Path, **kwargs) -> list[Message]:
    return [m for record in load_records(path, **kwargs).records for m in record.messages if m.role == "assistant"]


# -- adapters: every shape becomes Message.extra["reasoning_content"] ------------------------------
def test_every_reasoning_shape_is_normalised(tmp_path: Path) -> None:
    user = {"role": "user", "content": "2+2?"}
    rows = [
        {"messages": [user, {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]},
        {"messages": [user, {"role": "assistant", "content": "4", "reasoning": "Two and two."}]},
        {"messages": [user, {"role": "assistant", "content": "4", "thinking": "Two and two."}]},  # gpt-oss
        {"messages": [user, {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"}]},  # R1
        {"conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value":  # OpenThoughts
            "<|begin_of_thought|>\n\nTwo and two.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n4\n\n"
            "<|end_of_solution|>"}], "system": "Think first."},
        {"prompt": "2+2?", "completion": "4", "reasoning": "Two and two."},
        {"instruction": "2+2?", "output": "4", "reasoning": "Two and two."},
    ]
    for i, row in enumerate(rows):
        [reply] = replies(write(tmp_path, [row], f"{i}.jsonl"))
        assert (reply.content, reply.extra) == ("4", {"reasoning_content": "Two and two."}), row


def test_openthoughts_metadata_columns_preset(tmp_path: Path) -> None:
    path = write(tmp_path, [{"problem": "2+2?", "deepseek_reasoning": "Two and two.", "deepseek_solution": "4",
                             "domain": "math"}])
    report = load_records(path)
    assert report.format == "deepseek_columns"
    [conversation] = report.records
    assert [m.as_template_dict() for m in conversation.messages] == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]


def test_reasoning_given_twice_is_an_error_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant",
                             "content": "<think>x</think>Hello", "reasoning_content": "y"}]}])
    with pytest.raises(DataFileError) as info:
        load_records(path)
    assert "field 'messages[1].content': reasoning given twice: in a reasoning field and inline in the content" \
        in str(info.value)
    only_thoughts = write(tmp_path, [{"messages": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "<think>x</think>"}]}], "b.jsonl")
    with pytest.raises(DataFileError, match="empty reply"):
        load_records(only_thoughts)


def test_a_think_tag_later_in_the_reply_is_text() -> None:
    from sftkit.data.fields import message

    reply = message("assistant", "Use <think>...</think> tags.", "s", "messages[1].content")
    assert (reply.content, reply.extra) == ("Use <think>...</think> tags.", {})


# -- how each template receives reasoning ----------------------------------------------------------
def test_reasoning_style_found_by_rendering() -> None:
    assert reasoning_style(qwen3()) == "reasoning_content"
    assert reasoning_style(AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))) == "inline"  # content verbatim
    r1_like = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))  # DeepSeek-R1's rule: history keeps no think
    r1_like.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                             "{{ m.content.split('</think>')[-1] }}<|im_end|>\n{% endfor %}")
    assert reasoning_style(r1_like) is None
    renderer = Renderer(r1_like, turns="per_turn")
    renderer.render_turns(Conversation([Message("user", "2+2?"), Message("assistant", "4", {
        "reasoning_content": "Two and two."})]))
    assert renderer.warnings["reasoning_not_shown"] == 1


def test_inline_reasoning_on_a_template_without_a_field_is_kept_in_history() -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    chat = Conversation([Message("system", "S"), Message("user", "1+1?"), Message("assistant", "2", {
        "reasoning_content": "One and one."}), Message("user", "2+2?"), Message("assistant", "4", {
            "reasoning_content": "Two and two."})])
    renderer = Renderer(tokenizer, turns="auto", reasoning="mask")
    assert renderer.turns.value == "whole"  # qwen2.5 renders <think> in content the same in history
    assert coloured(renderer.render(chat), tokenizer, colour=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\nOne and one.\n</think>\n\n[[2<|im_end|>]]\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nTwo and two.\n</think>\n\n[[4<|im_end|>]]\n")
    assert not renderer.warnings


# -- Qwen3: with and without reasoning, enable_thinking through data.template_kwargs -----------------
def chat(with_reasoning: bool) -> Conversation:
    extra = (lambda n: {"reasoning_content": f"Step {n}."}) if with_reasoning else (lambda n: {})
    return Conversation([Message("user", "A?"), Message("assistant", "a", extra(1)),
                         Message("user", "B?"), Message("assistant", "b", extra(2))], "q:1")


def test_qwen3_without_reasoning_trains_the_empty_think_block_inference_generates() -> None:
    tokenizer = qwen3()
    examples = Renderer(tokenizer, turns="auto").render_turns(chat(False))
    assert [coloured(e, tokenizer, colour=False) for e in examples] == [
        "<|im_start|>user\nA?<|im_end|>\n<|im_start|>assistant\n[[<think>\n\n</think>\n\na<|im_end|>]]",
        "<|im_start|>user\nA?<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n<|im_start|>user\nB?<|im_end|>\n"
        "<|im_start|>assistant\n[[<think>\n\n</think>\n\nb<|im_end|>]]",
    ]
    assert_as_generated(tokenizer, chat(False), examples)


@pytest.mark.parametrize("with_reasoning", [False, True])
def test_qwen3_enable_thinking_false_puts_the_empty_think_block_in_the_prompt(with_reasoning: bool) -> None:
    tokenizer = qwen3()
    renderer = Renderer(tokenizer, turns="auto", reasoning="drop", template_kwargs=NO_THINKING)
    assert renderer.turns.value == "per_turn"  # the generation prompt holds a think block history does not
    examples = renderer.render_turns(chat(with_reasoning))
    assert [coloured(e, tokenizer, colour=False) for e in examples] == [
        "<|im_start|>user\nA?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n[[a<|im_end|>]]",
        "<|im_start|>user\nA?<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n<|im_start|>user\nB?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n[[b<|im_end|>]]",
    ]
    assert [[t for t in e.labels if t != IGNORE_INDEX] for e in examples] == [[64, 151645], [65, 151645]]
    assert_as_generated(tokenizer, chat(False), examples, **NO_THINKING)


def test_qwen3_enable_thinking_false_with_reasoning_to_train_is_refused_with_the_fix() -> None:
    renderer = Renderer(qwen3(), turns="per_turn", reasoning="train", template_kwargs=NO_THINKING)
    with pytest.raises(DataError) as info:
        renderer.render_turns(chat(True))
    assert "q:1: no trained token: no assistant reply can be trained with this template" in str(info.value)
    assert "set data.reasoning=drop" in str(info.value)
    assert renderer.warnings["prompt_rewritten"] == 2


def test_masked_reasoning_before_a_tool_call_trains_the_call() -> None:
    from tests.test_turns import AGENT

    tokenizer = qwen3()
    examples = Renderer(tokenizer, turns="per_turn", reasoning="mask").render_turns(AGENT)
    texts = [coloured(e, tokenizer, colour=False) for e in examples]
    assert texts[0].endswith('<think>\nParis first.\n</think>\n\n[[<tool_call>\n{"name": "weather", "arguments": '
                             '{"city": "Paris"}}\n</tool_call><|im_end|>]]')
    assert texts[2].endswith("<think>\nBoth known.\n</think>\n\n[[Paris 18C and sunny; Rome 24C and clear.<|im_end|>]]")
