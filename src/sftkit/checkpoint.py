"""Atomic, verified checkpoints and the final model directory, with everything needed to resume exactly.

    sftkit train configs/tiny-cpu.yaml train.save_every=50     # writes output_dir/checkpoints/step-50/ ...
    sftkit train configs/tiny-cpu.yaml train.resume=true       # continues from the latest good one

Layout of one checkpoint:

    checkpoints/step-N/
      config.json, model*.safetensors, generation_config.json   # a plain HF model directory (or the adapter)
      tokenizer*.json, chat_template.jinja                        # tokenizer with its chat template
      config.yaml                                                 # the resolved sftkit config
      optimizer.pt, scheduler.pt, rng.pt                          # optimizer/scheduler/torch (+CUDA) RNG state
      metrics.jsonl                                               # metrics logged up to step N
      trainer_state.json                                          # step, data position, python/numpy RNG, ...
      checkpoint.json                                             # manifest: step + sha256 of every file above

Under torchrun (sftkit.distributed) the model and optimizer are `shards/` of torch.distributed.checkpoint
instead of model*.safetensors and optimizer.pt, with one rng-rankR.pt per rank besides rank 0's rng.pt.

How a checkpoint is written, so that a crash, a kill or a full disk never leaves a directory that
resume would trust:

    step-N.tmp/  <- every file written, fsynced and hashed; checkpoint.json written last
    step-N.tmp/  -> step-N/   one rename, then the parent directory is fsynced
    older step-*/ beyond train.keep_checkpoints are removed only after that

On resume, `latest_checkpoint` takes the newest `step-N/` whose manifest is present and whose every
file matches its sha256; a damaged one is skipped with a warning naming it, and the previous one is
used. A write that fails (e.g. ENOSPC) removes its `.tmp` and raises `CheckpointWriteError`; the
previous checkpoints are untouched. Every path written is checked to stay inside `output_dir`.
Training state is loaded with `torch.load(weights_only=True)`: no pickle code runs on resume.

`output_dir/final/` is the same HF directory without the training state.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit.config import Config
from sftkit.lora import save_options

STATE_FILE = "trainer_state.json"
MANIFEST = "checkpoint.json"
METRICS_FILE = "metrics.jsonl"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^step-\d+\.(tmp|old)$")
_CHUNK = 1 << 20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, unwritable, ...); the previous ones are intact."""


class UnsafePathError(ValueError):
    """A path that would be written outside `output_dir`."""


# -- paths --------------------------------------------------------------------------------------
def under(output_dir: str | Path, *parts: str) -> Path:
    """`output_dir/parts...`, refusing absolute parts and `..` that would leave `output_dir`.

    The check is on the normalised path, not the resolved one: a symlink the user placed inside
    `output_dir` (e.g. checkpoints/ on another disk) is followed on purpose.
    """
    root = os.path.normpath(os.fspath(output_dir))
    for part in parts:
        if not part or os.path.isabs(part) or ".." in Path(part).parts or "\0" in part:
            raise UnsafePathError(f"refusing to write {part!r}: it must be a relative path inside {root}")
    path = os.path.normpath(os.path.join(root, *parts))
    if os.path.commonpath([root, path]) != root:
        raise UnsafePathError(f"refusing to write {path}: outside output_dir {root}")
    return Path(path)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """`output_dir/checkpoints/step-N` for a non-negative integer step."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UnsafePathError(f"a checkpoint step must be a non-negative integer, got {step!r}")
    return under(output_dir, "checkpoints", f"step-{step}")


# -- durable files ------------------------------------------------------------------------------
def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def file_sha256(path: Path, sync: bool = False) -> str:
    """The sha256 of `path`; with `sync`, the file is also fsynced to disk."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, info: dict[str, Any]) -> dict[str, Any]:
    """fsync every file of `directory` and record its sha256 and size in `checkpoint.json` (written last)."""
    files = {p.relative_to(directory).as_posix(): {"sha256": file_sha256(p, sync=True), "bytes": p.stat().st_size}
             for p in _files(directory)}
    manifest = {"format": 1, **info, "files": files}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    file_sha256(path, sync=True)
    for sub in sorted({p.parent for p in _files(directory)}, key=lambda p: -len(p.parts)):
        fsync_dir(sub)
    fsync_dir(directory)
    return manifest


def verify_checkpoint(directory: Path) -> str | None:
    """None when `directory` is complete and every file matches its manifest; else what is wrong."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return f"incomplete: no {MANIFEST}"
    except (OSError, ValueError) as err:
        return f"unreadable {MANIFEST}: {err}"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or STATE_FILE not in files:
        return f"unreadable {MANIFEST}: it lists no {STATE_FILE}"
    match = _STEP_DIR.match(directory.name)
    if match and manifest.get("step") != int(match.group(1)):
        return f"{MANIFEST} says step {manifest.get('step')!r}, the directory is {directory.name}"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name}: missing"
        same_size = isinstance(entry, dict) and path.stat().st_size == entry.get("bytes")
        if not same_size or file_sha256(path) != entry.get("sha256"):
            return f"{name}: checksum mismatch (the file changed or is damaged)"
    return None


@contextlib.contextmanager
def atomic_dir(target: Path, manifest: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield `target.tmp` to write into; on success it replaces `target` in one rename.

    Every file is fsynced first (and listed with its sha256 in `checkpoint.json` when `manifest`
    is given). If the body or the sync fails, `target.tmp` is removed and `target` is untouched.
    """
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if manifest is not None:
            write_manifest(tmp, manifest)
        else:
            for path in _files(tmp):
                file_sha256(path, sync=True)
            fsync_dir(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target` (an existing `target` goes to `target.old` first) and fsync the parent."""
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
        fsync_dir(target.parent)


# -- model directories --------------------------------------------------------------------------
def save_hf_dir(
    directory: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model (safetensors) + tokenizer with its chat template; generation stops at end of turn.

    `state_dict`: the weights to write instead of the model's own (FSDP's, gathered by sftkit.distributed)."""
    generation = model.generation_config
    existing = generation.eos_token_id
    existing = [] if existing is None else [existing] if isinstance(existing, int) else list(existing)
    generation.eos_token_id = list(dict.fromkeys(existing + list(eos_ids)))
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict, **save_options(model))
    generation.save_pretrained(directory)  # a PEFT adapter's save_pretrained leaves it out
    tokenizer.save_pretrained(directory)


def save_final(
    output_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int], config: Config,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """`output_dir/final/`: a plain Hugging Face directory, written atomically (`state_dict`: see save_hf_dir)."""
    target = under(output_dir, "final")
    with atomic_dir(target) as tmp:
        save_hf_dir(tmp, model, tokenizer, eos_ids, state_dict)
        config.dump(tmp / "sftkit_config.yaml")
    return target


# -- RNG ----------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON-able python/numpy RNG state, torch CPU and CUDA RNG tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, Any]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


# -- checkpoints --------------------------------------------------------------------------------
def write_training_state(
    directory: Path, optimizer: torch.optim.Optimizer | None, scheduler: Any, state: dict[str, Any],
    metrics_file: Path
) -> None:
    """optimizer.pt, scheduler.pt, rng.pt, metrics.jsonl (up to this step) and trainer_state.json.

    `optimizer` None: its state is elsewhere (the shards of sftkit.distributed)."""
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    plain_rng, torch_rng = rng_state()
    torch.save(torch_rng, directory / "rng.pt")
    if metrics_file.is_file():
        rows = metrics_upto(metrics_file, state["step"])
        (directory / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / STATE_FILE).write_text(json.dumps({**state, "rng": plain_rng}, indent=1))


def save_checkpoint(
    output_dir: Path,
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: Config,
    eos_ids: list[int],
    state: dict[str, Any],
    metrics_file: Path,
    keep: int | None = None,
) -> Path:
    """`output_dir/checkpoints/step-N/` for `state["step"] == N`, written atomically and verified on resume.

    `keep`: how many checkpoints to keep (the newest); older ones are removed after this one is in
    place. Raises `CheckpointWriteError` when it cannot be written; nothing of it is left behind.
    """
    step = state["step"]
    target = checkpoint_dir(output_dir, step)
    previous = newest_step_dir(output_dir)
    try:
        with atomic_dir(target, manifest={"step": step}) as tmp:
            save_hf_dir(tmp, model, tokenizer, eos_ids)
            config.dump(tmp / "config.yaml")
            write_training_state(tmp, optimizer, scheduler, state, metrics_file)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise write_error(target, err, previous, output_dir) from err
    prune_checkpoints(output_dir, keep)
    return target


def write_error(target: Path, err: BaseException, previous: Path | None, output_dir: Path) -> CheckpointWriteError:
    """A message that says what failed, that nothing half-written was kept, and how to go on."""
    code = getattr(err, "errno", None)
    full = code == errno.ENOSPC or "No space left" in str(err) or "file write failed" in str(err)
    reason = "the disk is full" if full else f"{type(err).__name__}: {err}"
    kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    advice = "free some disk space or lower train.keep_checkpoints" if full else "check output_dir"
    resume = f"sftkit train {Path(output_dir) / 'config.yaml'} train.resume=true"
    return CheckpointWriteError(
        code or errno.EIO,
        f"could not write checkpoint {target} ({reason}); its partial files were removed and {kept} — "
        f"{advice}, then resume with `{resume}`",
    )


def _step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `checkpoints/step-N/`, newest first (complete or not)."""
    root = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
             if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def newest_step_dir(output_dir: Path) -> Path | None:
    """The newest `step-N/` that has its manifest (not verified: for messages)."""
    return next((p for _, p in _step_dirs(output_dir) if (p / MANIFEST).is_file()), None)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoints/step-N/` whose files all match its manifest.

    `.tmp` leftovers and directories without a manifest are never taken; a damaged checkpoint is
    skipped with a warning that names it, and the one before it is used.
    """
    for _, path in _step_dirs(output_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if not problem.startswith("incomplete"):
            print(f"warning: skipping damaged checkpoint {path}: {problem}", file=sys.stderr, flush=True)
    return None


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Remove all but the `keep` newest complete checkpoints, and leftovers of interrupted writes."""
    root = Path(output_dir) / "checkpoints"
    removed = [p for p in (root.iterdir() if root.is_dir() else []) if _LEFTOVER.match(p.name)]
    complete = [p for _, p in _step_dirs(output_dir) if (p / MANIFEST).is_file()]
    if keep is not None:
        removed += complete[keep:]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# -- resume -------------------------------------------------------------------------------------
def metrics_upto(metrics_file: Path, step: int) -> list[dict[str, Any]]:
    """Rows of `metrics_file` logged at steps <= `step` (a torn last line is dropped)."""
    rows = []
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(row)
    return rows


def restore_metrics(checkpoint: Path, metrics_file: Path, step: int) -> int:
    """Make `metrics_file` hold exactly the rows up to `step` (from the checkpoint's copy); return their count.

    A run killed after logging step N+k but before checkpointing it would otherwise log those
    steps twice; a run resumed in a fresh output_dir gets the history it had.
    """
    source = checkpoint / METRICS_FILE
    rows = metrics_upto(source, step) if source.is_file() else []
    tmp = metrics_file.with_name(metrics_file.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, metrics_file)
    return len(rows)


def load_training_state(
    checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any, metrics_file: Path
) -> dict[str, Any]:
    """Restore optimizer, scheduler, RNG and metrics.jsonl from `checkpoint`; return its trainer state.

    The model weights are loaded by `sftkit.model.load_model(path=checkpoint)` before this.
    """
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    state = json.loads((checkpoint / STATE_FILE).read_text())
    set_rng_state(state.pop("rng"), torch.load(checkpoint / "rng.pt", weights_only=True))
    restore_metrics(checkpoint, metrics_file, state["step"])
    return state
