"""`data.turns`: every assistant turn trained exactly as inference generated it (issue 19).

The reference is always transformers' own `apply_chat_template`: under per_turn, example i's ids are
`apply_chat_template(messages[:i+1])` cut after turn i's end-of-turn token, its prompt is
`apply_chat_template(messages[:i], add_generation_prompt=True)`, and only what follows is trained.
"""

from __future__ import annotations

import io

import pytest
from transformers import AutoTokenizer

from sftkit.config import ConfigError, DataConfig
from sftkit.data.formats import load_records
from sftkit.data.messages import Conversation, Message
from sftkit.data.preview import coloured, preview
from sftkit.data.render import IGNORE_INDEX, Renderer, Tokenized
from sftkit.data.render_all import render_records
from tests.conftest import ASSETS, requires_shared, shared_file, tokenizer_dir
from tests.qwen3 import qwen3, rebuilt_qwen3

DATE = {"date_string": "26 Jul 2024"}
IM_END = 151645


def reasoning_chat(turns: int = 4) -> Conversation:
    """System prompt + `turns` questions, each reply with reasoning."""
    messages = [Message("system", "Be brief.")]
    for n in range(1, turns + 1):
        messages += [Message("user", f"{n}+{n}?"),
                     Message("assistant", f"{2 * n}.", {"reasoning_content": f"{n} plus {n} is {2 * n}."})]
    return Conversation(messages, "chat:1")


def reference(tokenizer, conversation: Conversation, i: int, **kwargs) -> tuple[list[int], list[int]]:
    """(prompt ids, example ids) of reply `i` by transformers alone: the prompt inference feeds, and the
    conversation up to reply i cut after the first end-of-turn token past that prompt."""
    dicts = conversation.as_template_dicts()
    prompt = tokenizer.apply_chat_template(dicts[:i], add_generation_prompt=True, tokenize=True, return_dict=False,
                                           **kwargs)
    full = tokenizer.apply_chat_template(dicts[: i + 1], tokenize=True, return_dict=False, **kwargs)
    eot = tokenizer.convert_tokens_to_ids(Renderer(tokenizer, template_kwargs=kwargs).end_of_turn)
    return list(prompt), list(full[: full.index(eot, len(prompt)) + 1])


def trained(example: Tokenized) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


def assert_as_generated(tokenizer, conversation: Conversation, examples: list[Tokenized], **kwargs) -> None:
    """Each example is its reply exactly as inference generated it: prompt untrained, the rest trained."""
    replies = [i for i, m in enumerate(conversation.messages) if m.role == "assistant"]
    assert len(examples) == len(replies)
    for i, example in zip(replies, examples):
        prompt, expected = reference(tokenizer, conversation, i, **kwargs)
        assert example.input_ids == expected, (conversation.source, i)
        assert example.input_ids[: len(prompt)] == prompt
        assert set(example.labels[: len(prompt)]) == {IGNORE_INDEX}
        assert example.labels[len(prompt):] == example.input_ids[len(prompt):]


# -- Qwen3: reasoning in every turn ----------------------------------------------------------------
def test_qwen3_per_turn_examples_are_the_template_up_to_each_end_of_turn() -> None:
    tokenizer, chat = qwen3(), reasoning_chat(4)
    renderer = Renderer(tokenizer, turns="per_turn")
    examples = renderer.render_turns(chat)
    assert [e.source for e in examples] == [f"chat:1 turn {k}/4" for k in range(1, 5)]
    assert_as_generated(tokenizer, chat, examples)
    # turn 1 written out: <think>\n 1 plus 1 is 2.\n </think> \n\n 2 . <|im_end|>, after the prompt
    assert examples[0].input_ids == [151644, 8948, 198, 3430, 9814, 13, 151645, 198, 151644, 872, 198, 16, 10, 16, 30,
                                     151645, 198, 151644, 77091, 198,
                                     151667, 198, 16, 5519, 220, 16, 374, 220, 17, 624, 151668, 271, 17, 13, 151645]
    assert trained(examples[0]) == examples[0].input_ids[20:]
    # every turn trains its own reasoning and answer, as it was generated; history shows neither reasoning
    for n, example in enumerate(examples, 1):
        text = coloured(example, tokenizer, colour=False)
        assert text.endswith(f"<|im_start|>assistant\n[[<think>\n{n} plus {n} is {2 * n}.\n</think>\n\n{2 * n}."
                             "<|im_end|>]]")
        assert text.count("[[") == 1 and "plus" not in text.split("[[")[0]
    assert renderer.tally["repeated_tokens"] == sum(len(e.input_ids) for e in examples[:3])
    assert not renderer.warnings


def test_qwen3_reasoning_switch_trains_masks_or_drops_the_thinking() -> None:
    tokenizer, chat = qwen3(), reasoning_chat(4)
    by_switch = {r: Renderer(tokenizer, turns="per_turn", reasoning=r).render_turns(chat)
                 for r in ("train", "mask", "drop")}
    assert trained(by_switch["train"][0]) == [151667, 198, 16, 5519, 220, 16, 374, 220, 17, 624, 151668, 271, 17, 13,
                                              IM_END]
    assert trained(by_switch["mask"][0]) == [17, 13, IM_END]  # "2." <|im_end|>: the reasoning is context only
    assert trained(by_switch["drop"][0]) == [151667, 271, 151668, 271, 17, 13, IM_END]  # the empty think block
    assert by_switch["mask"][0].input_ids == by_switch["train"][0].input_ids
    for n, example in enumerate(by_switch["mask"], 1):
        assert coloured(example, tokenizer, colour=False).endswith(
            f"<think>\n{n} plus {n} is {2 * n}.\n</think>\n\n[[{2 * n}.<|im_end|>]]")
    for n, example in enumerate(by_switch["drop"], 1):
        assert "plus" not in tokenizer.decode(example.input_ids)
        assert coloured(example, tokenizer, colour=False).endswith(f"[[<think>\n\n</think>\n\n{2 * n}.<|im_end|>]]")


def test_qwen3_whole_warns_with_the_count_of_rewritten_turns() -> None:
    tokenizer = qwen3()
    renderer = Renderer(tokenizer, turns="whole")
    report = render_records([reasoning_chat(4), reasoning_chat(2)], renderer)
    assert report.warnings["reply_rewritten"] == 3 + 1  # every reply but each conversation's last
    assert "warning: 4 trained replies differ from how inference generates them" in report.summary()
    assert "data.turns=per_turn trains every reply as generated" in report.summary()
    text = coloured(report.examples[0], tokenizer, colour=False)
    assert "[[2.<|im_end|>]]" in text and "1 plus 1" not in text  # reply 1 trained without its reasoning
    assert text.endswith("[[<think>\n4 plus 4 is 8.\n</think>\n\n8.<|im_end|>]]\n")


def test_auto_picks_per_turn_for_qwen3_and_says_why() -> None:
    renderer = Renderer(qwen3(), turns="auto")
    assert renderer.turns.value == "per_turn"
    assert renderer.turns_note == ("per_turn (auto: the chat template renders an earlier reply differently from "
                                   "how it was generated)")
    report = render_records([reasoning_chat(4)], renderer)
    assert len(report.examples) == 4 and not report.warnings
    assert report.summary().splitlines()[1:] == [
        f"turns: {renderer.turns_note}",
        "per_turn cost: 236 tokens where one render per conversation takes 83 (x2.84): earlier turns repeat as "
        "prompts",
    ]
    assert report.repeated_tokens == 236 - len(report.examples[-1].input_ids) == 153


def test_auto_picks_whole_where_history_is_kept() -> None:
    renderer = Renderer(AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5")), turns="auto")
    assert renderer.turns.value == "whole"
    assert renderer.turns_note == "whole (auto: the chat template renders history as it was generated)"
    last = Renderer(qwen3(), turns="auto", strategy="last")
    assert last.turns.value == "whole"  # only the final reply is trained: it is the last turn anyway


def test_last_trains_only_the_final_turn_as_generated() -> None:
    tokenizer, chat = qwen3(), reasoning_chat(3)
    [example] = Renderer(tokenizer, turns="last").render_turns(chat)
    prompt, expected = reference(tokenizer, chat, 6)
    assert example.input_ids == expected and example.source == "chat:1"
    assert trained(example) == expected[len(prompt):]


@requires_shared
def test_rebuilt_qwen3_gives_the_shared_qwen3_ids() -> None:
    real = AutoTokenizer.from_pretrained(tokenizer_dir("qwen3"))
    for turns in ("per_turn", "whole"):
        chat = reasoning_chat(3)
        assert [e.input_ids for e in Renderer(rebuilt_qwen3(), turns=turns).render_turns(chat)] == \
               [e.input_ids for e in Renderer(real, turns=turns).render_turns(chat)]


# -- Mistral v0.3 moves the system prompt: every reply trained under per_turn -----------------------
def test_mistral_v03_with_system_trains_every_reply_under_per_turn() -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("mistral_v0.3"))
    chat = Conversation([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
                         Message("user", "2+2?"), Message("assistant", "4")], "m:1")
    whole = Renderer(tokenizer, turns="whole")
    assert coloured(whole.render(chat), tokenizer, colour=False) == \
        "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\n2+2?[/INST][[ 4</s>]]"  # reply 1 untrained today
    assert whole.warnings["prompt_rewritten"] == 1
    renderer = Renderer(tokenizer, turns="auto")
    assert renderer.turns.value == "per_turn"
    assert "when there is a system prompt" in renderer.turns_note
    examples = renderer.render_turns(chat)
    assert [coloured(e, tokenizer, colour=False) for e in examples] == [
        "<s>[INST] Be brief.\n\nHi[/INST][[ Hello!</s>]]",  # the system prompt where inference put it then
        "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\n2+2?[/INST][[ 4</s>]]",
    ]
    assert_as_generated(tokenizer, chat, examples)
    assert not renderer.warnings


# -- agent traces: tool results never trained, every assistant step trained ------------------------
AGENT = Conversation([
    Message("user", "Weather in Paris, then in Rome?"),
    Message("assistant", "", {"reasoning_content": "Paris first.", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}),
    Message("tool", "18C, sunny"),
    Message("assistant", "", {"reasoning_content": "Now Rome.", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}}]}),
    Message("tool", "24C, clear"),
    Message("assistant", "Paris 18C and sunny; Rome 24C and clear.", {"reasoning_content": "Both known."}),
], "agent:1", tools=[{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                                       "parameters": {"type": "object",
                                                                      "properties": {"city": {"type": "string"}}}}}])


def test_qwen3_agent_trace_every_step_trained_tool_results_never() -> None:
    tokenizer = qwen3()
    examples = Renderer(tokenizer, turns="per_turn").render_turns(AGENT)
    assert_as_generated(tokenizer, AGENT, examples, tools=AGENT.tools)
    texts = [coloured(e, tokenizer, colour=False) for e in examples]
    assert texts[0].endswith('[[<think>\nParis first.\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": '
                             '{"city": "Paris"}}\n</tool_call><|im_end|>]]')
    assert texts[1].endswith('[[<think>\nNow Rome.\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": '
                             '{"city": "Rome"}}\n</tool_call><|im_end|>]]')
    assert texts[2].endswith("[[<think>\nBoth known.\n</think>\n\nParis 18C and sunny; Rome 24C and clear."
                             "<|im_end|>]]")
    for example in examples:  # tool results are context only
        assert "tool_response" not in tokenizer.decode(trained(example))


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3.2"])
def test_glaive_agent_traces_per_turn_as_generated(family: str) -> None:
    tokenizer = qwen3() if family == "qwen3" else AutoTokenizer.from_pretrained(tokenizer_dir(family))
    records = load_records(ASSETS / "data" / "glaive_toolcall.json").records
    renderer = Renderer(tokenizer, turns="per_turn", template_kwargs=DATE)
    for record in records:
        assert_as_generated(tokenizer, record, renderer.render_turns(record), tools=record.tools, **DATE)
    assert not renderer.warnings


@pytest.mark.shared
@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3.2"])
def test_shared_glaive_file_per_turn_as_generated(family: str) -> None:
    path = shared_file("instructions/llamafactory_glaive_toolcall_en_demo.json")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family))
    records = load_records(path).records[:60]  # 60 of 300 traces: every shape of step, in seconds
    renderer = Renderer(tokenizer, turns="per_turn", template_kwargs=DATE)
    report = render_records(records, renderer, on_error="skip")
    llama_single_call = family == "llama3.2"  # its template allows one tool call per step: those records fail
    assert len(report.errors) == 0 or llama_single_call
    examples = iter(report.examples)
    failed = {err.source for err in report.errors}
    for record in records:
        if record.source in failed:
            continue
        replies = sum(m.role == "assistant" for m in record.messages)
        assert_as_generated(tokenizer, record, [next(examples) for _ in range(replies)], tools=record.tools, **DATE)


@pytest.mark.shared
@requires_shared
def test_auto_choice_on_every_shared_tokenizer() -> None:
    expected = {"qwen3": "per_turn", "mistral_v0.3": "per_turn", "qwen2.5": "whole", "llama3.2": "whole",
                "llama2": "whole", "tinyllama": "whole", "phi3": "whole", "mistral_v0.1": "whole",
                "gemma_toy_cropped": "whole"}
    got = {family: Renderer(AutoTokenizer.from_pretrained(tokenizer_dir(family)), turns="auto",
                            template_kwargs=DATE).turns.value for family in expected}
    assert got == expected


# -- the entry training and preview share ----------------------------------------------------------
def test_preview_shows_one_example_per_turn_and_the_policy(tmp_path) -> None:
    import json

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [m.as_template_dict() for m in reasoning_chat(2).messages]}) + "\n")
    out, info = io.StringIO(), io.StringIO()
    preview(DataConfig(train=str(path)), qwen3(), out=out, info=info, limit=5)
    shown = out.getvalue()
    assert shown.count("── ") == 2 and f"{path}:1 turn 1/2" in shown and f"{path}:1 turn 2/2" in shown
    assert "[[<think>\n1 plus 1 is 2.\n</think>\n\n2.<|im_end|>]]" in shown
    assert "turns: per_turn (auto: the chat template renders an earlier reply differently" in info.getvalue()
    assert "earlier turns repeat as prompts" in info.getvalue()
    again = io.StringIO()  # from the token cache this time: the same policy lines
    preview(DataConfig(train=str(path)), qwen3(), out=io.StringIO(), info=again, limit=5)
    assert again.getvalue().splitlines()[-3:] == info.getvalue().splitlines()[-3:]


def test_per_turn_in_worker_processes_matches_serial() -> None:
    records = [reasoning_chat(1 + n % 3) for n in range(300)]
    serial = render_records(records, Renderer(qwen3(), turns="per_turn"))
    pooled = render_records(records, Renderer(qwen3(), turns="per_turn"), num_proc=2)
    assert [(e.input_ids, e.labels, e.source) for e in pooled.examples] == \
           [(e.input_ids, e.labels, e.source) for e in serial.examples]
    assert len(serial.examples) == 600 and pooled.repeated_tokens == serial.repeated_tokens > 0


def test_config_turns_and_reasoning_are_checked() -> None:
    assert (DataConfig(train="x.jsonl").turns, DataConfig(train="x.jsonl").reasoning) == ("auto", "train")
    with pytest.raises(ConfigError, match=r"data.turns: 'each' is not one of auto, whole, per_turn, last"):
        DataConfig(train="x.jsonl", turns="each")
    with pytest.raises(ConfigError, match=r"data.reasoning: 'hide' is not one of train, mask, drop"):
        DataConfig(train="x.jsonl", reasoning="hide")
    with pytest.raises(ConfigError, match="data.turns: per_turn trains assistant replies, but data.strategy=all"):
        DataConfig(train="x.jsonl", strategy="all", turns="per_turn")
