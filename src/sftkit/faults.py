"""What a long run must survive besides a crash: stop signals, non-finite numbers, an unwritable disk.

    sftkit train configs/tiny-cpu.yaml                     # Ctrl-C or `kill PID` (SIGTERM): a checkpoint at
                                                           # the end of the optimizer step, the resume
                                                           # command printed, exit status 130 / 143
    sftkit train configs/tiny-cpu.yaml train.on_nan=skip   # skip (and count) a batch whose loss or gradient
                                                           # norm is NaN/inf instead of stopping the run

Used by `sftkit.train.train`: `check_output_dir` before anything is loaded (a probe file is created,
written, fsynced and removed), `low_disk_warning` once the model is known, `StopSignals` around the
run and `NanGuard.check` between the backward pass and the optimizer step. A SIGKILL cannot be
caught; `sftkit.checkpoint` makes sure it never leaves a checkpoint that resume would trust.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch

from sftkit.config import CONFIG_FILE, TrainConfig

MAX_SOURCES_SHOWN = 8


def resume_command(output_dir: str | Path) -> str:
    """The command that resumes the run in `output_dir` (its resolved config holds every override)."""
    return f"sftkit train {Path(output_dir) / CONFIG_FILE} train.resume=true"


def resume_advice(output_dir: str | Path) -> str:
    return (f"resume with `sftkit train CONFIG [your overrides] train.resume=true`, "
            f"e.g. `{resume_command(output_dir)}`")


# -- graceful stop ------------------------------------------------------------------------------
class TrainingStopped(SystemExit):
    """SIGINT/SIGTERM stopped the run after its checkpoint was written; exits with 128 + signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopSignals:
    """While active, SIGINT and SIGTERM ask the training loop to stop at the end of the optimizer step.

    The loop polls `requested`, writes a checkpoint and calls `stop_training`. A second SIGINT
    (Ctrl-C twice) raises KeyboardInterrupt at once, without a checkpoint. Outside the main thread,
    where Python cannot install signal handlers, it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping at the end of this optimizer step, after a checkpoint "
              "(Ctrl-C again quits at once, without one)", file=sys.stderr, flush=True)


def stop_training(stop: StopSignals, step: int, checkpoint: Path | None, output_dir: str | Path) -> NoReturn:
    """Print where the run stopped and how to resume it, then exit with 128 + signal (130 SIGINT, 143 SIGTERM)."""
    signum = stop.signum if stop.signum is not None else signal.SIGTERM
    name = signal.Signals(signum).name
    message = f"stopped by {name} after step {step}; checkpoint {checkpoint}\n{resume_advice(output_dir)}"
    print(message, file=sys.stderr, flush=True)
    raise TrainingStopped(signum, message)


# -- numerical faults ---------------------------------------------------------------------------
class NumericalFault(RuntimeError):
    """A NaN/inf loss or gradient norm stopped the run (train.on_nan: stop); names the step and records."""


def gradient_norm(parameters: Any, max_norm: float | None) -> float:
    """The global gradient norm before clipping; gradients are clipped to `max_norm` when it is set.

    Without `max_norm` the gradients are multiplied by exactly 1.0 (unchanged), so the norm is
    measured the same way in both cases.
    """
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    limit = float("inf") if max_norm is None else max_norm
    return float(torch.nn.utils.clip_grad_norm_(grads, limit))


def _describe(loss: float, grad_norm: float) -> str | None:
    """What is not finite, or None."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm} (loss {loss:.4f})"
    return None


def _sources(sources: list[str]) -> str:
    shown = ", ".join(sources[:MAX_SOURCES_SHOWN])
    more = len(sources) - MAX_SOURCES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


@dataclass
class NanGuard:
    """Checks each optimizer step's loss and gradient norm; `on_nan` decides between stopping and skipping."""

    on_nan: str = "stop"
    skipped: list[int] = field(default_factory=list)
    """Steps whose batch was skipped (train.on_nan: skip)."""

    def check(self, step: int, loss: float, grad_norm: float, sources: list[str], last_checkpoint: Path | None,
              output_dir: str | Path = ".") -> bool:
        """True when both are finite. Otherwise skip mode records the step and returns False (the caller
        zeroes the gradients and makes no optimizer step); stop mode raises `NumericalFault`."""
        problem = _describe(loss, grad_norm)
        if problem is None:
            return True
        where = f"step {step}: {problem} on a batch of {len(sources)} record(s): {_sources(sources)}"
        if self.on_nan == "skip":
            self.skipped.append(step)
            print(f"warning: {where}; batch skipped, no optimizer step (train.on_nan=skip; "
                  f"{len(self.skipped)} skipped so far)", file=sys.stderr, flush=True)
            return False
        if last_checkpoint is None:
            saved = "no checkpoint was written before it (set train.save_every to have one)"
        else:
            saved = f"the last good checkpoint is {last_checkpoint}; {resume_advice(output_dir)}"
        raise NumericalFault(
            f"{where}\n{saved}\nlook at those records, lower train.lr, set train.max_grad_norm, use a wider "
            "model.dtype, or skip such batches with train.on_nan=skip"
        )

    def summary(self) -> str | None:
        """One line about skipped batches, or None when nothing was skipped."""
        if not self.skipped:
            return None
        steps = ", ".join(map(str, self.skipped[:20])) + (" ..." if len(self.skipped) > 20 else "")
        return (f"skipped {len(self.skipped)} batch(es) with a NaN/inf loss or gradient (train.on_nan=skip): "
                f"steps {steps}")


# -- disk -----------------------------------------------------------------------------------------
class OutputNotWritable(OSError):
    """`output_dir` cannot be created or written; raised before anything is loaded or trained."""


def check_output_dir(path: str | Path) -> Path:
    """Create `path` and prove it can be written: a probe file is created, written, fsynced and removed."""
    directory = Path(path)
    probe = directory / f".sftkit-write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"sftkit write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):
            probe.unlink()
        reason = err.strerror or type(err).__name__
        where = f": {err.filename}" if err.filename else ""
        raise OutputNotWritable(
            err.errno or errno.EACCES,
            f"output_dir {directory} cannot be written ({reason}{where}); nothing was trained — "
            "choose another output_dir, or fix its permissions or free space",
        ) from err
    return directory


def checkpoint_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the saved weights, bytes of one resumable checkpoint: weights + AdamW's two fp32 moments)."""
    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    saved = weights if trainable == sum(p.numel() for p in unique) else trainable * 4  # adapters: trained rows only
    return weights, saved + 2 * 4 * trainable


def low_disk_warning(path: str | Path, model: torch.nn.Module, train: TrainConfig, total_steps: int) -> str | None:
    """A warning when the free space under `path` looks too small for the final model and the checkpoints kept."""
    weights, one_checkpoint = checkpoint_bytes(model)
    saves = total_steps // train.save_every if train.save_every else 0
    kept = saves if train.keep_checkpoints is None else min(saves, train.keep_checkpoints)
    needed = weights + (kept + 1 if saves else 0) * one_checkpoint  # +1: the one being written
    free = shutil.disk_usage(path).free
    if free >= needed:
        return None
    return (f"warning: {free / 2**30:.2f} GiB free under {path}, and this run may need about "
            f"{needed / 2**30:.2f} GiB (final model + {kept} checkpoint(s) of {one_checkpoint / 2**30:.2f} GiB, "
            "train.keep_checkpoints); a checkpoint that does not fit stops the run, the earlier ones stay intact")
