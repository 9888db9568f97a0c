"""Many processes with PyTorch's own engine: torchrun, DDP or FSDP2, data shards, sharded checkpoints.

    torchrun --nproc_per_node=4 -m sftkit train RECIPE.yaml train.strategy=fsdp    # 4 GPUs of one machine
    sftkit train --nproc 4 RECIPE.yaml train.strategy=fsdp                          # the same, torchrun started for you
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m sftkit train RECIPE.yaml

Process groups (NCCL on GPUs, gloo on CPU), `DistributedDataParallel`, FSDP2's `fully_shard` and
`torch.distributed.checkpoint` do all the work; nothing here reduces a gradient by hand. The
training loop (`sftkit.train`) calls the hooks of the object `setup` returns. Outside torchrun it
is `Local`, whose hooks are the single-process code itself, so one loop serves every case and a
single process never initialises anything distributed. docs/distributed.md has multi-node and
SLURM recipes.

One optimizer step on N ranks is the step one process makes with N times the batch:

    global window, batch_size x N per micro-batch      [ 7 2 9 0 | 4 1 8 5 ]   N=2, batch_size=2, grad_accum=2
    rank 0 takes the first 1/N of each micro-batch     [ 7 2 ]     [ 4 1 ]
    rank 1 the next                                    [ 9 0 ]     [ 8 5 ]
    loss on a rank = its token-loss sum x N / trained tokens of the whole window on all ranks (all_reduce)
    DDP / FSDP average the N ranks' gradients     ->   sum of every token loss / every trained token

The window is `sftkit.data.dataset.Batcher`'s, a pure function of (seed, step), so every rank
knows it without talking; packed rows are never split between ranks. A rank whose share of a short
last micro-batch is empty runs an idle batch (two padding tokens, nothing trained) so that the
collectives of the forward and backward still line up.

Checkpoints of a torchrun run hold the model and optimizer as `torch.distributed.checkpoint`
shards (`shards/`, keyed by the parameters' Hugging Face names; LoRA: the adapter only) beside
the usual files and a torch RNG state per rank; they resume on any number of ranks, one plain
process included, and a one-process checkpoint resumes on many. `final/` is one plain Hugging Face
directory, gathered and written by rank 0.
Only rank 0 prints, logs and writes files (other ranks' stdout goes to /dev/null; stderr stays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sftkit import checkpoint as ckpt
from sftkit.config import Config, ConfigError, TrainConfig
from sftkit.data.dataset import Batcher
from sftkit.data.render import IGNORE_INDEX
from sftkit.loss import token_loss_sum
from sftkit.model import DTYPES, resolve_device

SHARDS = "shards"  # torch.distributed.checkpoint directory inside checkpoints/step-N/
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def setup(train: TrainConfig) -> Local:
    """`Distributed` under torchrun (the process group is initialised here), else `Local`."""
    return Distributed(train) if launched() else Local(train)


def launch(nproc: int, argv: list[str]) -> int:
    """`sftkit train --nproc N ...`: run `torchrun --standalone --nproc_per_node=N -m sftkit train ...` here."""
    if launched():
        raise ConfigError("--nproc: this process is already one of torchrun's; leave --nproc out")
    if nproc < 1:
        raise ConfigError(f"--nproc: {nproc} must be at least 1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "sftkit", "train", *argv]
    print("launching   " + " ".join(command[1:]), flush=True)
    return subprocess.call(command)


def idle_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """Two padding tokens and no trained label: the model's collectives run, nothing is added (`TokenLoss`)."""
    return {"input_ids": torch.full((1, 2), pad_id, dtype=torch.long),
            "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((1, 2), dtype=torch.long)}


def shard(micro: list[list[int]], batcher: Batcher, rank: int, world: int) -> list[list[int]]:
    """Rank `rank`'s part of each micro-batch of a global window: a contiguous 1/`world` of its units
    (examples, or packed rows, which stay whole); empty when a micro-batch has fewer units than ranks."""
    parts = []
    for ids in micro:
        units = [list(unit) for _, unit in itertools.groupby(ids, key=batcher.row_of.__getitem__)]
        lo, hi = len(units) * rank // world, len(units) * (rank + 1) // world
        parts.append([i for unit in units[lo:hi] for i in unit])
    return parts


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the classes in transformers' `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"train.strategy=fsdp: no decoder layers found in {type(base).__name__} "
                          f"(_no_split_modules={sorted(names)}); use train.strategy=ddp")
    return layers


class TokenLoss(nn.Module):
    """`batch -> token_loss_sum(model, batch)` as one module. `sftkit.loss` calls the decoder and the head
    directly; wrapped in this, DDP's and FSDP's forward hooks (gradient sync, all-gathers) run around it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if bool((batch["labels"][:, 1:] != IGNORE_INDEX).any()):
            return token_loss_sum(self.model, batch)
        # an idle batch: one token goes through the same path as any other, times 0, so that every parameter
        # gets its (zero) gradient and the ranks' gradient reductions stay in step
        labels = batch["labels"].clone()
        labels[0, -1] = batch["input_ids"][0, -1]
        return token_loss_sum(self.model, {**batch, "labels": labels}) * 0.0


def _state_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kwargs)  # LoRA: the adapter; a full fine-tune: all


class Local:
    """One process: each hook is what `sftkit.train` does without torchrun (and nothing distributed starts)."""

    rank, world, is_main, launched = 0, 1, True, False

    def __init__(self, train: TrainConfig | None = None) -> None:
        self.device = resolve_device(train.device) if train else torch.device("cpu")  # LOCAL: no CUDA probe

    def __enter__(self) -> Local:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def describe(self, train: TrainConfig) -> str | None:
        """A line for the run summary."""
        return None

    def global_train(self, train: TrainConfig) -> TrainConfig:
        """The train config of the global batch (what the `Batcher` cuts windows with)."""
        return train

    def shard(self, micro: list[list[int]], batcher: Batcher) -> list[list[int]]:
        return micro

    def collate(self, batcher: Batcher, ids: list[int]) -> dict[str, torch.Tensor]:
        return batcher.collate(ids) if ids else idle_batch(batcher.pad_id)

    def wrap(self, model: nn.Module, config: Config) -> None:
        """DDP or FSDP around the model (in place for FSDP); nothing in one process."""

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_loss_sum(model, batch)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Around one micro-batch's forward and backward: gradients are reduced after the last one only."""
        return contextlib.nullcontext()

    def all_sum(self, values: list[Any]) -> list[Any]:
        """The sum of `values` over all ranks (ints stay ints)."""
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (stop signals: all ranks stop at the same step)."""
        return flag

    def whole_model(self, active: bool = True) -> contextlib.AbstractContextManager[None]:
        """Around evaluation and generation, which call the model itself: every rank enters it together."""
        return contextlib.nullcontext()

    def latest_checkpoint(self, output_dir: Path) -> Path | None:
        return ckpt.latest_checkpoint(output_dir)

    def weights_from(self, checkpoint: Path | None) -> Path | None:
        """Where `setup_model` loads weights from: the checkpoint's HF directory, or (sharded checkpoints)
        model.path, whose weights `load_training_state` then replaces with the shards."""
        return None if checkpoint is None or (checkpoint / SHARDS).is_dir() else checkpoint

    def save_checkpoint(self, output_dir: Path, **kwargs: Any) -> Path:
        return ckpt.save_checkpoint(output_dir, **kwargs)

    def load_training_state(self, checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler: Any, metrics_file: Path) -> dict[str, Any]:
        """Optimizer, scheduler, RNG and metrics (and, from shards, the weights) of `checkpoint`; its state.

        Any checkpoint on any number of ranks: shards are resharded to this run's layout; a one-process
        checkpoint's optimizer.pt is spread over the ranks (its weights were loaded by `setup_model`)."""
        sharded = (checkpoint / SHARDS).is_dir()
        if not sharded and not self.launched:
            return ckpt.load_training_state(checkpoint, optimizer, scheduler, metrics_file)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict, set_state_dict

        if sharded:
            model_state, optim_state = get_state_dict(model, optimizer, options=_state_options())
            shards = {"model": model_state, "optimizer": optim_state}
            load(shards, checkpoint_id=checkpoint / SHARDS)  # resharded to this run's ranks and layout
            set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"],
                           options=_state_options(strict=False))  # strict would want the frozen base too (LoRA)
        else:  # optimizer.pt numbers the parameters in the optimizer's order; DCP wants their names
            saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
            names = {id(p): name for name, p in model.named_parameters()}
            order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
            named = {"state": {order[i]: value for i, value in saved["state"].items()},
                     "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
            set_optimizer_state_dict(model, optimizer, named, options=_state_options(full_state_dict=True))
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
        state = json.loads((checkpoint / ckpt.STATE_FILE).read_text())
        own = checkpoint / f"rng-rank{self.rank}.pt"  # another rank count: rank 0's state
        rng = torch.load(own if self.rank and own.is_file() else checkpoint / "rng.pt", weights_only=True)
        ckpt.set_rng_state(state.pop("rng"), rng)
        if self.is_main:
            ckpt.restore_metrics(checkpoint, metrics_file, state["step"])
        return state

    def save_final(self, output_dir: Path, model: nn.Module, tokenizer: Any, eos_ids: list[int],
                   config: Config) -> Path:
        return ckpt.save_final(output_dir, model, tokenizer, eos_ids, config)


LOCAL = Local()


class Distributed(Local):
    """A rank started by torchrun: process group, DDP / FSDP2, shards of every window, sharded checkpoints."""

    launched = True

    def __init__(self, train: TrainConfig) -> None:
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.is_main = self.rank == 0
        self.strategy = train.strategy
        self.module: nn.Module | None = None
        requested = resolve_device(train.device)
        if requested.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo")
        if not self.is_main:  # one console: rank 0's; errors and warnings (stderr) from every rank
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None or issubclass(exc_type, SystemExit):  # after an error the other ranks may be gone
            dist.barrier()
            dist.destroy_process_group()

    def describe(self, train: TrainConfig) -> str:
        backend = dist.get_backend()
        extra = ""
        if self.strategy == "fsdp":
            extra = f", compute in {train.mixed_precision or 'model.dtype'}" + (
                ", CPU offload" if train.cpu_offload else "")
        return (f"processes   {self.world} ranks, {self.strategy} ({backend}, {self.device.type}{extra}); global batch "
                f"{train.batch_size * self.world * train.grad_accum} = {train.batch_size} per rank x "
                f"{self.world} ranks x accum {train.grad_accum}")

    def global_train(self, train: TrainConfig) -> TrainConfig:
        return dataclasses.replace(train, batch_size=train.batch_size * self.world)

    def shard(self, micro: list[list[int]], batcher: Batcher) -> list[list[int]]:
        return shard(micro, batcher, self.rank, self.world)

    def wrap(self, model: nn.Module, config: Config) -> None:
        train = config.train
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DistributedDataParallel(TokenLoss(model), device_ids=ids, forward_sync_buffers=False)
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if train.cpu_offload and self.device.type != "cuda":
            raise ConfigError("train.cpu_offload: offloads GPU memory to the CPU; this run is on the CPU already")
        compute = DTYPES.get(train.mixed_precision) if train.mixed_precision else None
        options: dict[str, Any] = {
            "mesh": init_device_mesh(self.device.type, (self.world,)),
            "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None),
        }
        if train.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, **options)
        self.module = fully_shard(TokenLoss(model), **options)  # the root: embeddings, final norm, head
        with torch.no_grad():  # FSDP initialises on the root's first forward, before anything calls a layer
            self.module({k: v.to(self.device) for k, v in idle_batch(0).items()})
        self.module.reshard()  # the root keeps its weights gathered after a forward: the optimizer wants the shards

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.module is not None, "wrap() the model first"
        return self.module(batch)

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        if self.strategy == "ddp":
            with contextlib.nullcontext() if last else self.module.no_sync():
                yield
        else:
            self.module.set_requires_gradient_sync(last)
            yield

    def all_sum(self, values: list[Any]) -> list[Any]:
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return [int(s) if isinstance(v, int) else s for v, s in zip(values, total.tolist())]

    def any(self, flag: bool) -> bool:
        return self.all_sum([int(flag)])[0] > 0

    @contextlib.contextmanager
    def whole_model(self, active: bool = True) -> Iterator[None]:
        if not active or self.strategy != "fsdp":  # DDP: every rank holds the whole model already
            yield
            return
        self.module.unshard()  # the root's own parameters; each layer gathers its own when called
        try:
            yield
        finally:
            self.module.reshard()

    def latest_checkpoint(self, output_dir: Path) -> Path | None:
        found = [ckpt.latest_checkpoint(output_dir) if self.is_main else None]  # rank 0 verifies, once
        dist.broadcast_object_list(found, src=0)
        return found[0]

    def save_checkpoint(self, output_dir: Path, *, model: nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer,
                        scheduler: Any, config: Config, eos_ids: list[int], state: dict[str, Any],
                        metrics_file: Path, keep: int | None = None) -> Path:
        """`checkpoints/step-N/` as in `sftkit.checkpoint`, with model and optimizer as shards from every rank.

        Rank 0 makes `step-N.tmp/`; every rank writes its shards and RNG state into it; rank 0 adds the
        tokenizer, config and training state, the manifest, and renames it; every rank returns after that.
        """
        target = ckpt.checkpoint_dir(output_dir, state["step"])
        if not self.is_main:
            dist.barrier()  # step-N.tmp/ exists
            self._write_shards(target.with_name(target.name + ".tmp"), model, optimizer)
            dist.barrier()  # step-N/ is in place
            return target
        previous = ckpt.newest_step_dir(output_dir)
        try:
            with ckpt.atomic_dir(target, manifest={"step": state["step"], "world_size": self.world}) as tmp:
                dist.barrier()
                self._write_shards(tmp, model, optimizer)
                tokenizer.save_pretrained(tmp)
                config.dump(tmp / "config.yaml")
                ckpt.write_training_state(tmp, None, scheduler, state, metrics_file)
        except (OSError, RuntimeError) as err:
            raise ckpt.write_error(target, err, previous, output_dir) from err
        ckpt.prune_checkpoints(output_dir, keep)
        dist.barrier()
        return target

    def _write_shards(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.checkpoint import save
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer, options=_state_options())
        save({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory / SHARDS)  # collective
        if self.rank:  # rank 0's goes to rng.pt with the rest of the training state
            torch.save(ckpt.rng_state()[1], directory / f"rng-rank{self.rank}.pt")

    def save_final(self, output_dir: Path, model: nn.Module, tokenizer: Any, eos_ids: list[int],
                   config: Config) -> Path:
        """The whole model gathered to rank 0's CPU (a layer at a time) and written there as `final/`."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_state_options(full_state_dict=True, cpu_offload=True))
        if not hasattr(model, "get_base_model"):  # a tied head is saved once, as HF does (PEFT picks its own keys)
            every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
            for tied in every - {name for name, _ in model.named_parameters()}:
                full.pop(tied, None)
        target = ckpt.under(output_dir, "final")
        if self.is_main:
            ckpt.save_final(output_dir, model, tokenizer, eos_ids, config, state_dict=full)
        dist.barrier()
        return target
