"""Supervised fine-tuning: set up model, data and optimizer, then one loop you can read top to bottom.

    sftkit train configs/tiny-cpu.yaml train.max_steps=30 output_dir=runs/tiny

Writes into `output_dir`: config.yaml (resolved), metrics.jsonl (one line per logged step),
tb/ (TensorBoard), loss.png, checkpoints/step-N/ (every train.save_every steps) and final/ (a plain
Hugging Face directory whose generation stops at the template's end-of-turn token).

The loss of one optimizer step is the sum of per-token cross-entropies over every trained token of
the accumulation window divided by the number of those tokens, so 4 micro-batches of 2 examples give
the same gradient as 1 batch of 8.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit import distributed, faults
from sftkit.attention import use_document_attention
from sftkit.config import Config, TrainConfig
from sftkit.data.dataset import Batcher, Split, collate, load_splits, prompt_of, trained_token_count
from sftkit.data.render import Renderer, Tokenized
from sftkit.data.templates import end_of_turn_token_ids
from sftkit.evidence.monitor import Monitor
from sftkit.generate import generate_reply
from sftkit.loss import token_loss_sum
from sftkit.lora import setup_lora_model
from sftkit.model import count_parameters, load_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_model(
    config: Config, device: torch.device, resume_from: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[str]]:
    """(model, tokenizer, newly added tokens); from the checkpoint directory when resuming.

    With `lora.enabled` the base is frozen and wrapped with PEFT adapters (sftkit.lora).
    """
    if config.lora.enabled:
        return setup_lora_model(config, device, resume_from)
    return load_model(config.model, template=config.data.template, device=device, path=resume_from)


def setup_speed(model: PreTrainedModel, config: Config) -> None:
    """Attention per document for packed rows on CPU (sftkit.attention), `train.gradient_checkpointing` and
    `train.compile`, all in place (parameter names stay the same)."""
    train = config.train
    if config.data.packed_documents:
        use_document_attention(model)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.compile:  # each decoder layer: the loss path and the Python loop stay eager
        layer_types = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_types:
                module.compile(dynamic=True)


def setup_data(config: Config, tokenizer: PreTrainedTokenizerBase) -> tuple[Split, Split]:
    renderer = Renderer(tokenizer, config.data.strategy, config.data.max_length, config.data.template_kwargs,
                        fast_bpe=config.data.fast_bpe)
    return load_splits(config.data, renderer, config.train.seed)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay towards 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def setup_optimizer(
    model: torch.nn.Module, train: TrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on biases, norms or any 1-D parameter) + warm-up/cosine LambdaLR."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel for all parameters: 4x faster
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=(0.9, 0.95), fused=fused)
    schedule = functools.partial(lr_factor, warmup=train.warmup_steps(total_steps), total=total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def backward_window(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]],
                    dist: distributed.Local = distributed.LOCAL) -> tuple[float, int]:
    """Accumulate the gradient of (sum of token losses / trained tokens) over a whole window.

    Every micro-batch divides by the window's trained-token count, not its own, so any split of
    the window into micro-batches gives the same gradient. Under torchrun `batches` are this rank's
    part of the window and the count is over all ranks (sftkit.distributed). Returns (loss sum,
    trained tokens) of the whole window.
    """
    n_trained = dist.all_sum([sum(trained_token_count(b) for b in batches)])[0]
    total = 0.0
    for i, batch in enumerate(batches):
        with dist.accumulating(last=i == len(batches) - 1):  # DDP / FSDP reduce gradients after the last only
            loss_sum = dist.loss_sum(model, to_device(batch, model.device))
            loss = loss_sum / max(n_trained, 1)
            if dist.world > 1:  # DDP and FSDP average the ranks' gradients; the window's mean is their sum
                loss = loss * dist.world
            loss.backward()
        total += loss_sum.item()
    return dist.all_sum([total])[0], n_trained


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: PreTrainedModel, examples: list[Tokenized], batch_size: int, pad_id: int, max_batches: int | None = None
) -> tuple[float, float]:
    """(token-weighted mean loss, perplexity) over the trained tokens of `examples`."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    starts = range(0, len(examples), batch_size)
    for start in list(starts)[:max_batches]:
        batch = collate(examples[start : start + batch_size], pad_id)
        total += token_loss_sum(model, to_device(batch, model.device)).item()
        tokens += trained_token_count(batch)
    model.train(was_training)
    loss = total / max(tokens, 1)
    return loss, math.exp(min(loss, 50.0))


class RunLog:
    """metrics.jsonl + TensorBoard scalars + the loss curve; everything `train` reports goes here."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = output_dir
        self.metrics_file = output_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(output_dir / "tb")) if enabled else None  # under torchrun: rank 0 only

    def write(self, record: dict[str, Any]) -> None:
        if self.tb is None:
            return
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
        if self.tb is None:
            return self.dir / "loss.png"
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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
    for name, split in (("train", train), ("eval", evaluation)):
        for reason, n in split.left_out().items():
            lines.append(f"left out    {name}: {n} {reason}")
        for note, n in sorted(split.report.warnings.items()):
            lines.append(f"note        {name}: {note} x{n}")
    if added:
        lines.append(f"new tokens  {' '.join(added)} (embeddings resized, rows set to the mean)")
    return "\n".join(lines)


def preflight(model: PreTrainedModel, examples: list[Tokenized], config: TrainConfig, pad_id: int) -> float:
    """Fail fast: a couple of batches through the model before step 0 (shapes, memory, finite loss)."""
    loss, _ = evaluate(model, examples, config.batch_size, pad_id, max_batches=2)
    if not math.isfinite(loss):
        raise RuntimeError(f"pre-flight loss is {loss} before any training: check model.dtype and the data")
    return loss


def train(config: Config) -> Path:
    """Run the whole fine-tuning job described by `config`; return the `final/` directory.

    SIGINT / SIGTERM stop it at the end of the optimizer step, after a checkpoint (sftkit.faults).
    Under torchrun this process is one rank of many (sftkit.distributed).
    """
    with distributed.setup(config.train) as dist, faults.StopSignals() as stop:
        return _train(config, stop, dist)


def _train(config: Config, stop: faults.StopSignals, dist: distributed.Local) -> Path:
    out = Path(config.output_dir)
    faults.check_output_dir(out)  # an unwritable output_dir fails now, not at the first checkpoint
    tc = config.train
    seed_everything(tc.seed)
    device = dist.device
    resume_from = dist.latest_checkpoint(out) if tc.resume else None
    if tc.resume and resume_from is None:
        print(f"train.resume: no complete checkpoint under {out / 'checkpoints'}; starting from step 0")

    model, tokenizer, added = setup_model(config, device, dist.weights_from(resume_from))
    setup_speed(model, config)
    train_split, eval_split = setup_data(config, tokenizer)
    examples = train_split.examples
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = end_of_turn_token_ids(tokenizer, config.data.template_kwargs)
    # padded, grouped, padding-free or packed; under torchrun windows of the global batch (all ranks)
    batcher = Batcher.from_config(examples, pad_id, config.data, dist.global_train(tc))
    per_epoch = batcher.steps_per_epoch()
    total = tc.total_steps(per_epoch)
    if disk_warning := faults.low_disk_warning(out, model, tc, total):
        print(disk_warning)
    overview = summary(config, train_split, eval_split, model, added, per_epoch, total)  # before FSDP shards it
    dist.wrap(model, config)  # torchrun: DDP or FSDP2; nothing in one process
    optimizer, scheduler = setup_optimizer(model, tc, total)
    if dist.is_main:
        config.dump(out / "config.yaml")
    log = RunLog(out, enabled=dist.is_main)
    monitor = Monitor(config, tokenizer, eos_ids, bool(eval_split.examples), pad_id)  # forgetting, best/, early stop

    step, tokens_seen = 0, 0
    guard, last_saved, carried = faults.NanGuard(tc.on_nan), resume_from, {"loss": 0.0, "trained": 0, "inputs": 0}
    if resume_from is not None:
        state = dist.load_training_state(resume_from, model, optimizer, scheduler, log.metrics_file)
        step, tokens_seen = state["step"], state["tokens"]
        guard.skipped, carried = state.get("nan_skipped", []), state.get("interval", carried)
        if state["data"]["steps_per_epoch"] != per_epoch:
            print(f"warning: the data changed since {resume_from} ({state['data']['steps_per_epoch']} steps per "
                  f"epoch then, {per_epoch} now): the resumed run will not see the batches it would have")
        print(f"resumed from {resume_from} at step {step} (epoch {state['epoch']})")
    elif dist.is_main:
        log.metrics_file.unlink(missing_ok=True)
    with dist.whole_model():  # torchrun: every rank evaluates together (FSDP gathers a layer at a time)
        if base_record := monitor.start(model, log.history() if resume_from else []):  # base model ppl, step 0
            log.write(base_record)
    print(overview)
    if batching := batcher.summary():
        print(batching)
    if processes := dist.describe(tc):
        print(processes)
    eval_examples = eval_split.examples or examples[: tc.batch_size * 2]
    with dist.whole_model():
        print(f"pre-flight  loss {preflight(model, eval_examples, tc, pad_id):.4f} on up to 2 batches")
    sample = [{"role": "user", "content": tc.sample_prompt}] if tc.sample_prompt else next(
        (p for p in map(prompt_of, eval_split.records or train_split.records) if p), None
    )

    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not dist.is_main)
    interval = {**carried, "start": time.perf_counter()}  # a resumed run goes on with its logging interval
    while step < total:
        # one optimizer step = one window of grad_accum micro-batches, loss averaged over its trained tokens
        epoch, micro = batcher.window(step)  # micro-batches of example indices
        batches = [dist.collate(batcher, ids) for ids in dist.shard(micro, batcher)]  # torchrun: this rank's part
        loss_sum, n_trained = backward_window(model, batches, dist)
        grad_norm = faults.gradient_norm(model.parameters(), tc.max_grad_norm)  # clips when max_grad_norm is set
        sources = [examples[i].source for ids in micro for i in ids]
        if guard.check(step + 1, loss_sum, grad_norm, sources, last_saved, out):  # NaN/inf: stop, or skip
            optimizer.step()
        else:  # train.on_nan=skip: the batch trains nothing; the schedule and the data order go on
            loss_sum, n_trained = 0.0, 0
        interval["loss"] += loss_sum
        interval["inputs"] += dist.all_sum([sum(int(b["attention_mask"].sum()) for b in batches)])[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += n_trained
        interval["trained"] += n_trained
        bar.update(1)

        evaluate_now = tc.evaluates_at(step, per_epoch, total)
        if evaluate_now or step % tc.log_every == 0:
            seconds = time.perf_counter() - interval["start"]
            record = {
                "step": step, "epoch": round(step / per_epoch, 4),
                "loss": interval["loss"] / max(interval["trained"], 1), "lr": scheduler.get_last_lr()[0],
                "tokens": tokens_seen,
                "tokens_per_s": interval["trained"] / seconds, "input_tokens_per_s": interval["inputs"] / seconds,
            }
            with dist.whole_model(evaluate_now):  # torchrun: every rank evaluates
                if evaluate_now and eval_split.examples:
                    record["eval_loss"], record["eval_ppl"] = evaluate(
                        model, eval_split.examples, tc.batch_size, pad_id, tc.eval_max_batches
                    )
                if evaluate_now and sample:
                    reply = generate_reply(model, tokenizer, sample, max_new_tokens=tc.sample_max_new_tokens,
                                           template_kwargs=config.data.template_kwargs)
                    record["sample"] = reply.text
                    tqdm.write(f"[step {step}] sample: {reply.text!r}{'' if reply.stopped else ' (no end of turn)'}")
                if evaluate_now:
                    monitor.on_eval(model, record)  # reference perplexity, best/, early stop
            if guard.skipped:
                record["nan_skipped"] = len(guard.skipped)
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['input_tokens_per_s']:.0f}", **monitor.postfix(record))
            interval = {"loss": 0.0, "trained": 0, "inputs": 0, "start": time.perf_counter()}

        stopping = dist.any(stop.requested)  # torchrun: a signal to one rank stops every rank at this step
        if step < total and ((tc.save_every and step % tc.save_every == 0) or stopping):
            next_epoch, next_window = divmod(step, per_epoch)  # data position: where step+1 reads from
            state = {"step": step, "epoch": epoch, "tokens": tokens_seen, "data": {
                "seed": tc.seed, "steps_per_epoch": per_epoch, "epoch": next_epoch, "window": next_window,
                "micro_batch": 0},  # saved between optimizer steps: the next window starts at its first micro-batch
                "interval": {k: interval[k] for k in ("loss", "trained", "inputs")}, "nan_skipped": guard.skipped}
            last_saved = dist.save_checkpoint(out, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                              scheduler=scheduler, config=config, eos_ids=eos_ids, state=state,
                                              metrics_file=log.metrics_file, keep=tc.keep_checkpoints)
            tqdm.write(f"[step {step}] checkpoint {last_saved}")
        if stopping and step < total:
            bar.close()
            faults.stop_training(stop, step, last_saved, out)
        if monitor.stop:  # train.early_stopping_patience evaluations without a lower eval loss
            break
    bar.close()
    if skipped := guard.summary():
        print(skipped)

    final = dist.save_final(out, model, tokenizer, eos_ids, config)
    print(f"final model {final}\nloss curve  {log.close()}")
    if best := monitor.summary():
        print(best)
    return final
