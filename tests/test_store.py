"""The token cache (sftkit.data.store): a hit maps what a miss rendered, every change of input misses,
damaged stores are never trusted, ranks share one cache, and training resumes exactly from it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from sftkit.config import DataConfig
from sftkit.data import load as load_module
from sftkit.data import store
from sftkit.data.load import load_data
from sftkit.data.templates import prepare_tokenizer
from tests.conftest import ASSETS, SHARED_DATA, requires_shared, tokenizer_dir

CHATS = ASSETS / "data" / "chat_messages.jsonl"


@pytest.fixture()
def tokenizer():
    tok = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    prepare_tokenizer(tok)
    return tok


@pytest.fixture()
def renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times `load_data` rendered into the cache (a miss) instead of mapping it (a hit)."""
    calls: list[int] = []
    real = load_module.stream_data

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(load_module, "stream_data", counting)
    return calls


def same(a, b) -> bool:
    return [(e.input_ids, e.labels, e.source) for e in a.examples] == [(e.input_ids, e.labels, e.source)
                                                                       for e in b.examples]


def config(tmp_path: Path, **changes) -> DataConfig:
    return DataConfig(**{"train": [str(CHATS)], "eval_fraction": 0.2, "cache_dir": str(tmp_path / "cache"),
                         **changes})


def test_a_hit_maps_exactly_what_a_miss_rendered(tmp_path: Path, tokenizer, renders: list[int]) -> None:
    plain = load_data(config(tmp_path, cache=False), tokenizer, seed=0)
    first = load_data(config(tmp_path), tokenizer, seed=0)
    second = load_data(config(tmp_path), tokenizer, seed=0)
    assert len(renders) == 1  # the first cached load; the second is a hit
    for split in range(2):
        assert same(plain[split], first[split]) and same(plain[split], second[split])
        assert isinstance(second[split].examples, store.StoredExamples)
        assert second[split].report.trained_tokens == plain[split].report.trained_tokens
        assert second[split].left_out() == plain[split].left_out()
        assert second[split].prompts == plain[split].prompts
    assert "token cache:" in second[0].summary()
    on_disk = sum(f.stat().st_size for f in next((tmp_path / "cache").glob("train-*")).iterdir()
                  if f.suffix == ".bin")
    assert on_disk == 5 * plain[0].report.total_tokens  # int32 id + one byte saying whether it is trained


CHANGES = {"template_kwargs": {"x": 1}, "max_length": 512, "strategy": "all", "format": "messages"}


@pytest.mark.parametrize("change", ["file", "tokenizer", "seed", *CHANGES])
def test_every_change_of_input_renders_anew(tmp_path: Path, tokenizer, renders: list[int], change: str) -> None:
    data = tmp_path / "chats.jsonl"
    shutil.copy(CHATS, data)
    base = config(tmp_path, train=[str(data)])
    load_data(base, tokenizer, seed=0)
    load_data(config(tmp_path, train=[str(data)], num_proc=2, fast_bpe=False, batching="packed"), tokenizer, seed=0)
    assert len(renders) == 1  # keys that change no token still hit
    seed = 0
    if change == "file":
        data.write_text(data.read_text().replace("\"content\": \"", "\"content\": \"Now: ", 1))
    elif change == "tokenizer":
        tokenizer.add_tokens(["<new-token>"])
    elif change == "seed":
        seed = 1  # another eval split
    else:
        base = config(tmp_path, train=[str(data)], **{change: CHANGES[change]})
    load_data(base, tokenizer, seed=seed)
    assert len(renders) == 2


@pytest.mark.parametrize("damage", ["truncated ids", "missing meta", "wrong version", "leftover temp dir"])
def test_damaged_stores_are_rendered_again_never_trusted(tmp_path: Path, tokenizer, renders: list[int],
                                                         damage: str) -> None:
    expected = load_data(config(tmp_path, cache=False), tokenizer, seed=0)
    load_data(config(tmp_path), tokenizer, seed=0)
    directory = next((tmp_path / "cache").glob("train-*"))
    if damage == "truncated ids":  # a killed write or a full disk
        with (directory / "ids.bin").open("r+b") as f:
            f.truncate(f.seek(0, 2) - 4)
    elif damage == "missing meta":
        (directory / "meta.json").unlink()
    elif damage == "wrong version":
        meta = json.loads((directory / "meta.json").read_text())
        (directory / "meta.json").write_text(json.dumps({**meta, "version": -1}))
    else:  # a render killed before its rename leaves only a hidden temporary directory
        shutil.rmtree(directory)
        (tmp_path / "cache" / f".{directory.name}.x").mkdir()
    again = load_data(config(tmp_path), tokenizer, seed=0)
    assert len(renders) == 2 and same(expected[0], again[0])
    assert store.read(directory) is not None  # rewritten whole


def _rank(rank: int, world: int, port: int, cache: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from sftkit import distributed
    from sftkit.config import Config, ModelConfig, TrainConfig
    from sftkit.data import load
    from sftkit.train import setup_data

    rendered = []
    real = load.stream_data
    load.stream_data = lambda *a, **k: rendered.append(1) or real(*a, **k)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    prepare_tokenizer(tok)
    run = Config(ModelConfig(path="unused"), DataConfig(train=[str(CHATS)], cache_dir=cache), TrainConfig(device="cpu"))
    with distributed.setup(run.train) as dist:
        train, _ = setup_data(run, tok, dist)
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"rendered": len(rendered), "ids": [e.input_ids for e in train.examples]}))


@pytest.mark.slow  # two spawned gloo processes
def test_two_ranks_share_one_cache_and_one_renders(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, str(tmp_path / "cache"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rendered"] for r in ranks] == [1, 0]  # rank 0 rendered, rank 1 mapped its files
    assert ranks[0]["ids"] == ranks[1]["ids"] and ranks[0]["ids"]


@requires_shared
@pytest.mark.shared
@pytest.mark.slow
def test_cached_examples_equal_the_in_memory_path_on_every_shared_file(tmp_path: Path, tokenizer) -> None:
    files = sorted(p for p in (SHARED_DATA / "instructions").iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
    assert files
    for path in files:
        options = {"train": [str(path)], "skip_invalid": True, "cache_dir": str(tmp_path / "cache")}
        try:
            plain = load_data(DataConfig(cache=False, **options), tokenizer, seed=0)
        except Exception as err:  # a file this config cannot train on fails the same way with the cache
            with pytest.raises(type(err)):
                load_data(DataConfig(**options), tokenizer, seed=0)
            continue
        assert same(plain[0], load_data(DataConfig(**options), tokenizer, seed=0)[0]), path
        assert same(plain[0], load_data(DataConfig(**options), tokenizer, seed=0)[0]), path


def test_cache_command_lists_and_clears(tmp_path: Path, tokenizer, capsys: pytest.CaptureFixture) -> None:
    from sftkit.cli import main

    load_data(config(tmp_path), tokenizer, seed=0)
    assert main(["data", "cache", "ls", "--dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert out.count("train-") == 1 and out.count("eval-") == 1 and "2 stores" in out
    assert main(["data", "cache", "clear", "--dir", str(tmp_path / "cache")]) == 0
    assert "cleared 2 stores" in capsys.readouterr().out
    assert store.list_cache(tmp_path / "cache") == []


# -- temporary directories of killed renders --------------------------------------------------------------
def _killed_render(*caches: Path) -> tuple[list[Path], int]:
    """A real process that starts a render (a `Writer` per cache, one example added and flushed), is
    SIGKILLed mid-way, and is reaped: (its temporary directories, its pid, now gone)."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from sftkit.data import store; "
            "from sftkit.data.render import Tokenized\n"
            "for cache in sys.argv[1:]:\n"
            "    w = store.Writer(Path(cache) / 'train-x'); w.add([Tokenized([1, 2, 3], [-100, 2, 3], 'a.jsonl:1')])\n"
            "    [f.flush() for f in w._files]; print(w.tmp, flush=True)\n"
            "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code, *map(str, caches)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parent.parent)
    try:
        temps = [Path(child.stdout.readline().strip()) for _ in caches]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return temps, child.pid


def test_a_killed_render_leaves_its_temporary_directory_and_the_next_writer_or_ls_removes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sftkit.cli import main

    first, second = tmp_path / "a", tmp_path / "b"
    (left_a, left_b), pid = _killed_render(first, second)
    for left, cache in ((left_a, first), (left_b, second)):
        assert left.parent == cache and left.name.startswith(f".train-x.{store.HOST}.{pid}.")
        assert sorted(f.name for f in left.iterdir()) == ["ids.bin", "sources.txt", "trained.bin"]
        assert (left / "ids.bin").stat().st_size == 12  # the render had begun
    live = first / f".train-y.{store.HOST}.{os.getpid()}.abcd1234"  # a render of this (live) process
    elsewhere = first / f".train-z.another-host.{pid}.abcd1234"  # the same pid on another host: not ours to judge
    unowned = first / ".train-w.k3j_x9ab"  # no owner in its name (an older sftkit's)
    for kept in (live, elsewhere, unowned):
        kept.mkdir()
        (kept / "ids.bin").write_bytes(b"\0" * 2**20)

    with store.Writer(first / "train-v") as writer:  # a new render removes the dead one's, and only it
        assert writer.tmp.name.startswith(f".train-v.{store.HOST}.{os.getpid()}.") and writer.tmp.is_dir()
        assert not left_a.exists() and live.is_dir() and elsewhere.is_dir() and unowned.is_dir()
    assert not writer.tmp.exists()

    assert left_b.is_dir()
    assert main(["data", "cache", "ls", "--dir", str(second)]) == 0
    assert not left_b.exists() and capsys.readouterr().out == f"0 stores, 0.0 MiB in {second}\n"

    for action in ("ls", "clear"):  # the others are listed with their size, never removed
        assert main(["data", "cache", action, "--dir", str(first)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1:] == [f"left: {unowned.name}  1.0 MiB  a render's temporary directory (no owner in its name)",
                           f"left: {live.name}  1.0 MiB  a render's temporary directory (pid {os.getpid()}, running)",
                           f"left: {elsewhere.name}  1.0 MiB  a render's temporary directory "
                           f"(host another-host, pid {pid})"]
        assert live.is_dir() and elsewhere.is_dir() and unowned.is_dir()
