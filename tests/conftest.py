"""Shared test fixtures: real tokenizers and data, from ../shared when present, else tests/assets.

A user's fresh clone has no ../shared: tests that sweep every shared file are marked `shared` and
skip there; everything else runs on the small fixtures committed under tests/assets/ (see
tests/assets/SOURCES.md for their origin and licences).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "SFTKIT_CACHE_DIR" not in os.environ:  # the token cache of the tests' runs: never the user's ~/.cache
    import tempfile

    os.environ["SFTKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="sftkit-test-cache-")

ASSETS = Path(__file__).parent / "assets"
_SHARED_ENV = os.environ.get("SFTKIT_SHARED")
SHARED = Path(_SHARED_ENV) if _SHARED_ENV else Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
HAVE_SHARED = (SHARED_DATA / "tokenizers").is_dir()


def tokenizer_dir(family: str) -> Path:
    """A real tokenizer directory: ../shared/data/tokenizers/<family>, else tests/assets/tokenizers/<family>."""
    for base in (SHARED_DATA / "tokenizers", ASSETS / "tokenizers"):
        if any((base / family / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            return base / family  # (tests/assets/tokenizers/qwen3 holds only a template: tests/qwen3.py)
    pytest.skip(f"tokenizer {family!r} needs ../shared/data (not in tests/assets)")


def config_path(family: str) -> Path:
    """A real architecture config: ../shared/data/configs/<family>.json, else tests/assets/configs/."""
    for base in (SHARED_DATA / "configs", ASSETS / "configs"):
        if (base / f"{family}.json").is_file():
            return base / f"{family}.json"
    pytest.skip(f"config {family!r} needs ../shared/data (not in tests/assets)")


def shared_file(relative: str) -> Path:
    """A file under ../shared/data; skips the test on a clone without ../shared."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{relative}")
    return path


requires_shared = pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared/data beside the checkout")


def tiny_chat_recipe(root: Path, words: tuple[str, ...], train: dict) -> Path:
    """A recipe for a 1-layer GPT-2 (ChatML added) learning to repeat a colour ("Say red." -> "red"),
    with `train` as its train section; returns the recipe's path (model and data beside it)."""
    import json

    import yaml

    from sftkit.checkpoint import save_tiny_model

    model_dir = save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), root / "tiny-gpt2",
                                layers=1, hidden=32, heads=2, intermediate=64)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": w}]}) + "\n" for w in words))
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": str(data), "template": "chatml"},
        "train": train,
    }))
    return path
