"""One run per output_dir, errors before the weights load, and the figures a run logs (sftkit.rundir, train).

Every run here is the real `sftkit train` command on a 1-layer GPT-2 learning to repeat a colour.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest

from sftkit import model as model_module
from sftkit.cli import main
from sftkit.config import DataConfig
from sftkit.data.load import dated_template_note, load_data
from sftkit.data.templates import prepare_tokenizer
from sftkit.model import load_tokenizer
from tests.conftest import tiny_chat_recipe, tokenizer_dir

WORDS = ("red", "blue", "green", "black")
TRAIN = {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "log_every": 1, "save_every": 2, "device": "cpu",
         "sample_max_new_tokens": 2}


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    return tiny_chat_recipe(tmp_path, WORDS, TRAIN)


def train(capsys: pytest.CaptureFixture, recipe: Path, out: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    flags = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    code = main(["train", *flags, str(recipe), f"output_dir={out}", *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_finished_run_is_never_overwritten_silently(capsys, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(capsys, recipe, out)[0] == 0
    final_weights = (out / "final" / "model.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()

    code, _, err = train(capsys, recipe, out, "train.max_steps=2")  # the same output_dir, another run
    assert code == 2
    assert "already holds a run (finished at step 4)" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "final" / "model.safetensors").read_bytes() == final_weights
    assert (out / "metrics.jsonl").read_text() == metrics

    code, stdout, _ = train(capsys, recipe, out, "train.resume=true")  # resuming a finished run: nothing to do
    assert code == 0 and "already finished at step 4" in stdout and "nothing to do" in stdout
    assert (out / "final" / "model.safetensors").read_bytes() == final_weights

    code, stdout, _ = train(capsys, recipe, out, "--overwrite", "train.max_steps=2", "train.save_every=0")
    assert code == 0 and "--overwrite: removed the previous run's" in stdout
    assert steps(out) == [1, 2]  # metrics of the new run only
    assert not (out / "checkpoints").exists()  # the old run's step-2 and step-4 are gone: no stale resume
    assert len(list((out / "tb").iterdir())) == 1  # one TensorBoard stream


def test_resume_must_be_the_same_run(capsys, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(capsys, recipe, out)[0] == 0
    code, _, err = train(capsys, recipe, out, "train.resume=true", "train.lr=0.5")
    assert code == 2 and "train.lr: 0.01 -> 0.5" in err and "another config" in err
    code, _, err = train(capsys, recipe, out, "train.resume=true", "--overwrite")
    assert code == 2 and "choose one" in err


def test_a_resumed_run_logs_each_step_once_in_tensorboard(capsys, recipe: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train(capsys, recipe, out, "train.max_steps=5")[0] == 0
    shutil.rmtree(out / "final")  # as if killed after step 5: the last checkpoint is step-4
    code, stdout, _ = train(capsys, recipe, out, "train.max_steps=5", "train.resume=true")
    assert code == 0 and "resumed from" in stdout and "step 4" in stdout
    assert steps(out) == [1, 2, 3, 4, 5]  # metrics.jsonl cut back to the checkpoint, then step 5 again
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]  # step 5 purged from the first stream


def test_metrics_and_console_say_what_a_person_needs(capsys, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout, _ = train(capsys, recipe, out, "data.eval_fraction=0.25", "train.eval_every=2")
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 and r["peak_mem_gb"] > 0 for r in rows)
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows) and rows[-1]["elapsed_s"] > 0
    assert "[step 2] eval loss" in stdout and "perplexity" in stdout
    assert "sample  user: 'Say " in stdout and "reply:" in stdout  # the sample with its prompt
    assert "done        4 steps" in stdout and "train loss" in stdout and "eval loss" in stdout
    assert f"sftkit chat --model {out / 'final'}" in stdout


@pytest.mark.parametrize("problem", ["missing file", "empty file", "unknown shape", "no chat template"])
def test_data_errors_come_before_the_weights_load(capsys, monkeypatch, recipe: Path, tmp_path: Path,
                                                  problem: str) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded before the data was checked")

    monkeypatch.setattr(model_module, "read_weights", never)
    data = tmp_path / "bad.jsonl"
    overrides = [f"data.train={data}"]
    expected = {"missing file": "bad.jsonl", "empty file": "no records", "unknown shape": "unknown format",
                "no chat template": "has no chat template"}[problem]
    if problem == "empty file":
        data.write_text("")
    elif problem == "unknown shape":
        data.write_text(json.dumps({"question_text": "a", "reply_text": "b"}) + "\n")
    elif problem == "no chat template":
        data.write_text(json.dumps({"messages": [{"role": "user", "content": "Say red."},
                                                 {"role": "assistant", "content": "red"}]}) + "\n")
        overrides.append("data.template=null")
    code, _, err = train(capsys, recipe, tmp_path / "out", *overrides)
    assert code == 2, err
    assert expected in err and "weights were loaded" not in err and "Traceback" not in err
    if problem == "no chat template":
        assert err.count("has no chat template") == 1 and "bad.jsonl:1" in err


def test_llama_template_date_is_noted(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir("llama3.2"))
    prepare_tokenizer(tokenizer)
    note = dated_template_note(tokenizer, DataConfig(train=["x.jsonl"]))
    today = datetime.date.today().strftime("%d %b %Y")
    assert note is not None and today in note and "data.template_kwargs.date_string" in note
    assert dated_template_note(tokenizer, DataConfig(train=["x.jsonl"],
                                                     template_kwargs={"date_string": "26 Jul 2024"})) is None


def test_many_truncated_examples_are_a_warning(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir("qwen2.5"))
    prepare_tokenizer(tokenizer)
    rows = [{"messages": [{"role": "user", "content": "word " * n}, {"role": "assistant", "content": "ok"}]}
            for n in (2, 3, 80, 100, 120)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_split, _ = load_data(DataConfig(train=[str(data)], max_length=60), tokenizer, seed=0)
    [warning] = train_split.warnings
    assert "drops 3 (60%)" in warning and "data.max_length" in warning
    assert f"warning: {warning}" in train_split.summary()
    wide, _ = load_data(DataConfig(train=[str(data)], max_length=4096), tokenizer, seed=0)
    assert wide.warnings == []

