"""Stopping a run when its output goes nowhere: `sftkit train ... 2>&1 | tee log`, then Ctrl-C.

The terminal's Ctrl-C reaches `tee` too, so by the time the run reaches the end of its optimizer
step, the pipe it prints to has no reader. A real `python -m sftkit train` is started with stdout
or stderr on a pipe; the test closes the reading end (as the dead `tee` does), then sends SIGINT.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftkit.checkpoint import latest_checkpoint, verify_checkpoint
from sftkit.faults import STOPPED_FILE, ClosedPipeSafe, StopSignals
from tests.conftest import tiny_chat_recipe

WORDS = ("red", "green", "blue", "yellow", "black", "white")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stop")
    return tiny_chat_recipe(root, WORDS, {"max_steps": 100_000, "batch_size": 2, "lr": 1e-3, "log_every": 1,
                                          "save_every": 0, "device": "cpu", "sample_max_new_tokens": 2})


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_ctrl_c_with_a_closed_pipe_saves_and_writes_stopped(recipe: Path, tmp_path: Path, closed: str) -> None:
    out = tmp_path / "run"
    read_end, write_end = os.pipe()
    other = tmp_path / "other.txt"  # the stream that still works: a file, read after the run
    with other.open("w") as other_file:
        streams = {"stdout": write_end, "stderr": other_file} if closed == "stdout" else \
                  {"stdout": other_file, "stderr": write_end}
        process = subprocess.Popen([sys.executable, "-m", "sftkit", "train", str(recipe), f"output_dir={out}"],
                                   env=ENV, **streams)
        os.close(write_end)
        try:
            deadline = time.monotonic() + 300
            metrics = out / "metrics.jsonl"
            while not metrics.is_file() or metrics.read_text().count("\n") < 2:  # two optimizer steps done
                assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
                time.sleep(0.01)
            os.close(read_end)  # the reader goes away first, as `tee` does under the same Ctrl-C
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=120)
        finally:
            process.kill()
    said = other.read_text()
    assert returncode == 130, said[-2000:]
    assert "Broken pipe" not in said and "Traceback" not in said
    saved = latest_checkpoint(out)
    assert saved is not None and verify_checkpoint(saved) is None  # the stop's checkpoint, whole
    step = int(saved.name.split("-")[1])
    assert (out / STOPPED_FILE).read_text() == (
        f"stopped by SIGINT after step {step}\n"
        f"checkpoint: {saved.resolve()}\n"
        f"resume: sftkit train {out.resolve() / 'sftkit_config.yaml'} train.resume=true\n"
    )
    if closed == "stdout":  # stderr still reaches its reader: the same facts, and where they were written
        assert f"stopped by SIGINT after step {step}; checkpoint {saved}" in said
        assert f"(also written to {out / STOPPED_FILE})" in said
    assert not (out / "final").exists()


def test_a_write_to_a_pipe_without_reader_is_dropped_and_later_ones_too() -> None:
    read_end, write_end = os.pipe()
    stream = io.TextIOWrapper(io.FileIO(write_end, "w"), write_through=True)
    safe = ClosedPipeSafe(stream)
    safe.write("read\n")
    assert os.read(read_end, 100) == b"read\n"
    os.close(read_end)
    with pytest.raises(BrokenPipeError):  # the bare stream fails, as print() does under `| tee` after Ctrl-C
        stream.write("lost\n")
    safe.write("lost\n")  # no error: the descriptor now points at /dev/null
    print("also lost", file=safe, flush=True)
    assert os.readlink(f"/proc/self/fd/{write_end}") == os.devnull
    assert safe.isatty() is False and safe.fileno() == write_end  # the rest is the stream's own
    stream.close()


def test_other_write_errors_still_raise() -> None:
    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ClosedPipeSafe(Full()).write("x")


def test_stop_signals_guards_stdout_and_stderr_only_while_active() -> None:
    before = sys.stdout, sys.stderr
    with StopSignals():
        assert isinstance(sys.stdout, ClosedPipeSafe) and isinstance(sys.stderr, ClosedPipeSafe)
        with StopSignals():  # nested: wrapped once
            assert not isinstance(sys.stdout._stream, ClosedPipeSafe)  # type: ignore[attr-defined]
    assert (sys.stdout, sys.stderr) == before
