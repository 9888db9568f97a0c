"""The `sftkit` command: parses arguments and dispatches; the work lives in the modules.

    sftkit data preview --tokenizer DIR --data FILE [--format F] [--template NAME]
                        [--strategy assistant|last|all] [--turns auto|whole|per_turn|last]
                        [--reasoning train|mask|drop] [--max-length N] [--json] [--pack]
    sftkit data inspect FILE [--tokenizer DIR] [--template NAME] [--max-length N] [--report DIR]
    sftkit data clean FILE --out FILE [--near-dup-threshold 0.85] [--min-reply-chars N]
                      [--tokenizer DIR --max-tokens N] [--drop-pattern REGEX ...] [--drop-refusals]
    sftkit data distill --teacher DIR|URL --prompts FILE --out FILE [--n K] [--temperature T]
    sftkit data cache ls|clear [--dir DIR]             # the token cache of rendered examples
    sftkit train [--nproc N] [--overwrite] CONFIG.yaml [key=value ...]
    sftkit generate --model DIR --prompt TEXT [--system TEXT] [--max-new-tokens N] [--temperature T]
    sftkit chat --model DIR
    sftkit serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]   # OpenAI-compatible
    sftkit export ADAPTER_DIR --out DIR [--merge] [--base DIR] [--dtype auto|float32|bfloat16|float16]
    sftkit export MODEL_DIR --gguf --out FILE.gguf [--dtype auto|float32|bfloat16|float16]   # llama.cpp, Ollama
    sftkit report RUN_DIR [--base DIR --prompts FILE]   # RUN_DIR/report.html: one self-contained page
    sftkit model tiny --config ARCH.json --tokenizer DIR --out DIR
    sftkit diff BASE TUNED [--png FILE] [--threshold 0.01] [--per-tensor] [--json FILE]
    sftkit compare BASE TUNED --prompts FILE [--out FILE.md] [--max-new-tokens N]
    sftkit config keys [SECTION | KEY]          # every recipe key: type, default, description
    sftkit --version

Commands from other packages join through the `sftkit.commands` entry point: `sftkit demo` is
the demo's (demo/sftkit_demo), installed with sftkit by `make setup`.

Start-up stays well under a second for `--help`, `--version` and a bad recipe: this module imports
only the standard library and `sftkit.config`; each command imports what it needs when it runs.
The commands' arguments live in cli/data.py, cli/training.py and cli/models.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version

from sftkit.cli import data, models, training

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _version() -> str:
    try:
        return f"sftkit {version('sftkit')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "sftkit (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftkit", description="Supervised fine-tuning of language models.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)
    data.add_commands(commands.add_parser("data", help="look at and prepare datasets")
                      .add_subparsers(dest="data_command", required=True))
    training.add_commands(commands)
    models.add_commands(commands)
    for plugin in entry_points(group="sftkit.commands"):  # e.g. `sftkit demo`, from demo/ (never imported here)
        plugin.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one clear message and exit 2, never a bare traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `sftkit data preview --json | head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops at a checkpoint: sftkit.faults)
        print(f"\n{_rank()}sftkit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from sftkit.errors import user_errors

        if not isinstance(err, user_errors()):
            raise
        switch = _skip_switch(args)
        message = err.naming(switch) if switch and hasattr(err, "naming") else str(err)  # DataFileError's hint
        print(f"{_rank()}sftkit: error: {message}", file=sys.stderr)
        return 2


def _skip_switch(args: argparse.Namespace) -> str | None:
    """How this command skips invalid records: a recipe's key, or the --skip-invalid flag (None: neither)."""
    if args.command == "train" or (args.command == "data" and getattr(args, "config", None)):
        return "data.skip_invalid=true (in the recipe, or after it on the command line)"
    return "--skip-invalid" if hasattr(args, "skip_invalid") else None


def _rank() -> str:
    """"[rank R] " in a process started by torchrun: the message says which rank failed."""
    return f"[rank {os.environ['RANK']}] " if "RANK" in os.environ and "LOCAL_RANK" in os.environ else ""
