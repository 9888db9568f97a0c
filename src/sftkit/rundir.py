"""One run per output_dir: a new run never writes over another, a resume continues the same run.

    sftkit train configs/tiny-cpu.yaml                      # refused if output_dir holds a run already
    sftkit train --overwrite configs/tiny-cpu.yaml          # clears that run's files first
    sftkit train runs/tiny/sftkit_config.yaml train.resume=true   # the same run, from its last checkpoint

A directory holds a run when it has any of `RUN_FILES`. Training into it is refused unless the user
says which of two things they mean: `--overwrite` (the old run's files are removed; other files are
left alone) or `train.resume=true`, which must name the same run (the same config, but for the keys in
`RESUMABLE`: where to run and how often to log, evaluate and save) and one that has not finished
(`final/` written): "already finished at step N; nothing to do".
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from sftkit.checkpoint import metrics_upto
from sftkit.config import CONFIG_FILE, Config, ConfigError
from sftkit.faults import STOPPED_FILE
from sftkit.runlog import METRICS_FILE

RUN_FILES = (CONFIG_FILE, METRICS_FILE, "tb", "loss.png", "checkpoints", "final", "best", STOPPED_FILE,
             "report.html", "trackio", "mlflow", "wandb")
# keys a resumed run may change: they decide where and how it runs, not what it trains
RESUMABLE = {
    "output_dir", "train.resume", "train.max_steps", "train.epochs", "train.batch_size", "train.grad_accum",
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.on_nan",
    "train.sample_prompt", "train.sample_max_new_tokens", "train.eval_max_batches", "train.eval_every_epoch",
    "train.keep_best", "train.early_stopping_patience", "train.device", "train.gradient_checkpointing",
    "train.compile", "train.strategy", "train.mixed_precision", "train.cpu_offload", "data.num_proc",
    "data.fast_bpe", "train.report_to",
}


class RunExistsError(ConfigError):
    """output_dir holds another run, or not the run a resume asked for."""


def prepare(config: Config, overwrite: bool = False, is_main: bool = True) -> Path | None:
    """Check that training `config` into its output_dir mixes no runs; clear the old run on `overwrite`.

    Returns the run's `final/` when a resume finds it finished (nothing to do), else None.
    Under torchrun every rank checks; only the main one (`is_main`) removes files.
    """
    out, resume = Path(config.output_dir), config.train.resume
    if overwrite and resume:
        raise ConfigError("--overwrite and train.resume=true: choose one (start over, or continue the run)")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if not held:
        return None
    if overwrite:
        if is_main:
            for name in held:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            print(f"--overwrite: removed the previous run's {', '.join(held)} from {out}")
        return None
    step = last_step(out)
    if not resume:
        state = f"finished at step {step}" if (out / "final").is_dir() else (
            f"stopped at step {step}" if step else "started, no step logged")
        raise RunExistsError(
            f"output_dir: {out} already holds a run ({state}). Pass --overwrite to replace it, "
            f"train.resume=true to continue it, or choose another output_dir=")
    changed = config_changes(out, config)
    if changed:
        raise RunExistsError(
            f"train.resume: the run in {out} was made with another config ({'; '.join(changed)}). Resume it "
            f"with the same config (`sftkit train {out / CONFIG_FILE} train.resume=true`), or start a new "
            f"run (another output_dir=, or --overwrite)")
    if (out / "final").is_dir():
        print(f"train.resume: the run in {out} already finished at step {step} ({out / 'final'}); nothing to do. "
              f"To train it further, start a new run from it: model.path={out / 'final'} output_dir=NEW_DIR")
        return out / "final"
    if is_main:
        (out / STOPPED_FILE).unlink(missing_ok=True)
    return None


def last_step(out: Path) -> int:
    """The last optimizer step the run in `out` logged (0 when it logged none; a torn last line is skipped)."""
    metrics = out / METRICS_FILE
    return max((row["step"] for row in metrics_upto(metrics, sys.maxsize)), default=0) if metrics.is_file() else 0


def config_changes(out: Path, config: Config) -> list[str]:
    """`key: old -> new` for every key that differs from the run's saved config, but the RESUMABLE ones."""
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file():
        return []  # a run killed before it saved its config: nothing to compare with
    saved, now = _flat(yaml.safe_load(saved_file.read_text()) or {}), _flat(config.to_dict())
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(saved) | set(now))
            if key not in RESUMABLE and saved.get(key) != now.get(key)]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("model", "data", "train", "lora", "eval"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
