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
