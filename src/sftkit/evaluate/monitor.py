"""Watch a run while it trains: forgetting (reference perplexity) and overfitting (best eval loss, early stop).

    sftkit train RECIPE.yaml eval.reference_data=reference.txt eval.forgetting_tolerance=0.2
    sftkit train RECIPE.yaml train.eval_every_epoch=true train.keep_best=true train.early_stopping_patience=2

Forgetting: `eval.reference_data` is plain text the model should keep knowing, read as training
text is (`sftkit.data.formats`, format `text`: a .txt file's documents separated by `---` lines, a
.md file, or {"text"} rows). Every token of it is scored, without any chat template, in windows of
`data.max_length` tokens (`sftkit.data.render.text_windows`). Its perplexity is measured once before
training (the base model: a `step 0` row of metrics.jsonl) and at every evaluation
(`reference_ppl`, and `reference_rise` = ppl / base ppl - 1, shown in the progress bar as `ref_ppl`);
a rise above `eval.forgetting_tolerance` prints a warning.

Overfitting: with `train.keep_best` the model of the lowest eval loss so far is written to
`output_dir/best/` (a plain HF directory, written to best.tmp/ then renamed, with best.json naming
its step and eval loss); with `train.early_stopping_patience: N` training stops after N evaluations in
a row without a lower eval loss, and final/ is the model at that point (best/ the best one).
`train.eval_every_epoch` gives one evaluation per epoch. A resumed run takes the base perplexity and
the best eval loss so far from its restored metrics.jsonl.

`sftkit.train` calls `start` once before the loop and `on_eval` after each evaluation; that is all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit.checkpoint import save_model
from sftkit.config import Config, ConfigError
from sftkit.data.formats import load_records
from sftkit.data.messages import RawText
from sftkit.data.render import Tokenized, text_windows
from sftkit.distributed import LOCAL, Local
from sftkit.evaluate.perplexity import eval_loss


def read_reference(path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Tokenized]:
    """The reference text of `eval.reference_data`, as scored windows."""
    if not Path(path).is_file():
        raise ConfigError(f"eval.reference_data: {path} is not a file")
    records = load_records(path, format="text").records
    return text_windows(tokenizer, [(r.source, r.text) for r in records if isinstance(r, RawText)], max_length)


class Monitor:
    """Forgetting and overfitting checks of one run (see the module docstring)."""

    def __init__(self, config: Config, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int], pad_id: int,
                 dist: Local = LOCAL) -> None:
        tc = config.train
        if tc.keep_best and dist.strategy == "fsdp":
            raise ConfigError("train.keep_best: not with train.strategy=fsdp yet (best/ would need the sharded "
                              "model gathered at every new best); use train.strategy=ddp, or train.save_every and "
                              "the eval losses")
        self.config, self.tokenizer, self.eos_ids, self.pad_id, self.dist = config, tokenizer, eos_ids, pad_id, dist
        self.out = Path(config.output_dir)
        path = config.eval.reference_data
        self.reference = read_reference(path, tokenizer, config.data.max_length) if path else []
        self.base_ppl: float | None = None
        self.best: tuple[float, int] | None = None  # (eval loss, step)
        self.since_best = 0
        self.stop = False

    def measure(self, model: PreTrainedModel) -> float:
        tc = self.config.train
        return eval_loss(model, self.reference, tc.batch_size, self.pad_id, tc.eval_max_batches)[1]

    def start(self, model: PreTrainedModel, history: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Before step 0: the base model's reference perplexity (a step-0 row to log), or, when resuming,
        the base perplexity and the best eval loss from the restored history (nothing to log)."""
        for row in history:
            if row.get("step") == 0 and "reference_ppl" in row:
                self.base_ppl = row["reference_ppl"]
            if "eval_loss" in row:
                self._track(row["eval_loss"], row["step"])
        if not self.reference or self.base_ppl is not None:
            return None
        self.base_ppl = self.measure(model)
        tokens = sum(len(ex.input_ids) for ex in self.reference)
        print(f"reference   ppl {self.base_ppl:.3f} before training ({len(self.reference)} windows, {tokens:,} tokens "
              f"of {self.config.eval.reference_data})")
        return {"step": 0, "epoch": 0.0, "reference_ppl": self.base_ppl}

    def on_eval(self, model: PreTrainedModel, record: dict[str, Any]) -> None:
        """After an evaluation: add the reference figures to `record`; keep best/; decide on stopping."""
        if self.reference and self.base_ppl is not None:
            ppl = self.measure(model)
            record["reference_ppl"], record["reference_rise"] = ppl, ppl / self.base_ppl - 1
            if record["reference_rise"] > self.config.eval.forgetting_tolerance:
                tqdm.write(f"[step {record['step']}] warning: forgetting — reference perplexity {ppl:.3f} is "
                           f"{record['reference_rise']:+.0%} over the base model's {self.base_ppl:.3f} "
                           f"(eval.forgetting_tolerance {self.config.eval.forgetting_tolerance:g}); "
                           "a lower train.lr or fewer steps usually helps")
        if "eval_loss" not in record:
            return
        if self._track(record["eval_loss"], record["step"]):
            if self.config.train.keep_best:
                path = self.save_best(model, record)
                tqdm.write(f"[step {record['step']}] best eval loss {record['eval_loss']:.4f} -> {path}")
        patience = self.config.train.early_stopping_patience
        if patience and self.since_best >= patience:
            self.stop = True
            loss, step = self.best
            tqdm.write(f"[step {record['step']}] early stop: no lower eval loss in {patience} evaluations "
                       f"(best {loss:.4f} at step {step})")

    def _track(self, loss: float, step: int) -> bool:
        """Record an eval loss; True when it is a new best."""
        if self.best is None or loss < self.best[0]:
            self.best, self.since_best = (loss, step), 0
            return True
        self.since_best += 1
        return False

    def save_best(self, model: PreTrainedModel, record: dict[str, Any]) -> Path:
        """`output_dir/best/` with best.json naming its step and eval loss (sftkit.checkpoint: atomically; under
        torchrun with DDP by rank 0 while the others wait: every rank holds the same whole model)."""
        best = {k: record[k] for k in ("step", "epoch", "eval_loss")}
        return save_model(self.out, "best", model, self.tokenizer, self.eos_ids, self.config, self.dist,
                          extra={"best.json": best})

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """Progress-bar fields: the latest reference perplexity."""
        return {"ref_ppl": f"{record['reference_ppl']:.2f}"} if "reference_ppl" in record else {}

    def summary(self) -> str | None:
        if self.best is None or not (self.config.train.keep_best or self.config.train.early_stopping_patience):
            return None
        where = f" -> {self.out / 'best'}" if self.config.train.keep_best else ""
        return f"best eval  loss {self.best[0]:.4f} at step {self.best[1]}{where}"
