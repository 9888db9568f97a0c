"""Atomic checkpoints and the final model directory, with everything needed to resume or serve.

    sftkit train configs/tiny-cpu.yaml train.save_every=50     # writes output_dir/checkpoints/step-50/ ...
    sftkit train configs/tiny-cpu.yaml train.resume=true       # continues from the latest complete one

Layout of one checkpoint (written to `step-N.tmp/`, then renamed, so a crash never leaves a
half-written `step-N/`):

    checkpoints/step-N/
      config.json, model*.safetensors, generation_config.json   # a plain HF model directory
      tokenizer*.json, chat_template.jinja                        # tokenizer with its chat template
      config.yaml                                                 # the resolved sftkit config
      optimizer.pt, scheduler.pt, rng.pt                          # optimizer/scheduler/torch RNG state
      metrics.jsonl                                               # metrics logged up to step N
      trainer_state.json                                          # step, epoch, data position, python/numpy RNG

`output_dir/final/` is the same HF directory without the training state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit.config import Config
from sftkit.lora import save_options

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield `target.tmp` to write into; on success it replaces `target` in one rename."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def save_hf_dir(
    directory: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]
) -> None:
    """Model (safetensors) + tokenizer with its chat template; generation stops at end of turn."""
    generation = model.generation_config
    existing = generation.eos_token_id
    existing = [] if existing is None else [existing] if isinstance(existing, int) else list(existing)
    generation.eos_token_id = list(dict.fromkeys(existing + list(eos_ids)))
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    model.save_pretrained(directory, safe_serialization=True, **save_options(model))
    generation.save_pretrained(directory)  # a PEFT adapter's save_pretrained leaves it out
    tokenizer.save_pretrained(directory)


def save_final(
    output_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int], config: Config
) -> Path:
    """`output_dir/final/`: a plain Hugging Face directory, written atomically."""
    target = Path(output_dir) / "final"
    with atomic_dir(target) as tmp:
        save_hf_dir(tmp, model, tokenizer, eos_ids)
        config.dump(tmp / "sftkit_config.yaml")
    return target


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON-able python/numpy RNG state, torch RNG tensors)."""
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
) -> Path:
    """`output_dir/checkpoints/step-N/` for `state["step"] == N`, written atomically."""
    target = Path(output_dir) / "checkpoints" / f"step-{state['step']}"
    with atomic_dir(target) as tmp:
        save_hf_dir(tmp, model, tokenizer, eos_ids)
        config.dump(tmp / "config.yaml")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        plain_rng, torch_rng = rng_state()
        torch.save(torch_rng, tmp / "rng.pt")
        if metrics_file.is_file():
            shutil.copyfile(metrics_file, tmp / "metrics.jsonl")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "rng": plain_rng}, indent=1))
    return target


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete `checkpoints/step-N/` with the highest N (`.tmp` leftovers are ignored)."""
    root = Path(output_dir) / "checkpoints"
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


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
    if (checkpoint / "metrics.jsonl").is_file():
        shutil.copyfile(checkpoint / "metrics.jsonl", metrics_file)
    else:
        metrics_file.unlink(missing_ok=True)
    return state
