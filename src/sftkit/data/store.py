"""Rendered examples on disk, memory-mapped: the token cache that makes a second run start in seconds.

    sftkit train recipe.yaml                  # renders, then writes the split to the cache
    sftkit train recipe.yaml                  # the same inputs: maps it back, nothing rendered
    sftkit data cache ls | clear              # what is cached, and how big

One split is a directory holding `ids.bin` (int32 token ids, all examples end to end), `trained.bin`
(uint8, 1 where the token carries loss: a label is its token or -100), `offsets.npy` (int64, n+1),
`sources.txt` (one `file:line` per example) and `meta.json` (what rendering counted, a few sample
prompts, sizes). It is written as rendering goes (`Writer`: chunk by chunk, `sftkit.data.stream`)
into a temporary directory, fsynced and renamed, so a killed render leaves no store; a store whose
files do not match `meta.json` is treated as a miss and rewritten. The temporary directory is named
`.{store}.{host}.{pid}.{random suffix}` (tempfile.mkdtemp's): a render killed with SIGKILL leaves it
behind, and the next `Writer` or `sftkit data cache ls|clear` removes it once that process of this host
is gone (`sweep`).

The key is a hash of everything that changes the tokens: every data file's contents, the tokenizer
(its full serialisation, added tokens and chat template), the whole data config but the keys that
change no token (`num_proc`, `fast_bpe`, `batching`), the seed (it picks the eval split), the split's name and
`RENDER_VERSION` (raised when the renderer's output changes). The cache lives in `data.cache_dir`,
else $SFTKIT_CACHE_DIR, else ~/.cache/sftkit/tokens.

Written by hand rather than with `datasets`' Arrow cache: sftkit keys on the tokenizer's content,
not on a fingerprint of Python functions, stores labels as one byte per token, and maps the files
straight into the `Tokenized` examples the batcher reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftkit.config import DataConfig
from sftkit.data.render import IGNORE_INDEX, Tokenized

RENDER_VERSION = 1
NOT_TOKENS = ("num_proc", "fast_bpe", "cache", "cache_dir", "batching")  # data keys that never change a token
FILES = ("ids.bin", "trained.bin", "offsets.npy", "sources.txt", "meta.json")
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"  # no dot: names split on dots


def cache_root(cache_dir: str | None = None) -> Path:
    """`data.cache_dir`, else $SFTKIT_CACHE_DIR, else the user's cache directory."""
    chosen = cache_dir or os.environ.get("SFTKIT_CACHE_DIR")
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sftkit" / "tokens"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the tokenizer's ids: its full serialisation, its added tokens, its template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr(sorted(tokenizer.get_added_vocab().items())).encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(repr((tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)).encode())
    return digest.hexdigest()


def file_fingerprint(path: Path) -> str:
    """The contents of a data file (a directory or glob: every file it names), hashed."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.name).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def split_key(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, split: str,
              files: Sequence[Path]) -> str:
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_TOKENS}
    parts = {"version": RENDER_VERSION, "split": split, "seed": seed, "settings": settings,
             "tokenizer": tokenizer_fingerprint(tokenizer), "files": [file_fingerprint(f) for f in files]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class StoredExamples(Sequence[Tokenized]):
    """The examples of one stored split, mapped from disk: `Tokenized` objects are made on access, so
    memory holds the arrays' pages the batcher touches, not millions of Python lists."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ids = _mapped(directory / "ids.bin", np.int32)
        self.trained = _mapped(directory / "trained.bin", np.uint8)
        self.offsets = np.load(directory / "offsets.npy", mmap_mode="r")
        self._text = _mapped(directory / "sources.txt", np.uint8)
        self._starts: np.ndarray | None = None  # where each example's source begins in sources.txt

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.ids[start:end]
        labels = np.where(self.trained[start:end] == 1, ids, IGNORE_INDEX)
        return Tokenized(ids.tolist(), labels.tolist(), self.source(index))

    def __iter__(self) -> Iterator[Tokenized]:
        return (self[i] for i in range(len(self)))

    def source(self, index: int) -> str:
        """The `file:line` of example `index`, read from the mapped sources.txt: a list of a million
        strings would cost ~100 MB, the line starts 8 bytes an example."""
        if self._starts is None:
            breaks = np.flatnonzero(self._text == ord("\n"))
            self._starts = np.concatenate([[0], breaks + 1, [len(self._text) + 1]])
        return bytes(self._text[self._starts[index]:self._starts[index + 1] - 1]).decode("utf-8")

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def trained_tokens(self) -> int:
        return int(np.count_nonzero(self.trained))

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])


def _mapped(path: Path, dtype: type) -> np.ndarray:
    """The file as a read-only array (numpy cannot map an empty file: a split with no tokens)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


class Writer:
    """A store written as examples come (chunk by chunk, so no point holds the whole split), into a
    temporary directory that only `commit` renames to `directory`. Leaving the `with` block without a
    commit (an exception, a Ctrl-C) removes it: a store that exists was written whole. One killed outright
    (SIGKILL, out of memory) leaves `.{name}.{host}.{pid}.{random suffix}`, which the next Writer beside it
    removes (`sweep`) once that pid is gone.

        with Writer(directory) as writer:
            for chunk in chunks:
                writer.add(chunk)
            stored = writer.commit(meta)
    """

    def __init__(self, directory: Path) -> None:
        directory.parent.mkdir(parents=True, exist_ok=True)
        sweep(directory.parent)  # what killed renders of this host left
        self.directory = directory
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.{HOST}.{os.getpid()}.", dir=directory.parent))
        self.lengths = array("q")  # 8 bytes per example: the offsets, written at commit
        self._files = [(self.tmp / name).open("wb") for name in ("ids.bin", "trained.bin", "sources.txt")]

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files:
            f.close()
        if self.tmp.exists():  # not committed
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, examples: Sequence[Tokenized]) -> None:
        """Append `examples` (one at a time: no second copy of them in memory)."""
        ids, trained, sources = self._files
        for example in examples:
            row = np.asarray(example.input_ids, dtype=np.int32)
            mask = (np.asarray(example.labels) != IGNORE_INDEX).astype(np.uint8)
            ids.write(row.tobytes())
            trained.write(mask.tobytes())
            sources.write((("\n" if self.lengths else "") + example.source.replace("\n", " ")).encode("utf-8"))
            self.lengths.append(len(row))

    def commit(self, meta: dict[str, Any]) -> StoredExamples:
        """Finish the files, fsync them and rename the directory into place; the store, mapped."""
        for f in self._files:
            f.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.lengths, dtype=np.int64), out=offsets[1:])
        np.save(self.tmp / "offsets.npy", offsets)
        meta = {**meta, "examples": len(self.lengths), "tokens": int(offsets[-1]), "version": RENDER_VERSION}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for name in FILES:
            with (self.tmp / name).open("rb") as f:
                os.fsync(f.fileno())
        if self.directory.exists():  # a damaged store of the same key: replaced
            shutil.rmtree(self.directory)
        self.tmp.rename(self.directory)
        return StoredExamples(self.directory)


def read(directory: Path) -> tuple[StoredExamples, dict[str, Any]] | None:
    """The store at `directory` and its meta, or None when it is absent, partial or inconsistent."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("version") != RENDER_VERSION:
            return None
        stored = StoredExamples(directory)
        tokens, examples = meta["tokens"], meta["examples"]
        if (len(stored) != examples or int(stored.offsets[-1]) != tokens or stored.ids.shape[0] != tokens
                or stored.trained.shape[0] != tokens):
            return None
        return stored, meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def counters(meta: dict[str, Any], key: str) -> Counter[str]:
    return Counter(meta.get(key) or {})


def list_cache(root: Path) -> list[tuple[Path, dict[str, Any], int]]:
    """(directory, meta, bytes on disk) of every complete store under `root`, newest first."""
    found = []
    for directory in root.glob("*") if root.is_dir() else []:
        if (directory / "meta.json").is_file() and not directory.name.startswith("."):
            found.append((directory, json.loads((directory / "meta.json").read_text()), _size(directory)))
    return sorted(found, key=lambda item: item[0].stat().st_mtime, reverse=True)


def sweep(root: Path) -> list[tuple[Path, int, str]]:
    """Remove the temporary directories under `root` that renders of this host left when killed (their
    pid is gone); the ones left, as (directory, bytes, whose): another host's (on a shared filesystem
    its process may be running), a live process's, or one without an owner in its name."""
    left = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.name.startswith(".") or not path.is_dir():
            continue
        host, pid = _owner(path.name)
        if host == HOST and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                continue
            whose = f"pid {pid}, gone; could not be removed"
        elif host == HOST:
            whose = f"pid {pid}, running"
        else:
            whose = f"host {host}, pid {pid}" if host else "no owner in its name"
        left.append((path, _size(path), whose))
    return left


def _size(directory: Path) -> int:
    """Bytes of the files in `directory`, as far as they still exist (its render may finish meanwhile)."""
    total = 0
    try:
        for file in directory.rglob("*"):
            try:
                total += file.stat().st_size if file.is_file() else 0
            except OSError:
                continue
    except OSError:
        pass
    return total


def _owner(name: str) -> tuple[str | None, int]:
    """(host, pid) of a `Writer`'s temporary directory name `.{store}.{host}.{pid}.{random suffix}`, else (None, 0)."""
    parts = name.rsplit(".", 3)
    if len(parts) == 4 and parts[0] and parts[1] and parts[2].isdigit() and parts[2].isascii():
        return parts[1], int(parts[2])
    return None, 0


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (one of another user's counts)."""
    if pid <= 0:  # 0 or -1 would name a group of processes
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
