"""Recipes: every one in configs/ is valid, headed by its command and memory, with paths read from its own folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from sftkit.checkpoint import save_config
from sftkit.recipe import load_config
from tests.conftest import HAVE_SHARED

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def header(recipe: Path) -> str:
    """The comment lines before the first YAML key."""
    lines = recipe.read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid_headed_and_relative_to_itself(recipe: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # anywhere but the repository root
    config = load_config(recipe)
    raw = yaml.safe_load(recipe.read_text())
    here = lambda path: os.path.normpath(CONFIGS / path)

    assert f"sftkit train configs/{recipe.name}" in header(recipe)
    assert re.search(r"Memory: (~|under )\d", header(recipe)), "the header says the expected memory"
    assert "huggingface-cli" not in recipe.read_text()
    assert config.model.path == here(raw["model"]["path"])
    assert config.output_dir == here(raw["output_dir"])
    train = raw["data"]["train"]
    assert config.data.train == [here(p) for p in ([train] if isinstance(train, str) else train)]
    assert not os.path.isabs(raw["model"]["path"]) and not os.path.isabs(raw["output_dir"])  # the repo can move
    if "tiny" in recipe.name or HAVE_SHARED:
        assert all(Path(p).is_file() for p in config.data.train), config.data.train
    if not (Path(config.model.path).is_dir() or "tiny" in recipe.name):
        hint = re.search(r"hf download \S+ --local-dir (\S+)", header(recipe))
        assert hint, "a recipe for a hub model says how to download it with the hf CLI"
        assert os.path.normpath(CONFIGS.parent / hint.group(1)) == config.model.path


def test_recipes_cover_the_families_and_methods() -> None:
    configs = {p.name: load_config(p) for p in RECIPES}
    names = " ".join(configs)
    for family in ("llama3", "qwen2.5", "qwen3", "mistral", "gemma", "phi3"):
        assert family in names
    methods = {"qlora" if c.lora.quantize else "lora" if c.lora.enabled else "full" for c in configs.values()}
    assert methods == {"full", "lora", "qlora"}
    table = (CONFIGS / "README.md").read_text()
    assert all(f"`{name}`" in table for name in configs)


def test_paths_in_a_recipe_are_read_from_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = folder / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": "../models/m"},
        "data": {"train": ["a.jsonl", {"path": "sub/b.jsonl", "weight": 2}, "/abs/c.jsonl", "~/d.jsonl"],
                 "eval": "e.jsonl", "template": "t.jinja"},
        "eval": {"reference_data": "ref.txt"},
        "output_dir": "out",
    }))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(recipe)
    assert config.model.path == str(tmp_path / "models" / "m")
    assert config.data.train == [str(folder / "a.jsonl"), {"path": str(folder / "sub/b.jsonl"), "weight": 2},
                                 "/abs/c.jsonl", os.path.expanduser("~/d.jsonl")]
    assert config.data.eval == str(folder / "e.jsonl") and config.data.template == str(folder / "t.jinja")
    assert config.eval.reference_data == str(folder / "ref.txt") and config.output_dir == str(folder / "out")

    # overrides on the command line are read from the working directory; a built-in template is a name
    config = load_config(recipe, ["data.train=x.jsonl", "output_dir=runs/y", "data.template=chatml"])
    assert config.data.train == [str(elsewhere / "x.jsonl")] and config.output_dir == str(elsewhere / "runs/y")
    assert config.data.template == "chatml" and config.model.path == str(tmp_path / "models" / "m")


def test_the_run_config_written_beside_a_run_is_a_recipe_that_means_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sftkit train OUT/sftkit_config.yaml train.resume=true` must find the same files and the same OUT."""
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / "tiny-cpu.yaml", ["output_dir=runs/here", "data.eval_fraction=0.2"])
    saved = save_config(config, tmp_path / "runs" / "here" / "sftkit_config.yaml")
    monkeypatch.chdir(CONFIGS)
    assert load_config(saved) == config
