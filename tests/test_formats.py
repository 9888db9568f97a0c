"""Format adapters: rows of every supported shape -> Conversation / RawText, and errors for people."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sftkit.config import ConfigError
from sftkit.data.formats import (
    FORMATS,
    DataFileError,
    LoadReport,
    detect_format,
    load_records,
)
from sftkit.data.messages import Conversation, DataError, Message, RawText
from tests.conftest import ASSETS, SHARED_DATA, requires_shared, shared_file

DATA = ASSETS / "data"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def roles(record: Conversation) -> list[str]:
    return [m.role for m in record.messages]


# --- detection -----------------------------------------------------------------------------------

@pytest.mark.parametrize("row, expected", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "messages"),
    ({"conversation": [{"role": "user", "content": "Hi"}]}, "messages"),
    ({"conversations": [{"role": "user", "content": "Hi"}]}, "messages"),
    ({"conversations": [{"from": "human", "value": "Hi"}], "system": "S"}, "sharegpt"),
    ({"instruction": "I", "input": "", "output": "O"}, "alpaca"),
    ({"instruction": "I", "input": "", "output": "O", "text": "prompt + O"}, "alpaca"),
    ({"instruction": "I", "context": "C", "response": "R", "category": "open_qa"}, "dolly"),
    ({"instruction": "I", "instances": [{"input": "", "output": "O"}]}, "self_instruct"),
    ({"prompt": "P", "completion": "C"}, "prompt_completion"),
    ({"question": "Q", "answer": "A"}, "question_answer"),
    ({"message_tree_id": "t", "prompt": {"text": "Hi", "role": "prompter"}}, "oasst"),
    ({"question_id": 81, "category": "writing", "turns": ["Q1", "Q2"]}, "mt_bench"),
    ({"question_id": 101, "choices": [{"index": 0, "turns": ["A1"]}]}, "mt_bench"),
    ({"text": "A document.", "url": "https://example.org"}, "text"),
])
def test_detect_format(row: dict[str, Any], expected: str) -> None:
    assert detect_format(row) == expected
    assert expected in FORMATS


def test_detect_format_names_the_keys_it_did_not_recognise() -> None:
    with pytest.raises(DataError) as info:
        detect_format({"role": "user", "text": "Hi"}, "x.jsonl:1")
    assert str(info.value) == (
        "x.jsonl:1: unknown format: no known format has the keys ['role', 'text'] — pass format= one of "
        "messages, sharegpt, alpaca, prompt_completion, text, oasst, self_instruct, dolly, "
        "question_answer, mt_bench, deepseek_columns, or columns= to rename columns")
    assert info.value.kind == "unknown format"


# --- messages ------------------------------------------------------------------------------------

def test_messages_fixture_roles_extras_tools_and_trimmed_trailing_turn() -> None:
    path = DATA / "chat_messages.jsonl"
    report = load_records(path)
    assert isinstance(report, LoadReport)
    assert (report.format, report.path, len(report.records)) == ("messages", str(path), 10)
    assert report.skipped == Counter() and report.errors == []
    assert report.dropped == Counter({"trailing turn": 1})
    first, rhymes, tools_conv, librarian, one_word, last = (report.records[i] for i in (0, 1, 5, 7, 8, 9))
    assert first == Conversation([
        Message("system", "You are a concise assistant."),
        Message("user", "What is the boiling point of water at sea level?"),
        Message("assistant", "100 °C (212 °F) at standard atmospheric pressure."),
    ], f"{path}:1")
    assert roles(rhymes) == ["user", "assistant"] * 3 and rhymes.messages[-1].content == "Polite."
    assert report.records[3].messages[1].extra == {"reasoning_content": "The key facts are the new day and the reason."}
    assert report.records[6].messages[0].extra == {"name": "alice"}
    assert librarian.messages[0] == Message("system", "You are a friendly librarian.")
    assert roles(one_word) == ["system", "user", "assistant"] and one_word.messages[-1].content == "Hot."
    assert roles(last) == ["user", "assistant"] * 4
    assert last.messages[-1].content == "Key, the black plate that the other colours are aligned to."
    assert roles(tools_conv) == ["system", "user", "assistant", "tool", "assistant"]
    call = tools_conv.messages[2]
    assert call.content == "" and call.extra == {"tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert tools_conv.messages[3].extra == {"tool_call_id": "call_1", "name": "get_weather"}
    assert tools_conv.tools is not None and tools_conv.tools[0]["function"]["name"] == "get_weather"


def test_parquet_gives_the_same_conversations_as_jsonl() -> None:
    from_parquet = load_records(DATA / "chat_messages.parquet").records
    from_jsonl = load_records(DATA / "chat_messages.jsonl").records[:4]
    assert [c.messages for c in from_parquet] == [c.messages for c in from_jsonl]  # Arrow's nulls dropped
    assert from_parquet[2].source == f"{DATA / 'chat_messages.parquet'}:#2"


def test_messages_tools_given_as_json_string_are_wrapped_for_templates(tmp_path: Path) -> None:
    tools = [{"name": "add", "description": "Add", "parameters": {"type": "object", "properties": {}}}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"tools": json.dumps(tools), "messages": [
        {"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "3"}]}])
    assert load_records(path).records[0].tools == [{"type": "function", "function": tools[0]}]


# --- sharegpt and glaive -------------------------------------------------------------------------

def test_fastchat_sharegpt_with_and_without_system() -> None:
    report = load_records(DATA / "fastchat_sharegpt.json")
    assert (report.format, len(report.records)) == ("sharegpt", 4)
    plain, short, with_system, long = report.records
    assert plain.messages == [Message("user", "Who are you?"),
                              Message("assistant", "I am Vicuna, a language model trained by researchers from "
                                                   "Large Model Systems Organization (LMSYS)."),
                              Message("user", "Have a nice day!"), Message("assistant", "You too!")]
    assert roles(short) == ["user", "assistant"]
    assert roles(with_system) == ["system", "user", "assistant", "user", "assistant"]
    assert with_system.messages[0].content.startswith("A chat between a curious user and an artificial "
                                                      "intelligence assistant whose name is Vicuna.")
    assert roles(long) == ["system"] + ["user", "assistant"] * 3


def test_glaive_function_call_becomes_tool_calls_and_observation_a_tool_turn() -> None:
    path = DATA / "glaive_toolcall.json"
    report = load_records(path)
    assert (report.format, len(report.records)) == ("sharegpt", 3)
    assert [len(c.messages) for c in report.records] == [8, 12, 4]
    tip = report.records[2]
    assert tip.source == f"{path}:#2"
    assert roles(tip) == ["user", "assistant", "tool", "assistant"]
    assert tip.messages[1] == Message("assistant", "", {"tool_calls": [{"type": "function", "function": {
        "name": "calculate_tip", "arguments": {"bill_amount": 100, "tip_percentage": 15}}}]})
    assert tip.messages[2] == Message("tool", '{"tip_amount": 15}')
    assert tip.messages[3].content == "The tip amount for your bill is $15."
    assert tip.tools == [{"type": "function", "function": {
        "name": "calculate_tip", "description": "Calculate the tip amount for a bill",
        "parameters": {"type": "object", "properties": {
            "bill_amount": {"type": "number", "description": "The total bill amount"},
            "tip_percentage": {"type": "number", "description": "The percentage of tip to be given"}},
            "required": ["bill_amount", "tip_percentage"]}}}]
    assert sum(m.role == "tool" for c in report.records for m in c.messages) == 5


def test_glaive_call_that_is_not_json_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "get_weather(Oslo)"},
        {"from": "observation", "value": "rain"}, {"from": "gpt", "value": "Rain."}]}])
    report = load_records(path, on_error="skip")
    assert report.skipped == Counter({"bad tool call": 1})
    assert str(report.errors[0]) == (f"{path}:1: field 'conversations[1].value': bad tool call: not JSON "
                                     "(Expecting value) — expected {\"name\": ..., \"arguments\": {...}} "
                                     "(or a list of them)")


def test_sharegpt_unknown_sender(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep."}]}])
    with pytest.raises(DataFileError) as info:
        load_records(path)
    assert info.value.errors[0].field_name == "conversations[1].from"
    assert info.value.errors[0].problem.startswith("unknown role: 'robot' (expected one of human, user, gpt,")


# --- alpaca, dolly, prompt/completion, self-instruct ---------------------------------------------

def test_alpaca_identity() -> None:
    report = load_records(DATA / "identity_alpaca.json")
    assert (report.format, len(report.records)) == ("alpaca", 3)
    assert report.records[0].messages == [
        Message("user", "hi"),
        Message("assistant", "Hello! I am {{name}}, an AI assistant developed by {{author}}. "
                             "How can I assist you today?")]


def test_alpaca_system_input_and_history_come_in_llamafactory_order(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{
        "system": "Be brief.", "instruction": "Translate:", "input": "Hallo", "output": "Hello",
        "history": [["Ready?", "Yes."], ["Language?", "German to English."]]}])
    assert load_records(path).records[0].messages == [
        Message("system", "Be brief."), Message("user", "Ready?"), Message("assistant", "Yes."),
        Message("user", "Language?"), Message("assistant", "German to English."),
        Message("user", "Translate:\n\nHallo"), Message("assistant", "Hello")]


def test_dolly_preset_and_the_same_via_explicit_columns() -> None:
    path = DATA / "dolly.json"
    preset = load_records(path)
    mapped = load_records(path, columns={"instruction": "instruction", "input": "context", "output": "response"})
    assert (preset.format, mapped.format) == ("dolly", "alpaca")
    assert [c.messages for c in preset.records] == [c.messages for c in mapped.records]
    when, fish, _ = preset.records
    assert when.messages[0].content.startswith("When did Virgin Australia start operating?\n\nVirgin Australia, "
                                               "the trading name of Virgin Australia Airlines Pty Ltd,")
    assert fish.messages == [Message("user", "Which is a species of fish? Tope or Rope"),
                             Message("assistant", "Tope")]


def test_errors_name_the_files_own_column(tmp_path: Path) -> None:
    path = tmp_path / "dolly.json"
    path.write_text(json.dumps([{"instruction": "Why?", "context": "", "response": " "}]))
    report = load_records(path, on_error="skip")
    assert str(report.errors[0]) == (f"{path}:#0: field 'response': empty reply: the assistant message is empty"
                                     " — remove the record or write the reply")


def test_gsm8k_question_answer_and_explicit_prompt_completion_mapping() -> None:
    path = DATA / "gsm8k.jsonl"
    report = load_records(path)
    assert (report.format, len(report.records)) == ("question_answer", 3)
    first = report.records[0]
    assert first.source == f"{path}:1" and roles(first) == ["user", "assistant"]
    assert first.messages[0].content.startswith("Natalia sold clips to 48 of her friends in April")
    assert first.messages[1].content.endswith("clips altogether in April and May.\n#### 72")
    mapped = load_records(path, format="prompt_completion", columns={"prompt": "question", "completion": "answer"})
    assert mapped.format == "prompt_completion"
    assert [c.messages for c in mapped.records] == [c.messages for c in report.records]


def test_prompt_completion_strings_and_conversational_lists(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "3+3?"}],
         "completion": [{"role": "assistant", "content": "6"}]},
    ])
    plain, chat = load_records(path).records
    assert plain.messages == [Message("user", "2+2?"), Message("assistant", "4")]
    assert chat.messages == [Message("system", "Terse."), Message("user", "3+3?"), Message("assistant", "6")]


def test_self_instruct_joins_instance_input_to_the_instruction() -> None:
    path = DATA / "self_instruct_seed.jsonl"
    report = load_records(path)
    assert (report.format, len(report.records)) == ("self_instruct", 3)
    relation = report.records[1]
    assert relation.source == f"{path}:2"
    assert relation.messages == [
        Message("user", "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"),
        Message("assistant", "The relation between the given pairs is that they are opposites.")]
    assert not report.records[0].messages[0].content.endswith("\n\n")  # empty input: instruction alone


def test_self_instruct_gives_one_conversation_per_instance(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "si.jsonl", [{"instruction": "Antonym of:", "instances": [
        {"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}]}])
    records = load_records(path).records
    assert [c.messages[0].content for c in records] == ["Antonym of:\n\nhot", "Antonym of:\n\nup"]
    assert [c.source for c in records] == [f"{path}:1", f"{path}:1"]


# --- OASST trees ---------------------------------------------------------------------------------

def test_oasst_fixture_best_paths_synthetic_tree_dropped_trailing_prompter_trimmed() -> None:
    path = DATA / "oasst_trees.jsonl"
    report = load_records(path)
    assert (report.format, len(report.records)) == ("oasst", 3)
    assert report.dropped == Counter({"synthetic or deleted tree": 1, "trailing turn": 1})
    eyes, oa, swallow = report.records
    assert [c.source for c in report.records] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert roles(eyes) == ["user", "assistant", "user", "assistant"]
    assert eyes.messages[0].content == ("How to protect my eyes when I have to stare at my computer screen for "
                                        "longer than 10 hours every day?")
    assert [len(m.content) for m in eyes.messages] == [101, 1349, 47, 435]
    assert oa.messages[0].content == "How does Open Assistant work?"
    assert roles(swallow) == ["user", "assistant"]  # its best path ended on a prompter turn
    assert swallow.messages[0].content == "what is the speed of an unladen swallow ?"


def _node(text: str, role: str, rank: int | None = None, replies: list | None = None, **flags: Any) -> dict:
    return {"text": text, "role": role, "rank": rank, "replies": replies or [], **flags}


def test_oasst_takes_lowest_rank_skips_flagged_replies_and_first_of_ties(tmp_path: Path) -> None:
    tree = _node("Q", "prompter", replies=[
        _node("A rank 1", "assistant", 1),
        _node("A unranked", "assistant", None),
        _node("A synthetic", "assistant", 0, synthetic=True),
        _node("A rank 0", "assistant", 0, replies=[
            _node("follow-up deleted", "prompter", 0, deleted=True),
            _node("follow-up unranked 1", "prompter", None, replies=[_node("B", "assistant")]),
            _node("follow-up unranked 2", "prompter", None),
        ]),
    ])
    path = write_jsonl(tmp_path / "tree.jsonl", [{"message_tree_id": "t1", "prompt": tree}])
    report = load_records(path)
    assert [m.content for m in report.records[0].messages] == ["Q", "A rank 0", "follow-up unranked 1", "B"]
    assert report.dropped == Counter()


# --- text, MT-Bench ------------------------------------------------------------------------------

def test_text_files_and_text_rows_become_raw_text(tmp_path: Path) -> None:
    path = DATA / "pretrain.txt"
    report = load_records(path)
    assert report.format == "text"
    assert report.records == [
        RawText("The river rose after three days of rain.\nBy morning the low fields were under water.", f"{path}:1"),
        RawText("Bread needs flour, water, salt and time.\nYeast does the rest.", f"{path}:6"),
        RawText("A short third document.", f"{path}:11"),
    ]
    rows = write_jsonl(tmp_path / "docs.jsonl", [{"text": "One."}, {"text": "  "}, {"text": "Two."}])
    skipping = load_records(rows, on_error="skip")
    assert [r.text for r in skipping.records] == ["One.", "Two."]
    assert skipping.skipped == Counter({"empty text": 1})


def test_mt_bench_question_rows_are_prompts_not_training_data(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 81, "category": "writing", "turns": ["Q1", "Q2"]}])
    with pytest.raises(DataFileError) as info:
        load_records(path)
    assert str(info.value.errors[0]) == (
        f"{path}:1: no assistant reply: nothing to train on — MT-Bench questions and answers come in separate "
        "files: join them by question_id into one row (turns + choices) or into `messages` rows")


def test_mt_bench_joined_row_is_a_conversation(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"question_id": 1, "turns": ["Q1", "Q2"], "choices": [{"index": 0, "turns": ["A1", "A2"]}]}])
    assert load_records(path).records[0].messages == [
        Message("user", "Q1"), Message("assistant", "A1"), Message("user", "Q2"), Message("assistant", "A2")]


# --- errors --------------------------------------------------------------------------------------

def test_broken_file_raises_one_error_listing_the_first_five() -> None:
    path = DATA / "broken_mixed.jsonl"
    with pytest.raises(DataFileError) as info:
        load_records(path)
    err = info.value
    assert isinstance(err, ValueError) and err.count == 5
    assert str(err) == "\n".join([
        f"{path}: 5 invalid records in the first 6 rows (stopped at max_errors):",
        f"  {path}:2: bad JSON: Expecting ',' delimiter (column 48) — each line must be one complete JSON object",
        f"  {path}:4: field 'messages[1].role': unknown role: 'bot' (expected one of system, user, assistant, "
        "tool) — rename the role, or use format='sharegpt' for {from, value} turns",
        f"  {path}:5: field 'messages[1].content': empty reply: the assistant message is empty — remove the "
        "record or write the reply",
        f"  {path}:6: field 'messages[0].content': non-string content: got number — content must be a string",
        f"  {path}:7: not an object: got list — each record must be a JSON object ({{...}})",
        "fix the records, or skip and count invalid ones: data.skip_invalid=true in a recipe, --skip-invalid on the command line",
    ])


def test_broken_file_reads_to_the_end_when_max_errors_is_larger() -> None:
    path = DATA / "broken_mixed.jsonl"
    with pytest.raises(DataFileError) as info:
        load_records(path, max_errors=50)
    assert info.value.count == 7
    assert str(info.value).splitlines()[0] == f"{path}: 7 invalid records in 9 rows:"
    assert str(info.value).splitlines()[7] == f"  {path}:9: field 'messages[0].content': missing field: absent or null"


def test_skip_counts_invalid_records_by_kind_and_keeps_the_first_errors() -> None:
    path = DATA / "broken_mixed.jsonl"
    report = load_records(path, on_error="skip", max_errors=2)
    assert [c.source for c in report.records] == [f"{path}:1", f"{path}:10"]
    assert roles(report.records[1]) == ["user", "assistant"]  # trailing "Again" removed
    assert report.dropped == Counter({"trailing turn": 1})
    assert report.skipped == Counter({"bad JSON": 1, "unknown role": 1, "empty reply": 1, "non-string content": 1,
                                      "not an object": 1, "no assistant reply": 1, "missing field": 1})
    assert [e.source for e in report.errors] == [f"{path}:2", f"{path}:4"]


def test_broken_alpaca_kinds() -> None:
    path = DATA / "broken_alpaca.json"
    report = load_records(path, on_error="skip")
    assert len(report.records) == 1 and report.records[0].messages[1] == Message("assistant", "7")
    assert report.skipped == Counter({"empty reply": 1, "non-string content": 1, "missing field": 1,
                                      "bad history": 1})
    assert [(e.source, e.field_name) for e in report.errors] == [
        (f"{path}:#1", "output"), (f"{path}:#2", "output"), (f"{path}:#3", "output"), (f"{path}:#4", "history[0]")]
    assert str(report.errors[1]) == (f"{path}:#2: field 'output': non-string content: got list"
                                     " — content must be a string")


def test_bad_json_document_and_unknown_format_raise_even_when_skipping(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"broken_document.json:5: bad JSON: Expecting ',' delimiter \(column 5\)"):
        load_records(DATA / "broken_document.json", on_error="skip")
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"odd.jsonl:1: unknown format: no known format has the keys \['foo'\]"):
        load_records(path, on_error="skip")


def test_forced_format_reports_missing_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "Q", "answer": "A"}])
    report = load_records(path, format="alpaca", on_error="skip")
    assert report.format == "alpaca" and report.records == []
    assert str(report.errors[0]) == f"{path}:1: field 'instruction': missing field: absent or null"


def test_empty_file_and_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no records: the file holds no rows"):
        load_records(path)
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_records(DATA / "gsm8k.jsonl", on_error="ignore")
    with pytest.raises(ConfigError, match=r"^--format / data.format: 'chatml' is not a format \(one of auto, messages"):
        load_records(DATA / "gsm8k.jsonl", format="chatml")
    with pytest.raises(ConfigError, match="'alpca' is not a format — did you mean 'alpaca'?"):
        load_records(DATA / "gsm8k.jsonl", format="alpca")


@pytest.mark.parametrize("messages, kind, field_name", [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], "empty reply", "messages[1].content"),
    ([{"role": "assistant", "content": "Hello"}], "no user turn", None),
    ([{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Hi"}],
     "non-string content", "messages[0].content"),
    ([{"content": "Hi"}, {"role": "assistant", "content": "Hi"}], "missing field", "messages[0].role"),
    (["Hi", {"role": "assistant", "content": "Hi"}], "wrong type", "messages[0]"),
])
def test_conversation_checks(tmp_path: Path, messages: list, kind: str, field_name: str | None) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    report = load_records(path, on_error="skip")
    assert report.skipped == Counter({kind: 1})
    assert report.errors[0].field_name == field_name


# --- every shared instruction file ---------------------------------------------------------------

SHARED_EXPECTED: dict[str, tuple[str, int, dict[str, int], dict[str, int]]] = {
    # file: (format, records, skipped with on_error="skip", dropped)
    "alpaca_data_cleaned_1000_fastchat.json": ("alpaca", 1000, {}, {}),
    "alpaca_tiny_torchtune.json": ("alpaca", 100, {}, {}),
    "dolly_sample_litgpt.json": ("dolly", 12, {}, {}),
    "fastchat_dummy_conversation.json": ("sharegpt", 500, {}, {}),
    "fastchat_dummy_conversation_with_system.json": ("sharegpt", 500, {}, {}),
    "gsm8k_test.jsonl": ("question_answer", 1319, {}, {}),
    "gsm8k_train.jsonl": ("question_answer", 7473, {}, {}),
    "lima_llamafactory.json": ("alpaca", 1029, {}, {}),
    "llamafactory_alpaca_en_demo.json": ("alpaca", 999, {}, {}),
    "llamafactory_glaive_toolcall_en_demo.json": ("sharegpt", 300, {}, {}),
    "llamafactory_identity.json": ("alpaca", 91, {}, {}),
    "mt_bench_questions.jsonl": ("mt_bench", 0, {"no assistant reply": 80}, {}),
    "mt_bench_reference_answers_gpt4.jsonl": ("mt_bench", 0, {"no user turn": 30}, {}),
    "oasst1_sft_zh_llamafactory.json": ("alpaca", 689, {}, {}),
    "oasst_en_100_trees.jsonl": ("oasst", 95, {}, {"synthetic or deleted tree": 5, "trailing turn": 39}),
    "self_instruct_seed_tasks.jsonl": ("self_instruct", 175, {}, {}),
    "self_instruct_user_oriented_instructions.jsonl": ("self_instruct", 252, {}, {}),
    "sharegpt_chat_tiny_torchtune.json": ("sharegpt", 1, {}, {}),
    "sharegpt_conversation_axolotl.json": ("sharegpt", 1, {}, {}),
}
PROMPT_SETS = {"mt_bench_questions.jsonl", "mt_bench_reference_answers_gpt4.jsonl"}


@requires_shared
@pytest.mark.shared
def test_every_shared_instruction_file_is_accounted_for() -> None:
    assert sorted(p.name for p in (SHARED_DATA / "instructions").iterdir()) == sorted(SHARED_EXPECTED)


@requires_shared
@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(SHARED_EXPECTED))
def test_shared_instruction_file_loads_with_exact_counts(name: str) -> None:
    fmt, count, skipped, dropped = SHARED_EXPECTED[name]
    path = shared_file(f"instructions/{name}")
    report = load_records(path, on_error="skip" if name in PROMPT_SETS else "raise")
    assert (report.format, len(report.records)) == (fmt, count)
    assert report.skipped == Counter(skipped) and report.dropped == Counter(dropped)
    assert all(isinstance(r, Conversation) and r.messages[-1].role == "assistant" for r in report.records)


@requires_shared
@pytest.mark.shared
def test_shared_multi_turn_system_and_tool_counts() -> None:
    def multi_turn(name: str) -> int:
        return sum(len(c.messages) > 2 for c in load_records(shared_file(f"instructions/{name}")).records)

    assert multi_turn("lima_llamafactory.json") == 29
    assert multi_turn("oasst1_sft_zh_llamafactory.json") == 390
    with_system = load_records(shared_file("instructions/fastchat_dummy_conversation_with_system.json")).records
    assert sum(c.messages[0].role == "system" for c in with_system) == 6
    glaive = load_records(shared_file("instructions/llamafactory_glaive_toolcall_en_demo.json")).records
    messages = [m for c in glaive for m in c.messages]
    assert Counter(m.role for m in messages) == Counter({"user": 746, "assistant": 746 + 211, "tool": 211})
    assert sum("tool_calls" in m.extra for m in messages) == 211
    assert sum(c.tools is not None for c in glaive) == 191  # the other 109 have tools "[]" -> None
    assert all(c.tools for c in glaive if any("tool_calls" in m.extra for m in c.messages))
    torchtune = load_records(shared_file("instructions/sharegpt_chat_tiny_torchtune.json")).records[0]
    assert roles(torchtune) == ["system", "user", "assistant", "user", "assistant"]


@requires_shared
@pytest.mark.shared
def test_mt_bench_files_joined_by_question_id_make_30_conversations(tmp_path: Path) -> None:
    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in shared_file(f"instructions/{name}").read_text().splitlines()]

    questions = {row["question_id"]: row for row in rows("mt_bench_questions.jsonl")}
    joined = [{**questions[a["question_id"]], **a} for a in rows("mt_bench_reference_answers_gpt4.jsonl")]
    records = load_records(write_jsonl(tmp_path / "joined.jsonl", joined)).records
    assert len(records) == 30 and all(roles(c) == ["user", "assistant"] * 2 for c in records)


@requires_shared
@pytest.mark.shared
def test_loading_lima_takes_well_under_a_second() -> None:
    path = shared_file("instructions/lima_llamafactory.json")
    start = time.perf_counter()
    load_records(path)
    assert time.perf_counter() - start < 1.0
