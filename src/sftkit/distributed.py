"""Many processes with PyTorch's own engine: torchrun, the process group, DDP or FSDP2, collectives.

    torchrun --nproc_per_node=4 -m sftkit train RECIPE.yaml train.strategy=fsdp    # 4 GPUs of one machine
    sftkit train --nproc 4 RECIPE.yaml train.strategy=fsdp                          # the same, torchrun started for you
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m sftkit train RECIPE.yaml

Process groups (NCCL on GPUs, gloo on CPU), `DistributedDataParallel`, FSDP2's `fully_shard` and
do all the work; nothing here reduces a gradient by hand. The training loop (`sftkit.train`) calls
the hooks of the object `setup` returns. Outside torchrun it is `Local`, whose hooks are the
single-process code itself, so one loop serves every case and a single process never initialises
anything distributed. docs/distributed.md has multi-node and SLURM recipes.

One optimizer step on N ranks is the step one process makes with N times the batch: each rank
takes its part of the window (`sftkit.data.batches.Batcher.shard`), and

    loss on a rank = its token-loss sum x N / trained tokens of the whole window on all ranks (all_sum)
    DDP / FSDP average the N ranks' gradients     ->   sum of every token loss / every trained token

Which rank writes which file of a checkpoint is `sftkit.checkpoint`'s; here are only the
collectives it uses (`barrier`, `broadcast`). Only rank 0 prints, logs and writes files (other
ranks' stdout goes to /dev/null; stderr stays).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sftkit.config import Config, ConfigError, TrainConfig
from sftkit.loss import LossBatch, token_loss_sum
from sftkit.model import TORCH_DTYPES, resolve_device

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

    def forward(self, batch: LossBatch, parts: dict[str, Any] | None = None) -> torch.Tensor:
        return token_loss_sum(self.model, batch, parts=parts, read_back=False)


def state_options(**kwargs: Any) -> Any:
    """torch.distributed.checkpoint's options for sftkit's model and optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kwargs)  # LoRA: the adapter; a full fine-tune: all


class Local:
    """One process: each hook is what `sftkit.train` does without torchrun (and nothing distributed starts)."""

    rank, world, is_main, launched, strategy = 0, 1, True, False, "ddp"

    def __init__(self, train: TrainConfig | None = None) -> None:
        self.device = resolve_device(train.device) if train else torch.device("cpu")  # LOCAL: no CUDA probe

    def __enter__(self) -> Local:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def describe(self, train: TrainConfig) -> str | None:
        """A line for the run summary."""
        return None

    def wrap(self, model: nn.Module, config: Config) -> None:
        """DDP or FSDP around the model (in place for FSDP); nothing in one process."""

    def loss_sum(self, model: nn.Module, batch: LossBatch, parts: dict[str, Any] | None = None) -> torch.Tensor:
        """The micro-batch's loss sum (`sftkit.loss.token_loss_sum`); `parts` get tensors, read back by the caller."""
        return token_loss_sum(model, batch, parts=parts, read_back=False)

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

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        return value


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

    def wrap(self, model: nn.Module, config: Config) -> None:
        train = config.train
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DistributedDataParallel(TokenLoss(model), device_ids=ids, forward_sync_buffers=False)
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            fully_shard,
        )

        if train.cpu_offload and self.device.type != "cuda":
            raise ConfigError("train.cpu_offload: offloads GPU memory to the CPU; this run is on the CPU already")
        compute = TORCH_DTYPES.get(train.mixed_precision) if train.mixed_precision else None
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
            self.module(_warm_up_batch(self.device))
        self.module.reshard()  # the root keeps its weights gathered after a forward: the optimizer wants the shards

    def loss_sum(self, model: nn.Module, batch: LossBatch, parts: dict[str, Any] | None = None) -> torch.Tensor:
        assert self.module is not None, "wrap() the model first"
        return self.module(batch, parts)

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

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _warm_up_batch(device: torch.device) -> dict[str, torch.Tensor]:
    """Two tokens, nothing trained: FSDP's first (lazy-initialising) forward before any real batch."""
    from sftkit.data.batches import idle_batch

    return {k: v.to(device) for k, v in idle_batch(0).items()}
