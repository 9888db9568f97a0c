"""Files that are either whole or absent: a temporary name, fsync, one rename; manifests that prove it.

    with atomic_dir(Path("runs/x/final")) as tmp:    # write into final.tmp/; final/ is replaced in one rename
        ...
    verify_checkpoint(Path("runs/x/checkpoints/step-50"))   # None, or what is wrong with it

Used by `sftkit.checkpoint` (every model directory), `sftkit.export` and `sftkit data clean`, so no
command ever leaves a half-written model, checkpoint or dataset under the name a later command
would trust. Every path a run writes is checked to stay inside its `output_dir` (`under`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 1 << 20


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


# -- file modes ---------------------------------------------------------------------------------
def current_umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it even for an instant)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_modes(directory: Path) -> None:
    """Give every file under `directory` the mode `open()` gives a new file (0666 less the umask) and every
    folder the mode `mkdir` gives (0777 less the umask): libraries that write through a private temporary
    file (safetensors: 0600) would otherwise leave files that only their owner can read."""
    mask = current_umask()
    for path in directory.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


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


def verify_checkpoint(directory: Path, required: str = "trainer_state.json") -> str | None:
    """None when `directory` is complete and every file matches its manifest; else what is wrong."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return f"incomplete: no {MANIFEST}"
    except (OSError, ValueError) as err:
        return f"unreadable {MANIFEST}: {err}"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or required not in files:
        return f"unreadable {MANIFEST}: it lists no {required}"
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
    is given), and gets the mode a plain `open()` gives under the umask (`plain_modes`). If the body
    or the sync fails, `target.tmp` is removed and `target` is untouched.
    """
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        plain_modes(tmp)
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


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write; on success it is fsynced and renamed over `target`.

    The file gets the mode a plain `open(target, "w")` would leave: an existing target's own mode, else
    0666 less the umask (the kernel applies it as the file is created; mkstemp would give 0600)."""
    target = Path(target)
    temp = _new_file(target.parent, f".{target.name}.", ".tmp")
    try:
        yield temp
        if target.is_file():
            os.chmod(temp, stat.S_IMODE(target.stat().st_mode))
        with temp.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, target)
        fsync_dir(target.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _new_file(directory: Path, prefix: str, suffix: str) -> Path:
    """A new empty file with a name no one else holds, created with mode 0666 less the umask."""
    for _ in range(100):
        path = directory / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {directory}")
