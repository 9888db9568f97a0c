"""Faults a run must survive: SIGTERM/SIGINT, NaN/inf, an unwritable output_dir, a disk that fills up.

Signals are sent to a real `python -m sftkit train` process; the NaN runs poison the embedding output
of one training forward pass through the real command; disk failures are simulated where root would
write anyway (tests run as root, for whom chmod does not stop writes).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sftkit.train as train_module
from sftkit import checkpoint as ckpt
from sftkit import faults
from sftkit.checkpoint import latest_checkpoint, verify_checkpoint
from sftkit.cli import main
from sftkit.faults import (
    NanGuard,
    NumericalFault,
    OutputNotWritable,
    StopSignals,
    check_output_dir,
    gradient_norm,
)
from tests.conftest import tiny_chat_recipe

WORDS = ("red", "green", "blue", "yellow", "black", "white")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    return tiny_chat_recipe(root, WORDS, {"max_steps": 5, "batch_size": 2, "lr": 1e-3, "log_every": 1,
                                          "save_every": 2, "device": "cpu", "sample_max_new_tokens": 2})


# -- SIGTERM / SIGINT ---------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(recipe: Path, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "sftkit", "train", str(recipe), f"output_dir={out}", "train.max_steps=1000",
               "train.save_every=0"]  # no periodic checkpoints: the one left is the stop's
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() or (out / "metrics.jsonl").read_text().count("\n") < 2:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
            time.sleep(0.01)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + sig, stderr[-2000:]  # 143 for SIGTERM, 130 for SIGINT
    saved = latest_checkpoint(out)
    assert saved is not None and verify_checkpoint(saved) is None
    step = int(saved.name.split("-")[1])
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step {step}; checkpoint {saved}" in stderr
    assert "sftkit train CONFIG [your overrides] train.resume=true" in stderr
    assert f"sftkit train {out / 'sftkit_config.yaml'} train.resume=true" in stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step and not (out / "final").exists()


def test_second_ctrl_c_quits_at_once_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


# -- NaN / inf ----------------------------------------------------------------------------------
def poison_forward(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    """The `at_call`-th training forward pass gets NaN embeddings (eval and generation are not counted)."""
    real = train_module.setup_model

    def setup(*args: object, **kwargs: object):  # noqa: ANN202
        model, *rest = real(*args, **kwargs)
        calls = {"n": 0}

        def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor | None:
            if not module.training:
                return None
            calls["n"] += 1
            return output * float("nan") if calls["n"] == at_call else None

        model.get_input_embeddings().register_forward_hook(hook)
        return (model, *rest)

    monkeypatch.setattr(train_module, "setup_model", setup)


def test_nan_stops_with_step_records_and_last_checkpoint(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    poison_forward(monkeypatch, at_call=3)
    assert main(["train", str(recipe), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    print(err[err.index("sftkit: error"):])
    assert "sftkit: error: step 3: the loss is nan on a batch of 2 record(s): " in err
    assert err.count("train.jsonl:") >= 2  # the batch's records, as file:line
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step-2'}" in err
    assert "train.on_nan=skip" in err
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_nan_skip_counts_the_batch_and_trains_on(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    poison_forward(monkeypatch, at_call=3)
    assert main(["train", str(recipe), f"output_dir={tmp_path}", "train.on_nan=skip"]) == 0
    captured = capsys.readouterr()
    assert "step 3: the loss is nan" in captured.err and "batch skipped" in captured.err
    assert "skipped 1 batch(es) with a NaN/inf loss or gradient (train.on_nan=skip): steps 3" in captured.out
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["loss"] == 0.0 and rows[2]["nan_skipped"] == 1 and rows[-1]["nan_skipped"] == 1
    assert rows[2]["tokens"] == rows[1]["tokens"]  # the skipped batch trained no token
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "final" / "model.safetensors").values())
    state = json.loads((tmp_path / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["nan_skipped"] == [3]  # a resumed run keeps counting


def test_nan_guard_and_gradient_norm() -> None:
    guard = NanGuard("skip")
    assert guard.check(1, 2.5, 0.3, ["a.jsonl:1"], None)
    assert not guard.check(2, 2.5, float("inf"), ["a.jsonl:2"], None) and guard.skipped == [2]
    sources = [f"a.jsonl:{i}" for i in range(20)]
    with pytest.raises(NumericalFault, match=r"step 7: the loss is nan .* a.jsonl:7 and 12 more\nno checkpoint"):
        NanGuard("stop").check(7, float("nan"), 1.0, sources, None)

    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(4, 3)).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    norm = gradient_norm(layer.parameters(), None)
    assert norm == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item())
    assert all(torch.equal(p.grad, g) for p, g in zip(layer.parameters(), grads))  # unclipped: untouched
    assert gradient_norm(layer.parameters(), 1e-3) == pytest.approx(norm)  # the norm before clipping
    layer.weight.grad[0, 0] = float("nan")
    assert gradient_norm(layer.parameters(), 1.0) != gradient_norm(layer.parameters(), 1.0)  # nan


# -- disk -----------------------------------------------------------------------------------------
def test_output_dir_under_a_file_fails_before_training(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    assert main(["train", str(recipe), f"output_dir={blocker / 'run'}"]) == 2
    captured = capsys.readouterr()
    assert f"sftkit: error: [Errno {errno.ENOTDIR}] output_dir {blocker / 'run'} cannot be written" in captured.err
    assert "nothing was trained" in captured.err and "pre-flight" not in captured.out


def test_output_dir_probe_is_really_written_and_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe is gone

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(faults.os, "fsync", no_space)
    with pytest.raises(OutputNotWritable, match="No space left on device") as caught:
        check_output_dir(tmp_path / "full")
    assert caught.value.errno == errno.ENOSPC and list((tmp_path / "full").iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputNotWritable, match="Permission denied"):
            check_output_dir(locked / "run")
    finally:
        locked.chmod(0o700)


def test_disk_full_at_a_checkpoint_stops_with_a_clear_error(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = ckpt.write_training_state
    calls = {"n": 0}

    def fills_up(directory: Path, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint: half an optimizer.pt, then ENOSPC
            (directory / "optimizer.pt").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(directory, *args)

    monkeypatch.setattr(ckpt, "write_training_state", fills_up)
    assert main(["train", str(recipe), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    step2, step4 = tmp_path / "checkpoints" / "step-2", tmp_path / "checkpoints" / "step-4"
    assert f"could not write checkpoint {step4} (the disk is full)" in err
    assert f"the previous checkpoint {step2} is intact" in err and "train.resume=true" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]
    assert latest_checkpoint(tmp_path) == step2
