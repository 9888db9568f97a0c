"""`sftkit data preview`: the JSON contract, the human view, and errors for people."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import device as torch_device
from transformers import AutoTokenizer

from sftkit.cli import main
from sftkit.data.formats import load_records
from sftkit.data.render import IGNORE_INDEX, Renderer
from tests.conftest import ASSETS, SHARED_DATA, requires_shared, tokenizer_dir

CHAT = ASSETS / "data" / "chat_messages.jsonl"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["data", "preview", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_is_one_object_per_example_in_input_order(capsys: pytest.CaptureFixture[str]) -> None:
    qwen = tokenizer_dir("qwen2.5")
    code, out, err = run(capsys, "--tokenizer", str(qwen), "--data", str(CHAT), "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    records = load_records(CHAT).records
    assert len(rows) == len(records) == 10
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    renderer = Renderer(tokenizer)
    for row, record in zip(rows, records):
        assert set(row) == {"input_ids", "labels"}
        expected = renderer.render(record)
        assert row["input_ids"] == expected.input_ids and row["labels"] == expected.labels
        trained = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert trained[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = rows[0]
    assert tokenizer.decode([t for t in first["labels"] if t != IGNORE_INDEX]) == (
        "100 °C (212 °F) at standard atmospheric pressure.<|im_end|>"
    )
    assert "10 examples" in err


def test_max_length_and_strategy_flags(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--tokenizer", str(tokenizer_dir("qwen2.5")), "--data", str(CHAT), "--json"]
    _, out, _ = run(capsys, *args, "--strategy", "all", "--max-length", "40")
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(len(r["input_ids"]) <= 40 and r["labels"] == [IGNORE_INDEX, *r["input_ids"][1:]] for r in rows)


def test_human_view_marks_trained_text_and_builtin_template(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "--tokenizer", str(tokenizer_dir("gpt2")), "--template", "chatml",
        "--data", str(CHAT), "--limit", "1", "--no-colour", "--skip-invalid",
    )  # fmt: skip
    assert code == 0
    # the built-in ChatML has no tool support: the one record with a tool call is refused and counted
    assert "skipped invalid: 1 (tool call not rendered)" in out
    assert "[[100 °C (212 °F) at standard atmospheric pressure.<|im_end|>]]" in out
    assert "template added 2 special tokens: <|im_start|> <|im_end|>" in out


def test_bad_file_gives_a_clear_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    bad = ASSETS / "data" / "broken_mixed.jsonl"
    code, _, err = run(capsys, "--tokenizer", str(tokenizer_dir("qwen2.5")), "--data", str(bad))
    assert code == 2
    assert err.startswith("sftkit: error: ")
    assert f"{bad}:2: bad JSON" in err and "Traceback" not in err
    code, out, _ = run(capsys, "--tokenizer", str(tokenizer_dir("qwen2.5")), "--data", str(bad), "--skip-invalid")
    assert code == 0 and "skipped invalid" in out


def test_base_tokenizer_without_template_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--tokenizer", str(tokenizer_dir("gpt2")), "--data", str(CHAT))
    assert code == 2 and "has no chat template" in err and "chatml" in err


SHARED_INSTRUCTIONS = sorted((SHARED_DATA / "instructions").glob("*")) if SHARED_DATA.is_dir() else []
PROMPT_ONLY = {"mt_bench_questions.jsonl", "mt_bench_reference_answers_gpt4.jsonl"}


@requires_shared
@pytest.mark.shared
@pytest.mark.parametrize("path", SHARED_INSTRUCTIONS, ids=lambda p: p.name)
def test_preview_every_shared_instruction_file(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--tokenizer", str(tokenizer_dir("qwen2.5")), "--data", str(path), "--json")
    if path.name in PROMPT_ONLY:  # prompts or answers only: not an SFT set, and said so
        assert code == 2 and "MT-Bench questions and answers come in separate files" in err
        return
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows and all(any(t != IGNORE_INDEX for t in r["labels"]) for r in rows)
    assert f"{len(rows)} examples" in err


def test_preview_of_a_recipe_is_exactly_what_training_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sftkit data preview RECIPE --json` and the training path's data entry give the same ids and labels, with
    Llama-3.2's template and a `data.template_kwargs.date_string` (which a preview once left out)."""
    import yaml

    from sftkit.checkpoint import save_tiny_model
    from sftkit.recipe import load_config
    from sftkit.data.batches import Batcher
    from sftkit.train import setup_data, setup_model
    from tests.conftest import config_path

    model_dir = save_tiny_model(config_path("llama3.2"), tokenizer_dir("llama3.2"), tmp_path / "model", layers=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": str(CHAT), "eval_fraction": 0.2, "max_length": 200,
                 "template_kwargs": {"date_string": "26 Jul 2024"}},
        "train": {"seed": 3},
    }))
    config = load_config(recipe)
    _, tokenizer, _ = setup_model(config, torch_device("cpu"))
    train, evaluation = setup_data(config, tokenizer)
    for split, examples in (("train", train.examples), ("eval", evaluation.examples)):
        code, out, err = run(capsys, str(recipe), "--json", "--split", split)
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert rows == [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]
    text = tokenizer.decode(train.examples[0].input_ids)
    assert "Today Date: 26 Jul 2024" in text  # the recipe's date reached the template (not today's)
    _, out, _ = run(capsys, str(recipe), "data.template_kwargs={}", "--json")  # without it: other tokens
    assert json.loads(out.splitlines()[0])["input_ids"] != train.examples[0].input_ids

    # packed rows: the rows the training batcher packs, with position_ids restarting per conversation
    code, out, _ = run(capsys, str(recipe), "data.batching=packed", "--json")
    packed = [json.loads(line) for line in out.splitlines()]
    batcher = Batcher(train.examples, 0, batch_size=1, grad_accum=1, seed=3, mode="packed", max_length=200)
    assert [row["input_ids"] for row in packed] == [
        [t for i in unit for t in train.examples[i].input_ids] for unit in batcher.units]
    assert all(row["position_ids"].count(0) == len(unit) for row, unit in zip(packed, batcher.units))
