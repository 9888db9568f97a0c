"""Supervised fine-tuning: set up model, data and optimizer, then one loop you can read top to bottom.

    sftkit train configs/tiny-cpu.yaml train.max_steps=30 output_dir=runs/tiny

Writes into `output_dir`: sftkit_config.yaml (resolved), metrics.jsonl, tb/ and loss.png
(`sftkit.runlog`), checkpoints/step-N/ (every train.save_every steps) and final/ (`sftkit.checkpoint`:
a plain Hugging Face directory whose generation stops at the template's end-of-turn token).

The loss of one optimizer step is the sum of per-token cross-entropies over every trained token of
the accumulation window divided by the number of those tokens, so 4 micro-batches of 2 examples give
the same gradient as 1 batch of 8. One GPU or many is `sftkit.distributed`'s: the loop is the same.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
    set_seed,
)

from sftkit import checkpoint, distributed, faults, rundir
from sftkit.attention import check_batching, use_document_attention
from sftkit.config import CONFIG_FILE, Config, TrainConfig
from sftkit.data.batches import Batcher, input_token_count, trained_token_count
from sftkit.data.load import Split, dated_template_note, load_data
from sftkit.data.templates import end_of_turn_token_ids, pad_token_id
from sftkit.evaluate.monitor import Monitor
from sftkit.evaluate.perplexity import eval_loss
from sftkit.generate import generate_reply
from sftkit.lora import check_quantization, setup_lora_model
from sftkit.loss import loss_batch
from sftkit.model import load_model, load_prepared_tokenizer
from sftkit.runlog import RunLog, end_summary, peak_memory_gb, summary
from sftkit.report import write_report


def setup_model(config: Config, device: torch.device, resume_from: Path | None = None,
                prepared: tuple[PreTrainedTokenizerBase, list[str]] | None = None,
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[str]]:
    """(model, tokenizer, newly added tokens); from the checkpoint directory when resuming. With `lora.enabled`
    the base is frozen and wrapped with PEFT adapters (sftkit.lora). Then the speed switches, in place:
    attention per document for packed rows on CPU, gradient checkpointing, and `train.compile`.
    `prepared`: `setup_tokenizer`'s result, when the data was rendered with it before the weights load."""
    if config.lora.enabled:
        model, tokenizer, added = setup_lora_model(config, device, resume_from, prepared)
    else:
        model, tokenizer, added = load_model(config.model, template=config.data.template, device=device,
                                             path=resume_from, prepared=prepared)
    if config.data.packed_documents:
        use_document_attention(model)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.train.compile:  # each decoder layer: the loss path and the Python loop stay eager
        layer_types = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_types:
                module.compile(dynamic=True)
    return model, tokenizer, added


def setup_tokenizer(config: Config, resume_from: Path | None = None) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The tokenizer training renders with (the checkpoint's when a full run resumes; a LoRA run's is the
    base's), its chat template installed; and the tokens that added."""
    path = None if config.lora.enabled else resume_from
    return load_prepared_tokenizer(config.model, config.data.template, path)


def setup_data(config: Config, tokenizer: PreTrainedTokenizerBase, dist: distributed.Local = distributed.LOCAL
               ) -> tuple[Split, Split]:
    """(train, eval) examples: `sftkit.data.load`, the same entry `sftkit data preview` uses. Under torchrun
    rank 0 renders into the token cache first; the other ranks then map the same files."""
    rank_0_first = dist.world > 1 and config.data.cache
    if rank_0_first and not dist.is_main:
        dist.barrier()  # wait while rank 0 renders into the cache
    splits = load_data(config.data, tokenizer, config.train.seed)
    if rank_0_first and dist.is_main:
        dist.barrier()  # the cache is written: the other ranks map it
    return splits


def setup_optimizer(model: torch.nn.Module, train: TrainConfig, total_steps: int
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on biases, norms or any 1-D parameter) + transformers' linear warm-up, cosine decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel for all parameters: 4x faster
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=(0.9, 0.95), fused=fused)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, train.warmup_steps(total_steps), total_steps)


@dataclass
class WindowLoss:
    """The loss sums of one window's backward pass, left on the device until the step reads them, once."""

    cross_entropy: torch.Tensor  # 0-d: this rank's cross-entropy sum (float64, as Python floats summed it)
    router: torch.Tensor | None  # 0-d: its router load-balancing loss x trained tokens; None without one
    n_trained: int  # trained tokens of the whole window, over all ranks (counted on the host)

    def read_back(self, *more: torch.Tensor) -> list[float]:
        """[cross-entropy sum, router sum (0.0 without one), *more] as floats: ONE host-device sync."""
        router = self.router if self.router is not None else torch.zeros_like(self.cross_entropy)
        like = {"device": self.cross_entropy.device, "dtype": self.cross_entropy.dtype, "non_blocking": True}
        return torch.stack([self.cross_entropy, router, *(t.to(**like) for t in more)]).tolist()


def backward_pass(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]],
                  dist: distributed.Local = distributed.LOCAL) -> WindowLoss:
    """Accumulate the gradient of (sum of token losses / trained tokens) over a whole window, without one sync.

    Every micro-batch divides by the window's trained-token count, not its own, so any split of
    the window into micro-batches gives the same gradient. Under torchrun `batches` are this rank's
    part of the window and the count is over all ranks. Everything the host must know about a batch
    (its trained tokens, their positions, the document boundaries) is read from the batch while it is
    on the CPU (`sftkit.loss.loss_batch`), so the host queues the forward and backward passes of every
    micro-batch without waiting for the device; the sums stay there (`WindowLoss.read_back`).
    """
    n_trained = dist.all_sum([sum(trained_token_count(b) for b in batches)])[0]
    device = dist.device if dist.launched else model.device  # FSDP's CPU offload: the ranks' GPU all the same
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total, router = torch.zeros((), dtype=dtype, device=device), None
    for i, batch in enumerate(batches):
        parts: dict[str, torch.Tensor] = {}
        prepared = loss_batch(model, batch, device)
        with dist.accumulating(last=i == len(batches) - 1):  # DDP / FSDP reduce gradients after the last only
            loss_sum = dist.loss_sum(model, prepared, parts)
            loss = loss_sum / max(n_trained, 1)
            if dist.world > 1:  # DDP and FSDP average the ranks' gradients; the window's mean is their sum
                loss = loss * dist.world
            loss.backward()
        total += parts.get("cross_entropy", loss_sum.detach())
        if "router_loss" in parts:
            router = (0.0 if router is None else router) + parts["router_loss"].to(dtype) * prepared.n_trained
    return WindowLoss(total, router, n_trained)


def finish_window(window: WindowLoss, dist: distributed.Local = distributed.LOCAL,
                  sums: dict[str, float] | None = None, grad_norm: torch.Tensor | None = None, n_inputs: int = 0
                  ) -> tuple[float, float, int]:
    """(cross-entropy sum, gradient norm, input tokens) of a window, over all ranks: its one read-back (with
    the gradient norm when given) and, under torchrun, one all-reduce of the floats read. `sums["router_loss"]`
    gets an MoE router's load-balancing loss times the trained tokens (in the gradient, not in the sum)."""
    total, router, *norm = window.read_back(*([] if grad_norm is None else [grad_norm]))
    total, router, n_inputs = dist.all_sum([total, router, n_inputs])
    if sums is not None and router:
        sums["router_loss"] = sums.get("router_loss", 0.0) + router
    return total, norm[0] if norm else 0.0, n_inputs


def backward_window(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]],
                    dist: distributed.Local = distributed.LOCAL, sums: dict[str, float] | None = None
                    ) -> tuple[float, int]:
    """`backward_pass` read back at once: (cross-entropy sum, trained tokens) of the whole window, over all ranks;
    `sums` as `finish_window`. The loop reads the sums with the gradient norm instead, in one sync."""
    window = backward_pass(model, batches, dist)
    return finish_window(window, dist, sums)[0], window.n_trained


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, trained tokens so far, and the logging interval under way
    (its sums travel in checkpoints, so a resumed run logs the interval it was in)."""

    step: int = 0
    tokens: int = 0
    loss: float = 0.0
    trained: int = 0
    inputs: int = 0
    nan_skipped: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    grad_norm: float = 0.0  # of the last step, before clipping
    sums: dict[str, float] = field(default_factory=dict)  # the interval's other losses (an MoE's router_loss)
    elapsed: float = 0.0  # seconds of training before this process (a resumed run carries its past time)
    began: float = field(default_factory=time.perf_counter)

    def add(self, loss_sum: float, n_trained: int, n_inputs: int, grad_norm: float) -> None:
        self.step, self.tokens, self.grad_norm = self.step + 1, self.tokens + n_trained, grad_norm
        self.loss, self.trained, self.inputs = self.loss + loss_sum, self.trained + n_trained, self.inputs + n_inputs

    @property
    def seconds(self) -> float:
        """Training time of the whole run so far, across resumes."""
        return self.elapsed + time.perf_counter() - self.began

    def record(self, per_epoch: int, lr: float) -> dict[str, Any]:
        """The metrics.jsonl row of the interval that ends now; the next interval starts."""
        seconds = time.perf_counter() - self.started
        row = {"step": self.step, "epoch": round(self.step / per_epoch, 4), "loss": self.loss / max(self.trained, 1),
               "lr": lr, "grad_norm": self.grad_norm, "tokens": self.tokens, "tokens_per_s": self.trained / seconds,
               "input_tokens_per_s": self.inputs / seconds, "elapsed_s": round(self.seconds, 2),
               "peak_mem_gb": peak_memory_gb(), **{k: v / max(self.trained, 1) for k, v in self.sums.items()}}
        self.sums = {}
        self.loss, self.trained, self.inputs, self.started = 0.0, 0, 0, time.perf_counter()
        return row

    def saved(self, epoch: int, per_epoch: int, seed: int, world: int) -> dict[str, Any]:
        """What a checkpoint keeps (trainer_state.json); `data` is where the next step reads from."""
        next_epoch, next_window = divmod(self.step, per_epoch)
        return {"step": self.step, "epoch": epoch, "tokens": self.tokens, "nan_skipped": self.nan_skipped,
                "elapsed_s": self.seconds,
                "interval": {"loss": self.loss, "trained": self.trained, "inputs": self.inputs},
                "data": {"seed": seed, "steps_per_epoch": per_epoch, "epoch": next_epoch, "window": next_window,
                         "micro_batch": 0, "world": world}}  # saved between optimizer steps: a window starts at its first

    @classmethod
    def resumed(cls, saved: dict[str, Any]) -> TrainState:
        interval = saved.get("interval", {})
        return cls(saved["step"], saved["tokens"], interval.get("loss", 0.0), interval.get("trained", 0),
                   interval.get("inputs", 0), saved.get("nan_skipped", []), elapsed=saved.get("elapsed_s", 0.0))


@dataclass
class Run:
    """Everything the loop uses, made by `setup`."""

    config: Config
    dist: distributed.Local
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batcher: Batcher
    eval_split: Split
    log: RunLog
    monitor: Monitor
    guard: faults.NanGuard
    state: TrainState
    eos_ids: list[int]
    sample: list[dict[str, Any]] | None
    per_epoch: int
    total: int
    last_saved: Path | None


def train(config: Config, overwrite: bool = False) -> Path:
    """Run the whole fine-tuning job described by `config`; return the `final/` directory.

    An output_dir holding another run is refused unless `overwrite` (clear it) or `train.resume`
    (continue it; a finished run has nothing to do): sftkit.rundir. SIGINT / SIGTERM stop the run at
    the end of the optimizer step, after a checkpoint (sftkit.faults). Under torchrun this process is
    one rank of many (sftkit.distributed).
    """
    with distributed.setup(config.train) as dist, faults.StopSignals() as stop:
        finished = rundir.prepare(config, overwrite, dist.is_main)
        dist.barrier()  # --overwrite: every rank starts once rank 0 has cleared the old run
        return finished or loop(setup(config, dist), stop)


def loop(run: Run, stop: faults.StopSignals) -> Path:
    """The optimizer steps of `run`, from its state to `total`; then final/."""
    tc, dist, state, model = run.config.train, run.dist, run.state, run.model
    bar = tqdm(total=run.total, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not dist.is_main)
    while state.step < run.total:
        # one optimizer step = one window of grad_accum micro-batches, loss averaged over its trained tokens
        epoch, batches, sources = run.batcher.batches(state.step, dist.rank, dist.world)  # this rank's part
        window = backward_pass(model, batches, dist)  # queued without waiting for the device
        grad_norm = faults.gradient_norm_tensor(model.parameters(), tc.max_grad_norm)  # clips at max_grad_norm
        loss_sum, grad_norm, n_inputs = finish_window(window, dist, state.sums, grad_norm,  # the step's one sync
                                                      sum(input_token_count(b) for b in batches))
        n_trained = window.n_trained
        if run.guard.check(state.step + 1, loss_sum, grad_norm, sources, run.last_saved, run.config.output_dir):
            run.optimizer.step()
        else:  # train.on_nan=skip: the batch trains nothing; the schedule and the data order go on
            loss_sum, n_trained = 0.0, 0
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        state.add(loss_sum, n_trained, n_inputs, grad_norm)
        bar.update(1)

        evaluating = tc.evaluates_at(state.step, run.per_epoch, run.total)
        if evaluating or state.step % tc.log_every == 0:
            record = state.record(run.per_epoch, run.scheduler.get_last_lr()[0])
            if evaluating:
                evaluate(run, record)
            if state.nan_skipped:
                record["nan_skipped"] = len(state.nan_skipped)
            run.log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['input_tokens_per_s']:.0f}", **run.monitor.postfix(record))

        stopping = dist.any(stop.requested)  # torchrun: a signal to one rank stops every rank at this step
        if state.step < run.total and ((tc.save_every and state.step % tc.save_every == 0) or stopping):
            run.last_saved = save_checkpoint(run, epoch)
        if stopping and state.step < run.total:
            bar.close()
            faults.stop_training(stop, state.step, run.last_saved, run.config.output_dir)
        if run.monitor.stop:  # train.early_stopping_patience evaluations without a lower eval loss
            break
    bar.close()
    return finish(run)


def setup(config: Config, dist: distributed.Local) -> Run:
    """Model, data, optimizer, logs and the state to start from (step 0, or the latest checkpoint)."""
    out, tc = Path(config.output_dir), config.train
    log = RunLog(out, enabled=dist.is_main, report_to=tc.report_to)  # a tracker not installed: said before anything
    check_batching(config.model.path, config.data.batching, config.model.attn_implementation)  # before any data
    faults.check_output_dir(out)  # an unwritable output_dir fails now, not at the first checkpoint
    set_seed(tc.seed)
    resume_from = checkpoint.latest_checkpoint(out, dist) if tc.resume else None
    if tc.resume and resume_from is None:
        print(f"train.resume: no complete checkpoint under {out / 'checkpoints'}; starting from step 0")

    weights = checkpoint.weights_from(resume_from)
    check_quantization(config.lora, dist.device)  # QLoRA where it cannot run: before the data too
    prepared = setup_tokenizer(config, weights)  # fail fast: a wrong model.path or template, then every data
    train_split, eval_split = setup_data(config, prepared[0], dist)  # error, before minutes of loading weights
    model, tokenizer, added = setup_model(config, dist.device, weights, prepared)
    pad_id, eos_ids = pad_token_id(tokenizer), end_of_turn_token_ids(tokenizer, config.data.template_kwargs)
    batcher = Batcher.from_config(train_split.examples, pad_id, config.data, tc, dist.world)  # global windows
    per_epoch = batcher.steps_per_epoch()
    total = tc.total_steps(per_epoch)
    if disk_warning := faults.low_disk_warning(out, model, tc, total):
        print(disk_warning)
    notes = [note for note in [dated_template_note(tokenizer, config.data)] if note]
    overview = summary(config, train_split, eval_split, model, added, per_epoch, total, notes)  # before FSDP
    dist.wrap(model, config)  # torchrun: DDP or FSDP2; nothing in one process
    optimizer, scheduler = setup_optimizer(model, tc, total)
    if dist.is_main:
        checkpoint.save_config(config, out / CONFIG_FILE)
    monitor = Monitor(config, tokenizer, eos_ids, pad_id, dist)  # forgetting, best/, early stop

    state = TrainState()
    if resume_from is not None:
        saved = checkpoint.load_training_state(resume_from, optimizer, scheduler, log.metrics_file, model, dist)
        state, was = TrainState.resumed(saved), saved["data"]
        log.purge_step = state.step + 1  # TensorBoard drops what the stopped run logged after its checkpoint
        if was["steps_per_epoch"] != per_epoch:
            why = (f"the run had {was['world']} process(es), this one {dist.world}"
                   if was.get("world", dist.world) != dist.world else "the data or the batch size changed")
            print(f"warning: {per_epoch} steps per epoch now, {was['steps_per_epoch']} at {resume_from} ({why}): "
                  "the resumed run will not see the batches it would have")
        print(f"resumed from {resume_from} at step {state.step} (epoch {saved['epoch']})")
    elif dist.is_main:
        log.metrics_file.unlink(missing_ok=True)
    with dist.whole_model():  # torchrun: every rank evaluates together (FSDP gathers a layer at a time)
        if base_record := monitor.start(model, log.history() if resume_from else []):  # base model ppl, step 0
            log.write(base_record)
    print(overview)
    for line in (batcher.summary(), dist.describe(tc)):
        if line:
            print(line)
    preflight_examples = eval_split.examples or train_split.examples[: tc.batch_size * 2]
    with dist.whole_model():  # fail fast: a couple of batches through the model (shapes, memory, finite loss)
        loss = eval_loss(model, preflight_examples, tc.batch_size, pad_id, max_batches=2)[0]
    if not math.isfinite(loss):
        raise RuntimeError(f"pre-flight loss is {loss} before any training: check model.dtype and the data")
    print(f"pre-flight  loss {loss:.4f} on up to 2 batches")
    sample = [{"role": "user", "content": tc.sample_prompt}] if tc.sample_prompt else next(
        iter(eval_split.prompts or train_split.prompts), None)
    model.train()
    return Run(config, dist, model, tokenizer, optimizer, scheduler, batcher, eval_split, log, monitor,
               faults.NanGuard(tc.on_nan, state.nan_skipped), state, eos_ids, sample, per_epoch, total, resume_from)


def evaluate(run: Run, record: dict[str, Any]) -> None:
    """Eval loss, one sample reply and the monitor's figures, into `record` (every rank together)."""
    tc = run.config.train
    with run.dist.whole_model():
        if run.eval_split.examples:
            record["eval_loss"], record["eval_ppl"] = eval_loss(run.model, run.eval_split.examples, tc.batch_size,
                                                                run.batcher.pad_id, tc.eval_max_batches)
            tqdm.write(f"[step {record['step']}] eval loss {record['eval_loss']:.4f}, perplexity "
                       f"{record['eval_ppl']:.2f} (train loss {record['loss']:.4f})")
        if run.sample:
            reply = generate_reply(run.model, run.tokenizer, run.sample, max_new_tokens=tc.sample_max_new_tokens,
                                   template_kwargs=run.config.data.template_kwargs)
            record["sample"] = reply.text
            tqdm.write(f"[step {record['step']}] sample  {run.sample[-1]['role']}: {run.sample[-1]['content']!r}\n"
                       f"{' ' * len(str(record['step']))}          reply: {reply.text!r}"
                       f"{'' if reply.stopped else ' (no end of turn)'}")
        run.monitor.on_eval(run.model, record)  # reference perplexity, best/, early stop


def save_checkpoint(run: Run, epoch: int) -> Path:
    tc = run.config.train
    saved = checkpoint.save_checkpoint(
        Path(run.config.output_dir), model=run.model, tokenizer=run.tokenizer, optimizer=run.optimizer,
        scheduler=run.scheduler, config=run.config, eos_ids=run.eos_ids, metrics_file=run.log.metrics_file,
        state=run.state.saved(epoch, run.per_epoch, tc.seed, run.dist.world), keep=tc.keep_checkpoints, dist=run.dist)
    tqdm.write(f"[step {run.state.step}] checkpoint {saved}")
    return saved


def finish(run: Run) -> Path:
    """final/, the loss curve, and what the run skipped or kept as best."""
    if skipped := run.guard.summary():
        print(skipped)
    final = checkpoint.save_model(Path(run.config.output_dir), "final", run.model, run.tokenizer, run.eos_ids,
                                  run.config, run.dist)
    print(f"final model {final}\nloss curve  {run.log.close()}")
    if best := run.monitor.summary():
        print(best)
    if run.dist.is_main:
        print(end_summary(run.log.history(), run.state.step, run.state.tokens, run.state.seconds, final))
        print(f"report      {write_report(run.config.output_dir)}")
    return final
