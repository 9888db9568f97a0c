"""The command line itself: start-up without torch, --version, `sftkit config keys`, errors without tracebacks.

    sftkit --help / --version / config keys train       # answered before torch or transformers load
    sftkit train missing.yaml                           # one line, exit 2, in a fraction of a second
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from sftkit.cli import main
from sftkit.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "pydantic")  # pydantic: only once a recipe is read


def run_main_fresh(*argv: str) -> dict:
    """`sftkit.cli.main(argv)` in a new interpreter: its exit status, output, and which heavy modules it loaded."""
    code = f"""
import contextlib, io, json, sys
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        from sftkit.cli import main
        status = main({list(argv)!r})
    except SystemExit as stop:
        status = stop.code
print(json.dumps({{"status": status, "out": out.getvalue(), "err": err.getvalue(),
                  "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--help"], ["config", "keys", "train"]])
def test_help_version_and_keys_load_neither_torch_nor_transformers(argv: list[str]) -> None:
    result = run_main_fresh(*argv)
    assert result["status"] in (0, None), result["err"]
    assert not {"torch", "transformers"} & set(result["loaded"]), result["loaded"]
    if argv == ["--help"]:
        assert "pydantic" not in result["loaded"]  # `sftkit --help` is argparse and nothing else


@pytest.mark.parametrize("argv, message", [
    (["train", "no-such-recipe.yaml"], "sftkit: error: no-such-recipe.yaml: config file not found\n"),
    (["train", "configs/tiny-cpu.yaml", "train.lr=abc"], "sftkit: error: train.lr: expected a number, got 'abc'\n"),
    (["train", "configs/tiny-cpu.yaml", "train.learning_rate=1e-5"],
     "sftkit: error: train.learning_rate: unknown key — did you mean 'train.lr'?"),
])
def test_a_bad_recipe_fails_in_one_line_before_torch_loads(argv: list[str], message: str) -> None:
    result = run_main_fresh(*argv)
    assert result["status"] == 2
    assert result["err"].startswith(message) and "Traceback" not in result["err"]
    assert not {"torch", "transformers"} & set(result["loaded"]), result["loaded"]


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"sftkit {version('sftkit')}\n"


def test_config_keys_lists_type_default_and_doc(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "keys", "train"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = lines.index("train.lr: float = 2.0e-05")  # the dataclass's default, as YAML writes it
    assert TrainConfig.lr == 2e-5
    assert lines[at + 1] == "    Peak learning rate (AdamW), reached after warm-up, then cosine decay to 0."
    assert "train.on_nan: stop | skip = stop" in lines
    assert "train.max_steps: int | null = null" in lines
    assert not any(line.startswith(("model.", "data.", "lora.")) for line in lines)  # one section only


def test_config_keys_without_a_section_lists_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "keys"]) == 0
    keys = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert {key.split(".")[0] for key in keys} == {"model", "data", "train", "lora", "eval", "output_dir"}
    assert len(keys) == len(set(keys)) > 40


def test_config_keys_of_one_key_and_mistakes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "keys", "data.format"]) == 0
    assert capsys.readouterr().out.startswith("data.format: str = auto\n    Record format")
    assert main(["config", "keys", "train.lrr"]) == 2
    assert "train.lrr: unknown key — did you mean 'train.lr'?" in capsys.readouterr().err
    assert main(["config", "keys", "trian"]) == 2
    assert "trian: no such section (one of model, data, train, lora, eval, output_dir)" in capsys.readouterr().err


# -- mistakes a new user makes: one message each, never a traceback ------------------------------
ASSETS = REPO / "tests" / "assets"
CHAT = ASSETS / "data" / "chat_messages.jsonl"
GSM8K = ASSETS / "data" / "gsm8k.jsonl"
FORMATS_NAMED = "(one of auto, messages, sharegpt, alpaca, prompt_completion"


def error_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one error line(s) `sftkit ARGV` prints, after checking it exits 2 without a traceback."""
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("sftkit: error: ") and "Traceback" not in captured.err
    return captured.err.removeprefix("sftkit: error: ")


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import tiny_chat_recipe

    return tiny_chat_recipe(tmp_path_factory.mktemp("cli"), ("red", "green", "blue", "white"),
                            {"max_steps": 1, "batch_size": 2, "device": "cpu"})


def test_a_misspelt_format_gets_a_did_you_mean_in_every_command(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    from tests.conftest import tokenizer_dir

    commands = [
        ["data", "preview", "--tokenizer", str(tokenizer_dir("qwen2.5")), "--data", str(CHAT), "--format", "alpca"],
        ["data", "inspect", str(CHAT), "--format", "alpca"],
        ["data", "clean", str(CHAT), "--out", str(tmp_path / "clean.jsonl"), "--format", "alpca"],
    ]
    for argv in commands:
        message = error_of(capsys, *argv)
        assert message.startswith("--format / data.format: 'alpca' is not a format — did you mean 'alpaca'? "
                                  + FORMATS_NAMED), argv
        assert message.count("\n") == 1  # one line
    assert not (tmp_path / "clean.jsonl").exists()


def test_a_misspelt_format_in_a_recipe_fails_before_the_weights_load(capsys: pytest.CaptureFixture[str],
                                                                     tiny_recipe: Path, tmp_path: Path) -> None:
    message = error_of(capsys, "train", str(tiny_recipe), f"output_dir={tmp_path / 'run'}", "data.format=alpca")
    assert "'alpca' is not a format — did you mean 'alpaca'?" in message
    assert not (tmp_path / "run" / "sftkit_config.yaml").exists()  # nothing trained, nothing written


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_message(capsys: pytest.CaptureFixture[str], tiny_recipe: Path,
                                                    tmp_path: Path) -> None:
    message = error_of(capsys, "train", str(tiny_recipe), f"output_dir={tmp_path / 'run'}", "train.device=cuda")
    assert message.startswith("train.device: 'cuda' is not available on this machine: ")
    assert "use train.device=cpu, or auto" in message
    message = error_of(capsys, "train", str(tiny_recipe), f"output_dir={tmp_path / 'run'}", "train.device=gpu")
    assert message.startswith("train.device: 'gpu' is not a device — use auto, cpu, cuda, cuda:N or mps")
    model = tiny_recipe.parent / "tiny-gpt2"
    message = error_of(capsys, "generate", "--model", str(model), "--prompt", "Hi", "--device", "mps")
    assert message.startswith("--device: 'mps' is not available on this machine: ")


def test_the_skip_hint_names_the_switch_of_the_command(capsys: pytest.CaptureFixture[str], tiny_recipe: Path,
                                                       tmp_path: Path) -> None:
    from tests.conftest import tokenizer_dir

    bad = tmp_path / "bad.jsonl"
    bad.write_text(CHAT.read_text() + '{"messages": [{"role": "bot", "content": "hi"}]}\n')
    message = error_of(capsys, "train", str(tiny_recipe), f"output_dir={tmp_path / 'run'}", f"data.train={bad}")
    assert f"{bad}: 1 invalid record in 11 rows:" in message
    assert message.endswith("skip and count invalid ones: data.skip_invalid=true (in the recipe, or after it on "
                            "the command line)\n")
    message = error_of(capsys, "data", "preview", "--tokenizer", str(tokenizer_dir("qwen2.5")), "--data", str(bad))
    assert message.endswith("skip and count invalid ones: --skip-invalid\n")
    message = error_of(capsys, "data", "clean", str(bad), "--out", str(tmp_path / "clean.jsonl"))
    assert message.endswith("skip and count invalid ones: --skip-invalid\n")


def test_a_column_missing_from_the_file_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    message = error_of(capsys, "data", "inspect", str(GSM8K), "--columns", "prompt=q,completion=answer")
    assert message == (f"{GSM8K}:1: no column 'q' (named by --columns / data.columns); this row has 'question', "
                       "'answer' — map sftkit's names to the file's, e.g. prompt=question,completion=answer\n")


def test_data_train_takes_a_directory_or_a_glob(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tests.conftest import tokenizer_dir

    shards = tmp_path / "shards"
    shards.mkdir()
    lines = CHAT.read_text().splitlines(keepends=True)
    (shards / "b.jsonl").write_text("".join(lines[6:]))
    (shards / "a.jsonl").write_text("".join(lines[:6]))
    (shards / "README.md").write_text("# not training data\n")
    args = ["data", "preview", "--tokenizer", str(tokenizer_dir("qwen2.5")), "--json", "--data"]
    assert main([*args, str(CHAT)]) == 0
    whole = capsys.readouterr().out
    for data in (shards, shards / "*.jsonl", tmp_path / "**" / "?.jsonl"):
        assert main([*args, str(data)]) == 0, data
        assert capsys.readouterr().out == whole  # a.jsonl then b.jsonl: the same examples in the same order
    assert error_of(capsys, *args, str(tmp_path / "*.parquet")).startswith(
        f"{tmp_path / '*.parquet'}: no file matches this pattern")
    assert error_of(capsys, "data", "clean", str(shards), "--out", str(tmp_path / "c.jsonl")).startswith(
        f"{shards}: data clean cleans one file at a time")
    (shards / "extra.json").write_text("[]")
    assert error_of(capsys, *args, str(shards)).startswith(
        f"{shards}: a directory with .json and .jsonl files: which are the data? — name them with a glob")
