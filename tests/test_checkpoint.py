"""Checkpoints are written atomically, verified on resume, pruned to the last K, and resume is exact.

The model is a tiny GPT-2 (dropout 0.1, so the resumed run also depends on the restored RNG) with
the gpt2 tokenizer and the built-in chatml template (new tokens, resized embeddings).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftkit import checkpoint as ckpt
from sftkit.checkpoint import (
    MANIFEST,
    STATE_FILE,
    CheckpointWriteError,
    atomic_dir,
    latest_checkpoint,
    prune_checkpoints,
    restore_metrics,
    save_checkpoint,
    save_tiny_model,
    verify_checkpoint,
)
from sftkit.cli import main
from sftkit.recipe import load_config
from sftkit.durable import file_sha256
from sftkit.model import load_model
from sftkit.train import setup_optimizer
from tests.conftest import config_path, tokenizer_dir

ROWS = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in ("red", "green", "blue", "yellow", "black", "white")]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    model_dir = save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), root / "tiny-gpt2", hidden=32, heads=2)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": str(data), "template": "chatml"},
        # log every 2 steps, checkpoint every step: step 3's checkpoint falls inside a logging interval
        "train": {"max_steps": 5, "batch_size": 2, "lr": 1e-3, "log_every": 2, "save_every": 1,
                  "keep_checkpoints": 2, "device": "cpu", "sample_max_new_tokens": 4},
    }))
    return path


@pytest.fixture(scope="module")
def full_run(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    return run


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_checkpoint_contents_manifest_and_pruning(full_run: Path) -> None:
    # 5 steps, a checkpoint after each of steps 1-4 (step 5 is final/), only the newest 2 kept
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["step-3", "step-4"]
    step3 = full_run / "checkpoints" / "step-3"
    assert latest_checkpoint(full_run) == full_run / "checkpoints" / "step-4"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
                 "sftkit_config.yaml", "optimizer.pt", "scheduler.pt", "rng.pt", "metrics.jsonl", STATE_FILE, MANIFEST):
        assert (step3 / name).is_file(), name
    manifest = json.loads((step3 / MANIFEST).read_text())
    assert manifest["step"] == 3
    on_disk = {p.name for p in step3.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert manifest["files"]["model.safetensors"]["sha256"] == file_sha256(step3 / "model.safetensors")
    assert verify_checkpoint(step3) is None

    state = json.loads((step3 / STATE_FILE).read_text())
    # 6 examples, batch 2 -> 3 steps per epoch: after step 3 the next window is epoch 1, window 0
    assert state["step"] == 3
    assert state["data"] == {"seed": 0, "steps_per_epoch": 3, "epoch": 1, "window": 0, "micro_batch": 0, "world": 1}
    assert {"python", "numpy"} <= set(state["rng"]) and set(torch.load(step3 / "rng.pt")) >= {"torch"}
    assert state["interval"]["trained"] > 0  # step 3's loss, not logged yet (log_every=2), travels along
    assert "<|im_start|>" in (step3 / "chat_template.jinja").read_text()
    assert load_config(step3 / "sftkit_config.yaml").train.save_every == 1
    assert [m["step"] for m in metrics(step3)] == [2]  # the metrics logged so far
    assert not list(full_run.rglob("*.tmp")) and not list(full_run.rglob("*.old"))


def test_resume_is_exact_mid_interval(recipe: Path, full_run: Path, tmp_path: Path) -> None:
    """Resumed from step 3 (inside a logging interval) in a fresh directory: same curve, same weights."""
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    (resumed / "checkpoints" / "step-4.tmp").mkdir()  # a half-written checkpoint is ignored
    (resumed / "checkpoints" / "step-4").mkdir()  # so is one without its manifest
    (resumed / "checkpoints" / "step-4" / STATE_FILE).write_text("{}")
    assert main(["train", str(recipe), f"output_dir={resumed}", "train.resume=true"]) == 0

    rows, full = metrics(resumed), metrics(full_run)
    assert [r["step"] for r in rows] == [r["step"] for r in full] == [2, 4, 5]
    for key in ("loss", "lr", "tokens", "epoch", "eval_loss", "sample"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in full], key  # bit-exact, not approx
    again = load_file(resumed / "final" / "model.safetensors")
    first = load_file(full_run / "final" / "model.safetensors")
    assert again.keys() == first.keys()
    for name, tensor in first.items():
        assert torch.equal(again[name], tensor), name


def test_resume_without_checkpoint_starts_fresh(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(recipe), f"output_dir={tmp_path}", "train.resume=true", "train.max_steps=1"]) == 0
    assert "no complete checkpoint" in capsys.readouterr().out
    assert [m["step"] for m in metrics(tmp_path)] == [1]


def test_damaged_checkpoint_is_skipped_with_a_warning(
    full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(full_run / "checkpoints", run / "checkpoints")
    newest = run / "checkpoints" / "step-4"
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (newest / "optimizer.pt").write_bytes(bytes(data))
    assert "optimizer.pt: checksum mismatch" in verify_checkpoint(newest)
    assert latest_checkpoint(run) == run / "checkpoints" / "step-3"
    assert f"skipping damaged checkpoint {newest}" in capsys.readouterr().err

    (run / "checkpoints" / "step-3" / "rng.pt").unlink()
    assert latest_checkpoint(run) is None
    assert "rng.pt: missing" in capsys.readouterr().err


def test_atomic_dir_never_leaves_a_half_written_target(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "step-5"
    with pytest.raises(RuntimeError):
        with atomic_dir(target, manifest={"step": 5}) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed while writing")
    assert not target.exists() and not target.with_name("step-5.tmp").exists()
    assert latest_checkpoint(tmp_path) is None

    with atomic_dir(target, manifest={"step": 5}) as tmp:
        (tmp / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path) == target

    with atomic_dir(target, manifest={"step": 5}) as tmp:  # rewriting replaces the old directory as a whole
        (tmp / STATE_FILE).write_text('{"v": 2}')
    assert (target / STATE_FILE).read_text() == '{"v": 2}' and verify_checkpoint(target) is None
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-5"]


def fake_checkpoint(output_dir: Path, step: int, manifest: bool = True) -> Path:
    target = output_dir / "checkpoints" / f"step-{step}"
    with atomic_dir(target, manifest={"step": step} if manifest else None) as tmp:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
    return target


def test_prune_keeps_the_newest_complete_ones(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 5, manifest=False)  # incomplete: neither counted nor taken
    (tmp_path / "checkpoints" / "step-6.tmp").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3", "step-4", "step-5"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-4"
    prune_checkpoints(tmp_path, keep=None)  # null = keep every one
    assert latest_checkpoint(tmp_path).name == "step-4"


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path: Path) -> None:
    """Killed after logging steps 5-6 but before checkpointing them: resume must not log them twice."""
    checkpoint = tmp_path / "checkpoints" / "step-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4)))
    live = tmp_path / "metrics.jsonl"
    live.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    assert restore_metrics(checkpoint, live, step=4) == 2
    assert [json.loads(line)["step"] for line in live.read_text().splitlines()] == [2, 4]


@pytest.fixture()
def trainer_parts(recipe: Path) -> dict:
    config = load_config(recipe)
    model, tokenizer, _ = load_model(config.model, template="chatml", device=torch.device("cpu"))
    optimizer, scheduler = setup_optimizer(model, config.train, total_steps=5)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return {"model": model, "tokenizer": tokenizer, "optimizer": optimizer, "scheduler": scheduler,
            "config": config, "eos_ids": eos}


def test_disk_full_while_writing_keeps_the_previous_checkpoint(
    trainer_parts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics_file = tmp_path / "metrics.jsonl"
    first = save_checkpoint(tmp_path, state={"step": 1}, metrics_file=metrics_file, **trainer_parts)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def full_disk(directory: Path, *args: object) -> None:
        (directory / "optimizer.pt").write_bytes(b"\0" * 1000)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_training_state", full_disk)
    with pytest.raises(CheckpointWriteError) as caught:
        save_checkpoint(tmp_path, state={"step": 2}, metrics_file=metrics_file, keep=1, **trainer_parts)
    message = str(caught.value)
    print(message)
    assert caught.value.errno == errno.ENOSPC
    assert "the disk is full" in message and f"the previous checkpoint {first} is intact" in message
    assert "train.resume=true" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]  # no step-2, no .tmp
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert latest_checkpoint(tmp_path) == first


def test_torch_save_failure_is_a_checkpoint_error(
    trainer_parts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save reports a full disk as RuntimeError("... file write failed"): same clear error."""
    def failing_save(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match="the disk is full.*there is no earlier checkpoint"):
        save_checkpoint(tmp_path, state={"step": 1}, metrics_file=tmp_path / "m.jsonl", **trainer_parts)
    assert list((tmp_path / "checkpoints").iterdir()) == []
