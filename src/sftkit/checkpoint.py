"""Every model directory a run writes or reads back: step-N (one process or sharded), final/, best/, resume.

    sftkit train configs/tiny-cpu.yaml train.save_every=50     # writes output_dir/checkpoints/step-50/ ...
    sftkit train configs/tiny-cpu.yaml train.resume=true       # continues from the latest good one

Layout of one checkpoint:

    checkpoints/step-N/
      config.json, model*.safetensors, generation_config.json   # a plain HF model directory (or the adapter)
      tokenizer*.json, chat_template.jinja                        # tokenizer with its chat template
      sftkit_config.yaml                                          # the resolved sftkit config
      optimizer.pt, scheduler.pt, rng.pt                          # optimizer/scheduler/torch (+CUDA) RNG state
      metrics.jsonl                                               # metrics logged up to step N
      trainer_state.json                                          # step, data position, python/numpy RNG, ...
      checkpoint.json                                             # manifest: step + sha256 of every file above

Under torchrun (`sftkit.distributed`) one function still writes it, knowing which rank writes what:
the model and optimizer are `shards/` of torch.distributed.checkpoint (every rank writes its own,
keyed by the parameters' Hugging Face names; LoRA: the adapter only) instead of model*.safetensors
and optimizer.pt, with one rng-rankR.pt per rank besides rank 0's rng.pt; rank 0 writes the rest.
Shards resume on any number of ranks, one plain process included, and a one-process checkpoint
resumes on many. `final/` and `best/` are plain Hugging Face directories (FSDP: gathered to rank 0
a layer at a time, written there).

Every directory is written to `NAME.tmp/`, fsynced, and renamed (`sftkit.durable`): a crash, a kill
or a full disk never leaves one that resume would trust. On resume, `latest_checkpoint` takes the
newest `step-N/` whose every file matches its manifest; a damaged one is skipped with a warning.
Training state is loaded with `torch.load(weights_only=True)`: no pickle code runs on resume.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit.config import CONFIG_FILE, Config
from sftkit.data.templates import pad_token_id
from sftkit.distributed import LOCAL, Local, state_options
from sftkit.durable import (
    MANIFEST,
    UnsafePathError,
    atomic_dir,
    atomic_file,
    under,
    verify_checkpoint,
)
from sftkit.lora import save_options
from sftkit.model import build_tiny_model, load_tokenizer
from sftkit.portable import add_adapter_usage, save_tokenizer
from sftkit.runlog import METRICS_FILE

STATE_FILE = "trainer_state.json"
SHARDS = "shards"  # torch.distributed.checkpoint directory inside checkpoints/step-N/
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^step-\d+\.(tmp|old)$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, unwritable, ...); the previous ones are intact."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """`output_dir/checkpoints/step-N` for a non-negative integer step."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UnsafePathError(f"a checkpoint step must be a non-negative integer, got {step!r}")
    return under(output_dir, "checkpoints", f"step-{step}")


# -- model directories --------------------------------------------------------------------------
def save_config(config: Config, path: Path) -> Path:
    """The resolved config as YAML, atomically: in the run directory and beside every model written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(config.to_yaml())
    return path


def save_hf_dir(
    directory: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model (safetensors) + tokenizer with its chat template; generation stops at end of turn.

    `state_dict`: the weights to write instead of the model's own (FSDP's, gathered by `_gathered`)."""
    generation = model.generation_config
    existing = generation.eos_token_id
    existing = [] if existing is None else [existing] if isinstance(existing, int) else list(existing)
    generation.eos_token_id = list(dict.fromkeys(existing + list(eos_ids)))
    if generation.pad_token_id is None:
        generation.pad_token_id = pad_token_id(tokenizer, eos_ids)
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict, **save_options(model))
    generation.save_pretrained(directory)  # a PEFT adapter's save_pretrained leaves it out
    save_tokenizer(tokenizer, directory)
    add_adapter_usage(directory)


def save_tiny_model(config_json: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, **shrink: Any) -> Path:
    """A tiny random model of a real architecture (`sftkit.model.build_tiny_model`) + the tokenizer, as a local
    HF directory `sftkit train` can load (`sftkit model tiny`)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_tiny_model(config_json, tokenizer, **shrink)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
    return out


def _gathered(model: torch.nn.Module, dist: Local) -> dict[str, torch.Tensor] | None:
    """Under FSDP the whole model's weights, gathered to rank 0's CPU a layer at a time (a collective:
    every rank calls it); else None (the model's own weights are written)."""
    if not dist.launched or dist.strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=state_options(full_state_dict=True, cpu_offload=True))
    if not hasattr(model, "get_base_model"):  # a tied head is saved once, as HF does (PEFT picks its own keys)
        every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        for tied in every - {name for name, _ in model.named_parameters()}:
            full.pop(tied, None)
    return full


def save_model(output_dir: str | Path, name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               eos_ids: list[int], config: Config, dist: Local = LOCAL,
               extra: dict[str, Any] | None = None) -> Path:
    """`output_dir/NAME/` (final/, best/): a plain Hugging Face directory with the resolved config and the
    `extra` JSON files given, written atomically by rank 0 while the other ranks wait."""
    target = under(output_dir, name)
    state_dict = _gathered(model, dist)
    if dist.is_main:
        with atomic_dir(target) as tmp:
            save_hf_dir(tmp, model, tokenizer, eos_ids, state_dict)
            save_config(config, tmp / CONFIG_FILE)
            for file, content in (extra or {}).items():
                (tmp / file).write_text(json.dumps(content))
    dist.barrier()
    return target


# -- RNG ----------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON-able python/numpy RNG state, torch CPU and CUDA RNG tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
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

    `optimizer` None: its state is in the shards."""
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    plain_rng, torch_rng = rng_state()
    torch.save(torch_rng, directory / "rng.pt")
    if metrics_file.is_file():
        rows = metrics_upto(metrics_file, state["step"])
        (directory / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / STATE_FILE).write_text(json.dumps({**state, "rng": plain_rng}, indent=1))


def _write_shards(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Every rank's shards of the model and optimizer (a collective), and its RNG state beside rank 0's."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=state_options())
    save({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory / SHARDS)
    if rank:  # rank 0's goes to rng.pt with the rest of the training state
        torch.save(rng_state()[1], directory / f"rng-rank{rank}.pt")


def save_checkpoint(
    output_dir: Path, *, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, optimizer: torch.optim.Optimizer,
    scheduler: Any, config: Config, eos_ids: list[int], state: dict[str, Any], metrics_file: Path,
    keep: int | None = None, dist: Local = LOCAL,
) -> Path:
    """`output_dir/checkpoints/step-N/` for `state["step"] == N`, written atomically and verified on resume.

    One process: the HF directory plus the training state. Under torchrun rank 0 makes `step-N.tmp/`,
    every rank writes its shards into it, rank 0 adds tokenizer, config, training state and manifest and
    renames it; every rank returns after that. `keep`: how many checkpoints to keep (the newest); older
    ones are removed once this one is in place. Raises `CheckpointWriteError` when it cannot be written;
    nothing of it is left behind.
    """
    step = state["step"]
    target = checkpoint_dir(output_dir, step)
    sharded = dist.launched
    if not dist.is_main:
        dist.barrier()  # step-N.tmp/ exists
        _write_shards(target.with_name(target.name + ".tmp"), model, optimizer, dist.rank)
        dist.barrier()  # step-N/ is in place
        return target
    previous = newest_step_dir(output_dir)
    manifest = {"step": step, "world_size": dist.world} if sharded else {"step": step}
    try:
        with atomic_dir(target, manifest=manifest) as tmp:
            if sharded:
                dist.barrier()
                _write_shards(tmp, model, optimizer, dist.rank)
                save_tokenizer(tokenizer, tmp)
            else:
                save_hf_dir(tmp, model, tokenizer, eos_ids)
            save_config(config, tmp / CONFIG_FILE)
            write_training_state(tmp, None if sharded else optimizer, scheduler, state, metrics_file)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise write_error(target, err, previous, output_dir) from err
    prune_checkpoints(output_dir, keep)
    dist.barrier()
    return target


def write_error(target: Path, err: BaseException, previous: Path | None, output_dir: Path) -> CheckpointWriteError:
    """A message that says what failed, that nothing half-written was kept, and how to go on."""
    code = getattr(err, "errno", None)
    full = code == errno.ENOSPC or "No space left" in str(err) or "file write failed" in str(err)
    reason = "the disk is full" if full else f"{type(err).__name__}: {err}"
    kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    advice = "free some disk space or lower train.keep_checkpoints" if full else "check output_dir"
    resume = f"sftkit train {Path(output_dir) / CONFIG_FILE} train.resume=true"
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


def latest_checkpoint(output_dir: Path, dist: Local = LOCAL) -> Path | None:
    """The newest complete `checkpoints/step-N/` whose files all match its manifest (rank 0 checks, once).

    `.tmp` leftovers and directories without a manifest are never taken; a damaged checkpoint is
    skipped with a warning that names it, and the one before it is used.
    """
    found = None
    if dist.is_main:
        for _, path in _step_dirs(output_dir):
            problem = verify_checkpoint(path, STATE_FILE)
            if problem is None:
                found = path
                break
            if not problem.startswith("incomplete"):
                print(f"warning: skipping damaged checkpoint {path}: {problem}", file=sys.stderr, flush=True)
    return dist.broadcast(found)


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
def weights_from(checkpoint: Path | None) -> Path | None:
    """Where the model loads its weights from when resuming: the checkpoint's HF directory, or (sharded
    checkpoints) model.path, whose weights `load_training_state` then replaces with the shards."""
    return None if checkpoint is None or (checkpoint / SHARDS).is_dir() else checkpoint


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


def load_training_state(checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any, metrics_file: Path,
                        model: torch.nn.Module | None = None, dist: Local = LOCAL) -> dict[str, Any]:
    """Optimizer, scheduler, RNG and metrics (and, from shards, the weights) of `checkpoint`; its state.

    Any checkpoint on any number of ranks: shards are resharded to this run's layout; a one-process
    checkpoint's optimizer.pt is spread over the ranks (its weights were loaded with the model, from
    `weights_from`)."""
    sharded = (checkpoint / SHARDS).is_dir()
    if sharded or dist.launched:
        _load_distributed(checkpoint, model, optimizer, sharded)
    else:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    state = json.loads((checkpoint / STATE_FILE).read_text())
    own = checkpoint / f"rng-rank{dist.rank}.pt"  # another rank count: rank 0's state
    rng = torch.load(own if dist.rank and own.is_file() else checkpoint / "rng.pt", weights_only=True)
    set_rng_state(state.pop("rng"), rng)
    if dist.is_main:
        restore_metrics(checkpoint, metrics_file, state["step"])
    return state


def _load_distributed(checkpoint: Path, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                      sharded: bool) -> None:
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import (
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    assert model is not None, "a sharded or multi-rank resume needs the model"
    if sharded:
        model_state, optim_state = get_state_dict(model, optimizer, options=state_options())
        shards = {"model": model_state, "optimizer": optim_state}
        load(shards, checkpoint_id=checkpoint / SHARDS)  # resharded to this run's ranks and layout
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"],
                       options=state_options(strict=False))  # strict would want the frozen base too (LoRA)
        return
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # numbered in the optimizer's order
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {"state": {order[i]: value for i, value in saved["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=state_options(full_state_dict=True))
