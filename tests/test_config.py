"""Config: YAML + dotted overrides, errors that name the key, the resolved sftkit_config.yaml round-trips."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftkit.checkpoint import save_config
from sftkit.cli import main
from sftkit.config import ConfigError
from sftkit.recipe import config_from_dict, load_config

BASE = ["model.path=models/tiny", "data.train=data/train.jsonl"]


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_and_types() -> None:
    config = load_config(None, BASE)
    assert config.model.dtype == "auto" and config.model.trust_remote_code is False
    assert config.model.attn_implementation == "sdpa"
    assert config.data.train == [str(Path.cwd() / "data/train.jsonl")]  # one path becomes a list, read from the cwd
    assert config.output_dir == str(Path.cwd() / "runs/sft")
    assert config.data.template is None and config.data.strategy == "assistant"
    assert config.train.max_steps is None and config.train.resume is False


def test_overrides_are_yaml_values(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "model: {path: m}\ndata: {train: a.jsonl, max_length: 512}\ntrain: {lr: 2.0e-5}\n")
    config = load_config(recipe, [
        "train.lr=1e-5",  # YAML 1.1 reads '1e-5' as a string: still a float here
        "data.max_length=1024",
        "train.resume=true",
        "data.train=[a.jsonl, b.jsonl]",
        "data.template_kwargs={date_string: 26 Jul 2024}",
        "data.columns={instruction: question}",
        "train.max_steps=30",
        "output_dir=runs/x",
    ])
    assert config.train.lr == 1e-5 and isinstance(config.train.lr, float)
    assert config.data.max_length == 1024
    assert config.train.resume is True
    assert config.data.train == [str(Path.cwd() / "a.jsonl"), str(Path.cwd() / "b.jsonl")]  # overrides: from the cwd
    assert config.data.template_kwargs == {"date_string": "26 Jul 2024"}
    assert config.data.columns == {"instruction": "question"}
    assert config.train.max_steps == 30
    assert config.output_dir == str(Path.cwd() / "runs/x")
    assert config.model.path == str(tmp_path / "m")  # the recipe's own paths: from the recipe's directory


def test_max_steps_overrides_epochs() -> None:
    assert load_config(None, BASE + ["train.epochs=3"]).train.total_steps(steps_per_epoch=10) == 30
    assert load_config(None, BASE + ["train.epochs=3", "train.max_steps=7"]).train.total_steps(10) == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=1e-5", "train.learning_rate: unknown key — did you mean 'train.lr'?"),
        ("train.gradient_accum=4", "train.gradient_accum: unknown key — did you mean 'train.grad_accum'?"),
        ("trian.lr=1e-5", "trian: unknown key — did you mean 'train'?"),
        ("data.max_lenght=10", "data.max_lenght: unknown key — did you mean 'data.max_length'?"),
    ],
)
def test_unknown_key_suggests(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + [override])
    assert str(err.value).startswith(message)


def test_unknown_key_in_yaml_lists_valid_keys(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "model: {path: m, precision: bf16}\ndata: {train: a.jsonl}\n")
    with pytest.raises(ConfigError, match=r"model.precision: unknown key — did you mean 'model.dtype'\?.*model.path"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.lr=-1", "train.lr: -1.0 must be a positive number"),
        ("model.dtype=fp8", "model.dtype: 'fp8' is not one of auto, float32, bfloat16, float16"),
        ("train.batch_size=0", "train.batch_size: 0 must be at least 1"),
        ("train.batch_size=2.5", "train.batch_size: expected an integer, got 2.5"),
        ("train.resume=maybe", "train.resume: expected true or false, got 'maybe'"),
        ("data.strategy=every", "data.strategy: 'every' is not one of assistant, last, all"),
        ("data.eval_fraction=1.5", "data.eval_fraction: 1.5 must be in [0, 1)"),
        ("train.warmup_ratio=1", "train.warmup_ratio: 1.0 must be in [0, 1)"),
        ("data.columns=[a, b]", "data.columns: expected a mapping, got ['a', 'b']"),
    ],
)
def test_bad_value_names_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + [override])
    assert str(err.value) == message


def test_required_and_conflicting_keys() -> None:
    with pytest.raises(ConfigError, match="model.path: required"):
        load_config(None, ["data.train=a.jsonl"])
    with pytest.raises(ConfigError, match="data.train: required"):
        load_config(None, ["model.path=m"])
    with pytest.raises(ConfigError, match="data.eval: give data.eval or data.eval_fraction, not both"):
        load_config(None, BASE + ["data.eval=e.jsonl", "data.eval_fraction=0.1"])
    with pytest.raises(ConfigError, match="an override reads key=value"):
        load_config(None, BASE + ["train.lr"])


def test_dump_round_trips(tmp_path: Path) -> None:
    config = load_config(None, BASE + ["train.lr=1e-5", "data.template=chatml", "data.template_kwargs={a: 1}"])
    path = save_config(config, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 1e-5
    again = load_config(path)
    assert again == config
    assert config_from_dict(config.to_dict()) == config


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, "model: {path: m}\ndata: {train: a.jsonl}\n")
    assert main(["train", str(recipe), "train.learning_rate=1e-5"]) == 2
    assert "sftkit: error: train.learning_rate: unknown key — did you mean 'train.lr'?" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid_and_say_how_to_run(recipe: Path) -> None:
    load_config(recipe)
    assert f"sftkit train configs/{recipe.name}" in recipe.read_text().split("\nmodel:")[0]


def test_python_dash_m_sftkit_train(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "model: {path: m}\ndata: {train: a.jsonl}\n")
    done = subprocess.run([sys.executable, "-m", "sftkit", "train", str(recipe), "model.dtype=fp8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "sftkit: error: model.dtype: 'fp8' is not one of auto, float32, bfloat16, float16" in done.stderr


def test_data_train_mixes_sources_by_weight_and_samples() -> None:
    """`data.train` entries with weight/samples go through sftkit.data.mixing, seeded by train.seed."""
    from transformers import AutoTokenizer

    from sftkit.data.load import load_data
    from tests.conftest import ASSETS, tokenizer_dir

    chat, identity = str(ASSETS / "data" / "chat_messages.jsonl"), str(ASSETS / "data" / "identity_alpaca.json")
    config = load_config(None, [
        "model.path=unused", f"data.train=[{{path: {chat}, weight: 2}}, {{path: {identity}, samples: 2}}]",
    ])  # fmt: skip
    assert [s.path for s in config.data.sources()] == [chat, identity]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    train, _ = load_data(config.data, tokenizer, seed=0)
    sources = [e.source.rsplit(":", 1)[0] for e in train.examples]
    assert sources.count(chat) == 2 * 10 and sources.count(identity) == 2  # 10 chats (one trailing turn dropped)
    again, _ = load_data(config.data, tokenizer, seed=0)
    assert [e.source for e in again.examples] == [e.source for e in train.examples]


@pytest.mark.parametrize(
    "entry,message",
    [("{path: a.jsonl, weight: 1, samples: 2}", "not both"), ("{file: a.jsonl}", "expected a path"),
     ("{path: a.jsonl, weight: -1}", "weight must be")],
)  # fmt: skip
def test_bad_mixing_entries_name_the_entry(entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"data.train\[0\]: .*{message}"):
        load_config(None, ["model.path=x", f"data.train=[{entry}]"])


@pytest.mark.parametrize(("override", "meant"), [("lr=1e-5", "train.lr"), ("train.max_length=64", "data.max_length"),
                                                  ("data.lr=1e-5", "train.lr"), ("trian.lr=1", "train")])
def test_a_key_in_the_wrong_place_names_where_it_lives(override: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key — did you mean '{re.escape(meant)}'"):
        load_config(None, BASE + [override])
