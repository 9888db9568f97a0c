"""Kill `sftkit train` with SIGKILL at a random moment, resume it, and get the uninterrupted run bit for bit.

    .venv/bin/python -m pytest tests/test_resume_kill.py -s                          # a fresh random kill point
    SFTKIT_KILL_SEED=1234 .venv/bin/python -m pytest tests/test_resume_kill.py -s    # replay one

Three real processes (`python -m sftkit train`): an uninterrupted reference run; beside it, a run killed with
SIGKILL once metrics.jsonl has k lines plus a random delay (k and the delay come from a seeded RNG
whose seed is printed, so any failure can be replayed); and `train.resume=true` on the killed run's
directory. The kill can land in a forward pass, between a log line and a checkpoint, or in the middle
of writing a checkpoint; whatever it hits, every logged step's loss, lr and token count and every
final weight must equal the reference run's exactly (`==`, `torch.equal`) on CPU.

The model is a tiny GPT-2 (dropout 0.1: the resumed run also depends on the restored RNG states);
8 conversations, batch 2 -> 4 steps per epoch, 20 steps: the run crosses 4 epoch boundaries.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_chat_recipe

STEPS = 20
WORDS = ("red", "green", "blue", "yellow", "black", "white", "pink", "grey")
# one thread everywhere: the three processes must do the same floating-point operations in the same order
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kill")
    return tiny_chat_recipe(root, WORDS, {"max_steps": STEPS, "batch_size": 2, "lr": 3e-3, "warmup_ratio": 0.1,
                                          "log_every": 1, "save_every": 2, "keep_checkpoints": 2, "device": "cpu",
                                          "sample_max_new_tokens": 2})


def train_command(recipe: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sftkit", "train", str(recipe), f"output_dir={out}", *overrides]


def start(recipe: Path, out: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """A run in the background, its output going to files beside `out` (a pipe could fill up and block it)."""
    log = out.with_name(out.name + ".log")
    with log.open("w") as stdout, log.with_suffix(".err").open("w") as stderr:
        return subprocess.Popen(train_command(recipe, out, *overrides), env=ENV, stdout=stdout, stderr=stderr), log


def finish(run: tuple[subprocess.Popen, Path]) -> str:
    """Wait for a run that must succeed; its stdout."""
    process, log = run
    process.wait(timeout=300)
    assert process.returncode == 0, log.with_suffix(".err").read_text()[-3000:]
    return log.read_text()


def logged_steps(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_at(recipe: Path, out: Path, lines: int, delay: float) -> int:
    """Start a run, SIGKILL it once metrics.jsonl has `lines` lines and `delay` seconds passed; return its step."""
    process = subprocess.Popen(train_command(recipe, out), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while logged_steps(out) < lines:
            assert process.poll() is None, f"the run ended (rc {process.returncode}) before step {lines}"
            assert time.monotonic() < deadline, "the run is too slow"
            time.sleep(0.002)
        time.sleep(delay)
        reached = logged_steps(out)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return reached


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_a_random_step_then_resume_is_bit_exact(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("SFTKIT_KILL_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    lines, delay = rng.randint(1, STEPS - 2), rng.uniform(0.0, 0.3)
    note = f"SFTKIT_KILL_SEED={seed}: kill after {lines} logged steps + {delay:.3f} s"

    reference = start(recipe, tmp_path / "reference")  # runs beside the one that gets killed
    killed = tmp_path / "killed"
    try:
        reached = kill_at(recipe, killed, lines, delay)
    finally:
        finish(reference)
    left = sorted(p.name for p in (killed / "checkpoints").iterdir()) if (killed / "checkpoints").is_dir() else []
    with capsys.disabled():  # the seed and where the kill landed, in the output even without -s
        print(f"\n{note}: killed at step {reached}; left {left or 'no checkpoints'}", flush=True)

    stdout = finish(start(recipe, killed, "train.resume=true"))
    resumed_from = next((line for line in stdout.splitlines() if line.startswith(("resumed from", "train.resume"))),
                        "?")
    with capsys.disabled():
        print(f"{note}: {resumed_from}", flush=True)

    want, got = metrics(tmp_path / "reference"), metrics(killed)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), note  # no step missing, none twice
    for key in ("loss", "lr", "tokens", "epoch", "sample"):
        assert [r.get(key) for r in got] == [r.get(key) for r in want], f"{note}: {key} differs"
    final = load_file(killed / "final" / "model.safetensors")
    expected = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), f"{note}: {name} differs"
    assert not list(killed.rglob("*.tmp")), note
