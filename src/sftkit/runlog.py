"""What a run reports: metrics.jsonl, the trackers, loss.png, report.html, and the summary printed before step 0.

    sftkit train configs/tiny-cpu.yaml      # output_dir/metrics.jsonl, tb/, loss.png, report.html
    sftkit train configs/tiny-cpu.yaml 'train.report_to=[tensorboard,trackio,mlflow,wandb]'

One line of metrics.jsonl per logged step (`step`, `epoch`, `loss`, `lr`, `grad_norm` (before
clipping), `tokens`, `tokens_per_s`, `input_tokens_per_s`, `elapsed_s` (training time of the whole
run, across resumes), `peak_mem_gb` (the accelerator's peak allocation, else the process's peak
resident memory); at evaluations `eval_loss`, `eval_ppl`, `sample` and the monitor's figures).
Every row goes to metrics.jsonl first, then to each tracker of `train.report_to` (`sftkit.trackers`:
TensorBoard by default; Trackio, MLflow, W&B offline). One TensorBoard stream per run: a resumed run
purges what the stopped one logged after its checkpoint, so no step appears twice. Under torchrun
only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from sftkit import trackers
from sftkit.config import Config
from sftkit.data.load import Split
from sftkit.model import count_parameters

METRICS_FILE = "metrics.jsonl"


class RunLog:
    """metrics.jsonl + the trackers + the loss curve; everything `train` reports goes here.

    Made first thing in `train.setup`: a tracker whose library is missing is refused before any data
    or weights are read. The trackers are opened on the first record (the resolved config is written by then).
    """

    def __init__(self, output_dir: Path, enabled: bool = True, report_to: list[str] | tuple[str, ...] = ("tensorboard",)
                 ) -> None:
        self.dir = output_dir
        self.metrics_file = output_dir / METRICS_FILE
        self.enabled = enabled  # under torchrun: rank 0 only
        self.report_to = list(report_to)
        trackers.check(self.report_to)
        self.trackers: list[trackers.Tracker] | None = None
        self.purge_step: int | None = None  # a resumed run: TensorBoard events from this step on are stale

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.trackers is None:  # their libraries are imported and opened on the first record
            self.trackers = trackers.open_trackers(self.report_to, self.dir, self.purge_step)
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def history(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def close(self) -> Path:
        """Close the trackers and draw `loss.png` (train loss per logged step, eval loss as dots)."""
        if not self.enabled:
            return self.dir / "loss.png"
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for tracker in self.trackers or []:
            tracker.close()
        self.trackers = None
        rows = self.history()
        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / trained token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.dir / "loss.png", dpi=100)
        plt.close(fig)
        return self.dir / "loss.png"


def peak_memory_gb() -> float:
    """Peak memory of this process so far: the GPU's allocator peak under CUDA, else the peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)


def end_summary(history: list[dict[str, Any]], steps: int, tokens: int, seconds: float, final: Path) -> str:
    """The lines printed when a run ends: how long, how much, and where the loss went."""
    train = [r["loss"] for r in history if "loss" in r and "step" in r and r["step"] > 0]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    minutes, secs = divmod(round(seconds), 60)
    lines = [f"done        {steps} steps, {tokens:,} trained tokens in {minutes}m{secs:02d}s "
             f"(peak memory {peak_memory_gb():.2f} GB)"]
    if train:
        lines.append(f"train loss  {train[0]:.4f} -> {train[-1]:.4f} (first and last logged interval)")
    if evals:
        best = min(evals)
        lines.append(f"eval loss   {evals[0]:.4f} -> {evals[-1]:.4f}" + (
            f" (lowest {best:.4f})" if not math.isclose(best, evals[-1]) else ""))
    lines.append(f"try it      sftkit chat --model {final}")
    return "\n".join(lines)


def summary(config: Config, train: Split, evaluation: Split, model: PreTrainedModel, added: list[str],
            per_epoch: int, total: int, notes: list[str] = ()) -> str:
    """The run summary printed before step 0: model, data, steps, and what was left out and why."""
    trainable, params = count_parameters(model)
    tc = config.train
    lines = [
        f"model       {config.model.path}  ({model.config.model_type}, {model.dtype}, {model.device})",
        f"parameters  {trainable:,} trainable / {params:,} total",
        f"train       {len(train.examples)} examples, {train.report.trained_tokens:,} trained tokens "
        f"of {train.report.total_tokens:,}",
        f"eval        {len(evaluation.examples)} examples, {evaluation.report.trained_tokens:,} trained tokens",
        f"steps       {total} ({per_epoch}/epoch; batch {tc.batch_size} x accum {tc.grad_accum}; "
        f"warm-up {tc.warmup_steps(total)}; lr {tc.lr:g})",
    ]
    lines += [f"turns       {line.removeprefix('turns: ')}" for line in train.report.policy_lines()]
    if train.mixing:
        lines += [f"mixing      {line}" for line in train.mixing.splitlines()]
    for name, split in (("train", train), ("eval", evaluation)):
        for reason, n in split.left_out().items():
            lines.append(f"left out    {name}: {n} {reason}")
        for note, n in sorted(split.report.warnings.items()):
            lines.append(f"note        {name}: {note} x{n}")
    for name, split in (("train", train), ("eval", evaluation)):
        lines += [f"warning     {name}: {warning}" for warning in split.warnings]
    if added:
        lines.append(f"new tokens  {' '.join(added)} (embeddings resized, rows set to the mean)")
    lines += [f"note        {note}" for note in notes]
    return "\n".join(lines)
