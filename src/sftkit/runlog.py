"""What a run reports: metrics.jsonl, TensorBoard scalars, loss.png, and the summary printed before step 0.

    sftkit train configs/tiny-cpu.yaml      # output_dir/metrics.jsonl, tb/, loss.png

One line of metrics.jsonl per logged step (`step`, `epoch`, `loss`, `lr`, `tokens`, `tokens_per_s`,
`input_tokens_per_s`; at evaluations `eval_loss`, `eval_ppl`, `sample` and the monitor's figures).
Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from sftkit.config import Config
from sftkit.data.load import Split
from sftkit.model import count_parameters

METRICS_FILE = "metrics.jsonl"


class RunLog:
    """metrics.jsonl + TensorBoard scalars + the loss curve; everything `train` reports goes here."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.dir = output_dir
        self.metrics_file = output_dir / METRICS_FILE
        self.enabled = enabled  # under torchrun: rank 0 only
        self.tb: Any = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.tb is None:  # TensorBoard's writer is imported and opened on the first record
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"))
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key == "sample":
                self.tb.add_text("sample", value, record["step"])
            elif key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])

    def history(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def close(self) -> Path:
        """Flush TensorBoard and draw `loss.png` (train loss per logged step, eval loss as dots)."""
        if not self.enabled:
            return self.dir / "loss.png"
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.tb is not None:
            self.tb.close()
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


def summary(config: Config, train: Split, evaluation: Split, model: PreTrainedModel, added: list[str],
            per_epoch: int, total: int) -> str:
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
    if train.mixing:
        lines += [f"mixing      {line}" for line in train.mixing.splitlines()]
    for name, split in (("train", train), ("eval", evaluation)):
        for reason, n in split.left_out().items():
            lines.append(f"left out    {name}: {n} {reason}")
        for note, n in sorted(split.report.warnings.items()):
            lines.append(f"note        {name}: {note} x{n}")
    if added:
        lines.append(f"new tokens  {' '.join(added)} (embeddings resized, rows set to the mean)")
    return "\n".join(lines)
