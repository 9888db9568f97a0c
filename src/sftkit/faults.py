"""What a long run must survive besides a crash: stop signals, non-finite numbers, an unwritable disk.

    sftkit train configs/tiny-cpu.yaml                     # Ctrl-C or `kill PID` (SIGTERM): a checkpoint at
                                                           # the end of the optimizer step, the resume
                                                           # command printed and written to
                                                           # output_dir/STOPPED, exit status 130 / 143
    sftkit train configs/tiny-cpu.yaml 2>&1 | tee log      # the same when Ctrl-C also kills `tee`: output
                                                           # to a closed pipe is dropped, never an error
    sftkit train configs/tiny-cpu.yaml train.on_nan=skip   # skip (and count) a batch whose loss or gradient
                                                           # norm is NaN/inf instead of stopping the run

Used by `sftkit.train.train`: `check_output_dir` before anything is loaded (a probe file is created,
written, fsynced and removed), `low_disk_warning` once the model is known, `StopSignals` around the
run and `NanGuard.check` between the backward pass and the optimizer step. A SIGKILL cannot be
caught; `sftkit.checkpoint` makes sure it never leaves a checkpoint that resume would trust.

While `StopSignals` is active, sys.stdout and sys.stderr are `ClosedPipeSafe`: a write to a pipe
whose reader has gone (Ctrl-C kills `tee` too; `| head` has read enough) points that stream at
/dev/null instead of raising, so printing can never fail a save or change the exit status. The
signal handler itself prints through neither (a buffered write interrupted by a signal cannot be
re-entered): it writes one line straight to file descriptor 2.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shlex
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

import torch

from sftkit.config import CONFIG_FILE, TrainConfig
from sftkit.durable import atomic_file

MAX_SOURCES_SHOWN = 8
STOPPED_FILE = "STOPPED"
"""Written into output_dir when a signal stops a run: the step, the checkpoint and the command to resume."""


def resume_command(output_dir: str | Path, nproc: int = 1) -> str:
    """The command that resumes the run in `output_dir` (its resolved config holds every override)."""
    launcher = f"--nproc {nproc} " if nproc > 1 else ""
    return f"sftkit train {launcher}{shlex.quote(str(Path(output_dir) / CONFIG_FILE))} train.resume=true"


def resume_advice(output_dir: str | Path, nproc: int = 1) -> str:
    return (f"resume with `sftkit train CONFIG [your overrides] train.resume=true`, "
            f"e.g. `{resume_command(output_dir, nproc)}`")


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
    where Python cannot install signal handlers, only the output guard is installed (`ClosedPipeSafe`).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._streams: tuple[TextIO, TextIO] | None = None

    def __enter__(self) -> StopSignals:
        self._streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = ClosedPipeSafe.wrap(sys.stdout), ClosedPipeSafe.wrap(sys.stderr)
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._streams is not None:
            for stream in (sys.stdout, sys.stderr):  # what is still buffered, while a closed pipe is harmless
                stream.flush()
            sys.stdout, sys.stderr = self._streams
            self._streams = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        _write_fd(2, f"\n{signal.Signals(signum).name}: stopping at the end of this optimizer step, after a "
                     "checkpoint (Ctrl-C again quits at once, without one)\n")


def _write_fd(fd: int, text: str) -> None:
    """One unbuffered write that never raises: safe inside a signal handler and towards a closed pipe."""
    with contextlib.suppress(OSError):
        os.write(fd, text.encode("utf-8", "replace"))


class ClosedPipeSafe:
    """A text stream whose writes never fail because the reader of its pipe (or its terminal) has gone.

    The first write that meets EPIPE (or EIO, a terminal hung up) redirects the stream's file
    descriptor to /dev/null, so whatever is still buffered, and everything written after, is
    dropped quietly, here and in every other object holding the same stream (tqdm, logging).
    Everything else is the wrapped stream's own (`isatty`, `fileno`, `encoding`, ...).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    @classmethod
    def wrap(cls, stream: TextIO) -> TextIO:
        return stream if stream is None or isinstance(stream, cls) else cls(stream)  # type: ignore[return-value]

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            self._closed(err)
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            self._closed(err)

    def _closed(self, err: OSError) -> None:
        """Point the stream at /dev/null when its reader is gone; any other error is the caller's."""
        if err.errno not in (errno.EPIPE, errno.EIO):
            raise err
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):  # no descriptor (an in-memory stream): nothing more to silence
            return
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()  # the buffered text goes to /dev/null now

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def stop_training(stop: StopSignals, step: int, checkpoint: Path | None, output_dir: str | Path) -> NoReturn:
    """Say where the run stopped and how to resume it, then exit with 128 + signal (130 SIGINT, 143 SIGTERM).

    Called after the checkpoint is written. The resume command also goes to `output_dir/STOPPED`
    (the first rank's), so it survives a terminal or a pipe that is gone; printing never fails here.
    """
    signum = stop.signum if stop.signum is not None else signal.SIGTERM
    name = signal.Signals(signum).name
    world = int(os.environ.get("WORLD_SIZE", "1"))
    written = write_stopped(output_dir, name, step, checkpoint, world) if os.environ.get("RANK", "0") == "0" else None
    message = (f"stopped by {name} after step {step}; checkpoint {checkpoint}\n{resume_advice(output_dir, world)}"
               + (f"\n(also written to {written})" if written else ""))
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:  # outside StopSignals, stderr's reader may be gone: the exit status still says it
        pass
    raise TrainingStopped(signum, message)


def write_stopped(output_dir: str | Path, signal_name: str, step: int, checkpoint: Path | None,
                  nproc: int = 1) -> Path | None:
    """`output_dir/STOPPED`: the step, the checkpoint and the exact command to resume (absolute paths, so
    it runs from any directory); None when it cannot be written (the message on stderr still says it all)."""
    path = Path(output_dir) / STOPPED_FILE
    checkpoint_text = str(Path(checkpoint).resolve()) if checkpoint is not None else "none"
    text = (f"stopped by {signal_name} after step {step}\n"
            f"checkpoint: {checkpoint_text}\n"
            f"resume: {resume_command(Path(output_dir).resolve(), nproc)}\n")
    try:
        with atomic_file(path) as temp:
            temp.write_text(text)
    except OSError:
        return None
    return path


# -- numerical faults ---------------------------------------------------------------------------
class NumericalFault(RuntimeError):
    """A NaN/inf loss or gradient norm stopped the run (train.on_nan: stop); names the step and records."""


def gradient_norm(parameters: Any, max_norm: float | None) -> float:
    """The global gradient norm before clipping; gradients are clipped to `max_norm` when it is set.

    Without `max_norm` the gradients are multiplied by exactly 1.0 (unchanged), so the norm is
    measured the same way in both cases.
    """
    return float(gradient_norm_tensor(parameters, max_norm))


def gradient_norm_tensor(parameters: Any, max_norm: float | None) -> torch.Tensor:
    """`gradient_norm` as a 0-d tensor where the gradients are, not read back: the training step reads it
    with the loss, in its one read-back (a float here would wait for the whole backward pass)."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    limit = float("inf") if max_norm is None else max_norm
    norm = torch.nn.utils.clip_grad_norm_(grads, limit)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the DTensor's global value


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
