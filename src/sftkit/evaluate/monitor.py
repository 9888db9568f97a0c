"""Watch a run while it trains: forgetting (reference perplexity), task accuracy, and overfitting (best/, early stop).

    sftkit train RECIPE.yaml eval.reference_data=reference.txt eval.forgetting_tolerance=0.2
    sftkit train RECIPE.yaml train.eval_every_epoch=true train.keep_best=true train.early_stopping_patience=2
    sftkit train RECIPE.yaml eval.tasks=tasks.jsonl eval.best_metric=task_accuracy train.keep_best=true

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
the best figure so far from its restored metrics.jsonl.

Task accuracy: `eval.tasks` is a task file (`sftkit eval --tasks`, sftkit.evaluate.tasks), read before
step 0 and scored at every evaluation by the same code as `sftkit eval` (`task_eval.score_tasks`: greedy,
batched, the run's chat template and template kwargs), so a checkpoint saved at an eval step gets the
same figure from both. `task_accuracy`, `task_answered`, `task_ended_turn` join the eval record
(metrics.jsonl, TensorBoard); every reply lands in `output_dir/tasks/step-N/results.jsonl`. With
`eval.best_metric: task_accuracy`, best/ and early stopping follow the highest accuracy instead of
the lowest eval loss (the earliest step wins a tie).

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
from sftkit.evaluate.task_eval import Asker, score_tasks, write_results
from sftkit.evaluate.tasks import read_tasks


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
        self.tasks = read_tasks(config.eval.tasks) if config.eval.tasks else []  # a bad file fails before step 0
        self.metric = config.eval.best_metric  # eval_loss (lower is better) or task_accuracy (higher)
        self.base_ppl: float | None = None
        self.best: tuple[float, int] | None = None  # (metric, step)
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
            if self.metric in row:
                self._track(row[self.metric], row["step"])
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
        if self.tasks:
            self.score_tasks(model, record)
        if self.metric not in record:
            return
        if self._track(record[self.metric], record["step"]):
            if self.config.train.keep_best:
                path = self.save_best(model, record)
                tqdm.write(f"[step {record['step']}] best {self._name} {self._show(record[self.metric])} -> {path}")
        patience = self.config.train.early_stopping_patience
        if patience and self.since_best >= patience:
            self.stop = True
            value, step = self.best
            tqdm.write(f"[step {record['step']}] early stop: no {'higher' if self._higher else 'lower'} {self._name} "
                       f"in {patience} evaluations (best {self._show(value)} at step {step})")

    def score_tasks(self, model: PreTrainedModel, record: dict[str, Any]) -> None:
        """The task file's accuracy, answered and ended-turn shares into `record`; the replies to
        output_dir/tasks/step-N/ (rank 0; every rank generates, in step, as the sample reply does)."""
        asker = Asker(model, self.tokenizer, template_kwargs=dict(self.config.data.template_kwargs or {}))
        scored = score_tasks(asker, self.tasks, max_new_tokens=self.config.eval.tasks_max_new_tokens)
        figures = scored.figures()
        record["task_accuracy"] = figures["accuracy"]
        for key in ("answered", "ended_turn"):
            if figures[key] is not None:
                record[f"task_{key}"] = figures[key]
        if self.dist.is_main:
            write_results(self.out / "tasks" / f"step-{record['step']}", [scored],
                          {"tasks": str(self.config.eval.tasks), "step": record["step"],
                           "max_new_tokens": self.config.eval.tasks_max_new_tokens})
        tqdm.write(f"[step {record['step']}] task accuracy {100 * figures['accuracy']:.1f}% "
                   f"({figures['correct']}/{figures['n']}, 95% interval {100 * figures['ci_low']:.1f}-"
                   f"{100 * figures['ci_high']:.1f}%) on {self.config.eval.tasks}")

    @property
    def _higher(self) -> bool:
        return self.metric == "task_accuracy"

    @property
    def _name(self) -> str:
        return "task accuracy" if self._higher else "eval loss"

    def _show(self, value: float) -> str:
        return f"{100 * value:.1f}%" if self._higher else f"{value:.4f}"

    def _track(self, value: float, step: int) -> bool:
        """Record the followed metric; True when it is a new best (lower loss, or higher accuracy)."""
        if self.best is None or (value > self.best[0] if self._higher else value < self.best[0]):
            self.best, self.since_best = (value, step), 0
            return True
        self.since_best += 1
        return False

    def save_best(self, model: PreTrainedModel, record: dict[str, Any]) -> Path:
        """`output_dir/best/` with best.json naming its step and the followed figure (sftkit.checkpoint: atomically;
        under torchrun with DDP by rank 0 while the others wait: every rank holds the same whole model)."""
        best = {k: record[k] for k in ("step", "epoch", "eval_loss", "task_accuracy") if k in record}
        return save_model(self.out, "best", model, self.tokenizer, self.eos_ids, self.config, self.dist,
                          extra={"best.json": best})

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """Progress-bar fields: the latest reference perplexity and task accuracy."""
        fields = {"ref_ppl": f"{record['reference_ppl']:.2f}"} if "reference_ppl" in record else {}
        if "task_accuracy" in record:
            fields["task_acc"] = f"{100 * record['task_accuracy']:.1f}%"
        return fields

    def summary(self) -> str | None:
        if self.best is None or not (self.config.train.keep_best or self.config.train.early_stopping_patience):
            return None
        where = f" -> {self.out / 'best'}" if self.config.train.keep_best else ""
        return f"best eval  {self._name} {self._show(self.best[0])} at step {self.best[1]}{where}"
