"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 make the steps one process makes with the same global batch.

    .venv/bin/python -m pytest tests/test_distributed.py -s          # ~40 s on 2 CPU cores
    .venv/bin/python -m pytest tests/test_distributed.py -m slow -s  # LoRA, a failing rank, --nproc, 2->2, 1->2

Real processes through the real command: `python -m sftkit train` (one process, batch 4) beside
`torchrun --standalone --nproc_per_node=2 -m sftkit train` (two ranks, batch 2 each) with
train.strategy=ddp and =fsdp, on a tiny Qwen2-shaped model with tied embeddings. Nine conversations of
very different lengths: the ranks' trained-token counts differ in every step (a per-rank mean would
show), and the last window of each epoch holds one example, so one rank runs an idle batch.
Tolerance: every logged loss within 1e-4 of the single process's (fp32; the ranks only change the order
of the sums; measured: about 2e-6) and the final weights within 1e-3 (measured: up to 5e-5).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftkit import distributed
from sftkit.checkpoint import save_tiny_model
from sftkit.config import ConfigError, TrainConfig
from sftkit.data.batches import Batcher
from sftkit.data.render import Tokenized
from tests.conftest import config_path, tokenizer_dir

STEPS = 6  # 9 examples, global batch 4: windows of 4, 4, 1 -> 3 steps per epoch, 2 epochs
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-3  # a tenth of one step at lr 1e-2: Adam turns ~1e-7 gradient differences into up to 5e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
REPLIES = ["Yes.", "Paris is the capital of France.", "No", "Two plus two is four, and four plus four is eight.",
           "Blue.", "The quick brown fox jumps over the lazy dog, twice, and then it rests.", "OK",
           "Water boils at one hundred degrees at sea level.", "Seven."]


def single(recipe: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sftkit", "train", str(recipe), f"output_dir={out}", *overrides]


def torchrun(recipe: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sftkit",
            "train", str(recipe), f"output_dir={out}", *overrides]


def start(command: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
    with log.open("w") as output:
        return subprocess.Popen(command, env=ENV, stdout=output, stderr=subprocess.STDOUT), log


def finish(run: tuple[subprocess.Popen, Path], expect: int = 0) -> str:
    process, log = run
    process.wait(timeout=600)
    assert process.returncode == expect, log.read_text()[-4000:]
    return log.read_text()


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step logged once: rank 0 alone writes
    return [r["loss"] for r in rows]


def tokens(out: Path) -> list[int]:
    return [json.loads(line)["tokens"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_weight_difference(a: Path, b: Path, name: str = "model.safetensors") -> float:
    x, y = load_file(a / "final" / name), load_file(b / "final" / name)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    model_dir = save_tiny_model(config_path("qwen2"), tokenizer_dir("gpt2"), root / "tiny-qwen2", layers=2, hidden=64)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for i, reply in enumerate(REPLIES)))
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": str(data), "template": "chatml", "max_length": 64},
        "train": {"max_steps": STEPS, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "log_every": 1,
                  "device": "cpu", "sample_max_new_tokens": 2, "keep_checkpoints": None},
    }))
    return path


@pytest.fixture(scope="module")
def runs(recipe: Path) -> dict[str, Path]:
    """One process (batch 4), DDP and FSDP2 on 2 ranks (batch 2 each), then FSDP's step-3 checkpoint resumed
    in one plain process (2 ranks -> 1). Returns output_dir per run; prints the figures."""
    root = recipe.parent
    out = {name: root / name for name in ("single", "ddp", "fsdp", "resumed")}
    began = time.monotonic()
    started = [start(single(recipe, out["single"]), root / "single.log"),
               start(torchrun(recipe, out["ddp"], "train.batch_size=2", "train.strategy=ddp"), root / "ddp.log"),
               start(torchrun(recipe, out["fsdp"], "train.batch_size=2", "train.strategy=fsdp", "train.save_every=3"),
                     root / "fsdp.log")]
    logs = [finish(run) for run in started]
    (out["resumed"] / "checkpoints").mkdir(parents=True)
    shutil.copytree(out["fsdp"] / "checkpoints" / "step-3", out["resumed"] / "checkpoints" / "step-3")
    logs.append(finish(start(single(recipe, out["resumed"], "train.resume=true"), root / "resumed.log")))
    figures = {name: losses(path) for name, path in out.items()}
    print(f"\n4 runs in {time.monotonic() - began:.0f} s; loss per step:")
    for name, values in figures.items():
        gap = max(abs(a - b) for a, b in zip(values, figures["single"]))
        print(f"  {name:8} {' '.join(f'{v:.6f}' for v in values)}   max |diff| vs single {gap:.2e}")
    for name in ("ddp", "fsdp", "resumed"):
        print(f"  final weights {name:8} max |diff| vs single {max_weight_difference(out['single'], out[name]):.2e}")
    (root / "logs.json").write_text(json.dumps(dict(zip(out, logs))))
    return out


def test_ddp_and_fsdp_follow_the_single_process_trajectory(runs: dict[str, Path]) -> None:
    want = losses(runs["single"])
    assert want[-1] < want[0] - 0.5  # it learns: the comparison is not between flat lines
    for name in ("ddp", "fsdp"):
        got = losses(runs[name])
        assert got == pytest.approx(want, abs=LOSS_TOLERANCE), name
        assert max_weight_difference(runs["single"], runs[name]) < WEIGHT_TOLERANCE, name
        assert tokens(runs[name]) == tokens(runs["single"])  # the global count of trained tokens, all ranks


def test_only_rank_0_prints_and_writes(runs: dict[str, Path]) -> None:
    logs = json.loads((runs["single"].parent / "logs.json").read_text())
    for name in ("ddp", "fsdp"):
        assert logs[name].count("pre-flight  loss") == 1, name
        assert "processes   2 ranks, " + name in logs[name]
        assert "global batch 4 = 2 per rank x 2 ranks x accum 1" in logs[name]
        assert len(list((runs[name] / "tb").glob("events.out.tfevents.*"))) == 1
        assert (runs[name] / "loss.png").is_file() and (runs[name] / "final" / "model.safetensors").is_file()
    assert "processes" not in logs["single"]


def test_sharded_checkpoint_resumes_on_another_number_of_ranks(runs: dict[str, Path]) -> None:
    checkpoint = runs["fsdp"] / "checkpoints" / "step-3"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"shards", "rng.pt", "rng-rank1.pt", "scheduler.pt", "trainer_state.json", "checkpoint.json"} <= names
    assert not names & {"model.safetensors", "optimizer.pt"}  # the weights and AdamW's moments are the shards
    assert (checkpoint / "shards" / ".metadata").is_file()
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    assert manifest["world_size"] == 2 and any(name.startswith("shards/") for name in manifest["files"])
    # 2 ranks x batch 2 -> 1 plain process x batch 4: the same steps 4..6 as the uninterrupted FSDP run
    assert losses(runs["resumed"]) == pytest.approx(losses(runs["fsdp"]), abs=LOSS_TOLERANCE)
    assert max_weight_difference(runs["fsdp"], runs["resumed"]) < WEIGHT_TOLERANCE


# -- in one process ---------------------------------------------------------------------------------
def examples(lengths: list[int]) -> list[Tokenized]:
    return [Tokenized(list(range(n)), [-100] + list(range(1, n)), f"e{i}") for i, n in enumerate(lengths)]


def test_each_rank_takes_its_own_contiguous_part_of_every_micro_batch() -> None:
    batcher = Batcher(examples([3, 5, 2, 7, 4, 6, 3, 2, 5]), 0, batch_size=4, grad_accum=2, seed=0)
    for step in range(batcher.steps_per_epoch()):
        _, micro = batcher.window(step)
        parts = [batcher.shard(micro, rank, 2) for rank in (0, 1)]
        for i, ids in enumerate(micro):
            assert parts[0][i] + parts[1][i] == ids  # together: the whole micro-batch, in order, nothing twice
            assert abs(len(parts[0][i]) - len(parts[1][i])) <= 1
    _, last = batcher.window(1)  # 9 examples, windows of 8: the last holds one example
    assert [batcher.shard(last, r, 2) for r in (0, 1)] == [[[]], [last[0]]]  # rank 0 idles


def test_packed_rows_are_never_split_between_ranks() -> None:
    batcher = Batcher(examples([3, 5, 2, 7, 4, 6, 3, 2, 5, 8]), 0, batch_size=2, grad_accum=1, seed=0,
                      mode="packed", max_length=10)
    for step in range(batcher.steps_per_epoch()):
        _, micro = batcher.window(step)
        for rank in (0, 1):
            for ids in batcher.shard(micro, rank, 2):
                rows = {batcher.row_of[i] for i in ids}
                assert sorted(ids) == sorted(i for row in rows for i in batcher.units[row])  # whole rows only


def test_an_idle_batch_trains_nothing_yet_reaches_every_parameter() -> None:
    from transformers import AutoTokenizer

    from sftkit.data.batches import idle_batch
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.model import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("gpt2"))
    prepare_tokenizer(tokenizer, "chatml")
    model = build_tiny_model(config_path("qwen2"), tokenizer)
    loss = distributed.TokenLoss(model)(idle_batch(tokenizer.eos_token_id))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # DDP / FSDP hooks all fire


def test_strategy_options_are_checked() -> None:
    assert TrainConfig().strategy == "ddp"
    with pytest.raises(ConfigError, match="train.strategy"):
        TrainConfig(strategy="zero3")
    with pytest.raises(ConfigError, match="train.mixed_precision: applies to FSDP"):
        TrainConfig(mixed_precision="bfloat16")
    with pytest.raises(ConfigError, match="train.cpu_offload"):
        TrainConfig(cpu_offload=True)
    assert TrainConfig(strategy="fsdp", mixed_precision="bfloat16").mixed_precision == "bfloat16"


def test_one_process_never_starts_anything_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert type(distributed.setup(TrainConfig(device="cpu"))) is distributed.Local
    assert not torch.distributed.is_initialized()


# -- slow: LoRA, a failing rank, --nproc, 2 -> 2 ------------------------------------------------------
LORA = ("lora.enabled=true", "lora.r=4", "lora.dropout=0", "train.grad_accum=2")


@pytest.mark.slow
def test_lora_under_ddp_and_fsdp_with_accumulation(recipe: Path, tmp_path: Path) -> None:
    out = {name: tmp_path / name for name in ("single", "ddp", "fsdp")}
    finish(start(single(recipe, out["single"], *LORA, "train.batch_size=2"), tmp_path / "single.log"))
    for name in ("ddp", "fsdp"):
        finish(start(torchrun(recipe, out[name], *LORA, "train.batch_size=1", f"train.strategy={name}"),
                     tmp_path / f"{name}.log"))
        assert losses(out[name]) == pytest.approx(losses(out["single"]), abs=LOSS_TOLERANCE), name
        gap = max_weight_difference(out["single"], out[name], "adapter_model.safetensors")
        print(f"LoRA {name}: adapter max |diff| vs single {gap:.2e}")
        assert gap < 1e-3  # LoRA's B starts at 0: Adam's first steps amplify the ~1e-7 gradient differences


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_with_its_message(recipe: Path, tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"  # rank 1 cannot read its data; rank 0 goes on until it is stopped
    worker.write_text(
        "import os, sys\n"
        "import sftkit.train\n"
        "from sftkit.config import ConfigError\n"
        "from sftkit.cli import main\n"
        "if os.environ['RANK'] == '1':\n"
        "    def broken(*args, **kwargs):\n"
        "        raise ConfigError('data.train: rank 1 cannot read it')\n"
        "    sftkit.train.setup_data = broken\n"
        f"sys.exit(main(['train', {str(recipe)!r}, 'output_dir={tmp_path / 'out'}', 'train.batch_size=2']))\n")
    began = time.monotonic()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    log = finish(start(command, tmp_path / "failed.log"), expect=1)
    assert "[rank 1] sftkit: error: data.train: rank 1 cannot read it" in log
    assert "rank      : 1" in log.split("Root Cause")[1]  # torchrun names rank 1 as the first failure
    assert time.monotonic() - began < 120
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.slow
def test_nproc_shortcut_and_a_resume_on_as_many_ranks(recipe: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    command = [sys.executable, "-m", "sftkit", "train", "--nproc", "2", str(recipe), f"output_dir={first}",
               "train.batch_size=2", "train.strategy=fsdp", "train.save_every=2"]
    log = finish(start(command, tmp_path / "first.log"))
    assert "launching   -m torch.distributed.run --standalone --nproc_per_node=2" in log
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "step-4", again / "checkpoints" / "step-4")
    finish(start(torchrun(recipe, again, "train.batch_size=2", "train.strategy=fsdp", "train.resume=true"),
                 tmp_path / "again.log"))
    assert losses(again)[4:] == losses(first)[4:]  # same ranks, same layout: the same numbers
    assert max_weight_difference(first, again) == 0.0


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_ranks(recipe: Path, tmp_path: Path, runs: dict[str, Path]) -> None:
    first = tmp_path / "first"
    finish(start(single(recipe, first, "train.save_every=3"), tmp_path / "first.log"))
    assert (first / "checkpoints" / "step-3" / "optimizer.pt").is_file()  # a plain one-process checkpoint
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "step-3", again / "checkpoints" / "step-3")
    finish(start(torchrun(recipe, again, "train.batch_size=2", "train.strategy=fsdp", "train.resume=true"),
                 tmp_path / "again.log"))  # the HF weights loaded on every rank, optimizer.pt sharded
    assert losses(again) == pytest.approx(losses(runs["single"]), abs=LOSS_TOLERANCE)
    assert max_weight_difference(runs["single"], again) < WEIGHT_TOLERANCE


@pytest.mark.slow
def test_packed_rows_under_fsdp(recipe: Path, tmp_path: Path) -> None:
    packed = ("data.packing=true", "data.max_length=128")  # 9 examples -> 6 rows; batch_size counts rows
    finish(start(single(recipe, tmp_path / "single", *packed, "train.batch_size=2"), tmp_path / "single.log"))
    finish(start(torchrun(recipe, tmp_path / "fsdp", *packed, "train.batch_size=1", "train.strategy=fsdp"),
                 tmp_path / "fsdp.log"))
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), abs=LOSS_TOLERANCE)
