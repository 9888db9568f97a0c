"""Checkpoints are written atomically, hold everything a run needs, and `train.resume=true` continues.

The model is a tiny GPT-2 (dropout 0.1, so the resumed run also depends on the restored RNG) with
the gpt2 tokenizer and the built-in chatml template (new tokens, resized embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftkit.checkpoint import STATE_FILE, atomic_dir, latest_checkpoint
from sftkit.cli import main
from sftkit.config import load_config
from sftkit.model import save_tiny_model
from tests.conftest import config_path, tokenizer_dir

ROWS = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in ("red", "green", "blue", "yellow", "black", "white")]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    model_dir = save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), root / "tiny-gpt2")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": str(data), "template": "chatml"},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1, "save_every": 2, "device": "cpu",
                  "sample_max_new_tokens": 4},
    }))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_checkpoint_contents_and_resume(recipe: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    step2 = run / "checkpoints" / "step-2"
    assert latest_checkpoint(run) == step2
    assert not list((run / "checkpoints").glob("*.tmp")) and not (run / "checkpoints" / "step-4").exists()
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
                 "config.yaml", "optimizer.pt", "scheduler.pt", "rng.pt", "metrics.jsonl", STATE_FILE):
        assert (step2 / name).is_file(), name
    state = json.loads((step2 / STATE_FILE).read_text())
    # 6 examples, batch 2 -> 3 steps per epoch: after step 2 the next window is epoch 0, window 2
    assert state["step"] == 2 and state["data"] == {"seed": 0, "steps_per_epoch": 3, "epoch": 0, "window": 2}
    assert {"python", "numpy"} <= set(state["rng"])
    assert "<|im_start|>" in (step2 / "chat_template.jinja").read_text()
    assert load_config(step2 / "config.yaml").train.save_every == 2
    assert [m["step"] for m in metrics(step2)] == [1, 2]  # the metrics logged so far
    full = load_file(run / "final" / "model.safetensors")
    full_metrics = metrics(run)

    # interrupted after the step-2 checkpoint: no final/, metrics beyond step 2 never written
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    (step2).rename(resumed / "checkpoints" / "step-2")
    (resumed / "checkpoints" / "step-3.tmp").mkdir()  # a half-written checkpoint is ignored
    assert main(["train", str(recipe), f"output_dir={resumed}", "train.resume=true"]) == 0
    rows = metrics(resumed)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step count continues from the checkpoint
    assert rows[:2] == full_metrics[:2]
    assert [r["lr"] for r in rows] == [r["lr"] for r in full_metrics]  # scheduler state restored
    assert rows[-1]["tokens"] == full_metrics[-1]["tokens"]  # same data order after the resume
    for r, f in zip(rows[2:], full_metrics[2:]):
        assert r["loss"] == pytest.approx(f["loss"], rel=1e-5)
    again = load_file(resumed / "final" / "model.safetensors")
    for name, tensor in full.items():
        assert torch.equal(again[name], tensor), name  # bit-exact on the same machine


def test_resume_without_checkpoint_starts_fresh(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(recipe), f"output_dir={tmp_path}", "train.resume=true", "train.max_steps=1"]) == 0
    assert "no complete checkpoint" in capsys.readouterr().out
    assert [m["step"] for m in metrics(tmp_path)] == [1]


def test_atomic_dir_never_leaves_a_half_written_target(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "step-5"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed while writing")
    assert not target.exists() and latest_checkpoint(tmp_path) is None

    with atomic_dir(target) as tmp:
        (tmp / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path) == target

    with atomic_dir(target) as tmp:  # rewriting replaces the old directory as a whole
        (tmp / STATE_FILE).write_text('{"v": 2}')
    assert (target / STATE_FILE).read_text() == '{"v": 2}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-5"]
