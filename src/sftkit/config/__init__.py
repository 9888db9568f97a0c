"""The run configuration: typed sections, a docstring under every key, and every static cross-field check.

    sftkit train configs/tiny-cpu.yaml train.lr=1e-5 data.max_length=1024     # read by sftkit.recipe
    sftkit config keys [SECTION]        # every key below with its type, default and docstring

Each section checks its own values and the rules between them in `__post_init__`, whether it is
built from a YAML recipe (`sftkit.recipe.load_config`, which also checks types and unknown keys) or
directly in Python; every problem is a `ConfigError` naming the dotted key. The resolved config is
written as `sftkit_config.yaml` into the run directory and beside every model a run writes.

This package imports nothing else of sftkit: every other module may import it (checks.py holds the
choices, `ConfigError` and the checks the sections share).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import yaml

from sftkit.config.checks import (  # noqa: F401 (re-exported: `from sftkit.config import ConfigError, ...`)
    _SCHEMA,
    BATCHING,
    CONFIG_FILE,
    DTYPES,
    STRATEGIES,
    TRACKERS,
    Batching,
    ConfigError,
    DType,
    Reasoning,
    Strategy,
    Turns,
    _check_choices,
    _fail,
    _fail_if,
)


@dataclass(frozen=True)
class Source:
    """One `data.train` entry: a file and how much of it to train on (`weight` or `samples`; neither = all)."""

    __pydantic_config__ = _SCHEMA
    path: str
    """The file."""
    weight: float | None = None
    """Records taken = round(weight x size): 0.5 a random half, 2 every record twice."""
    samples: int | None = None
    """Records taken: a number (drawn without replacement up to the file's size)."""

    def __post_init__(self) -> None:
        if self.weight is not None and self.samples is not None:
            raise ValueError(f"give a source a weight or a number of samples, not both ({self})")
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, not {self.weight!r}")
        if self.samples is not None and (isinstance(self.samples, bool) or not isinstance(self.samples, int)
                                         or self.samples < 0):
            raise ValueError(f"samples must be a whole number >= 0, not {self.samples!r}")

    @property
    def mixed(self) -> bool:
        return self.weight is not None or self.samples is not None


@dataclass
class ModelConfig:
    """Which local model to fine-tune and how to load it."""

    __pydantic_config__ = _SCHEMA
    section: ClassVar[str] = "model"

    path: str = ""
    """Local directory holding a Hugging Face model + tokenizer (sftkit never downloads)."""
    dtype: DType = "auto"
    """auto | float32 | bfloat16 | float16; auto = bfloat16 on CUDA, float32 on CPU."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the model directory. Off unless you trust that directory."""
    allow_pickle: bool = False
    """Also load pickled weights (pytorch_model.bin), which can run code when unpickled; off = safetensors only."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa | eager | flash_attention_2 | ..."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _fail_if(not self.path, "model.path", "required: a local directory with config.json, weights and a tokenizer")
        if not self.attn_implementation:
            _fail("model.attn_implementation", "must not be empty (e.g. 'sdpa' or 'eager')")


@dataclass
class DataConfig:
    """Which files to train on and how conversations become tokens and masks."""

    __pydantic_config__ = _SCHEMA
    section: ClassVar[str] = "data"

    train: str | list[str | dict[str, Any]] = field(default_factory=list)
    """Training file(s): a path, or a list of paths and `{path, weight}` / `{path, samples}` entries
    that mix sources (weight 2 = every record twice; samples 500 = 500 records; seeded by train.seed)."""
    eval: str | None = None
    """A separate evaluation file. Give this or `eval_fraction`, not both."""
    eval_fraction: float = 0.0
    """Fraction of the training records held out (seeded by train.seed) for evaluation."""
    format: str = "auto"
    """Record format: auto (detected per file) or a named format (messages, alpaca, sharegpt, ...)."""
    columns: dict[str, str] | None = None
    """Optional column mapping, e.g. {instruction: question, output: answer}."""
    template: str | None = None
    """Chat template: null = the tokenizer's own; or a built-in name (chatml, llama3, ...)."""
    strategy: Strategy = "assistant"
    """Which tokens are trained: assistant (every reply) | last (final reply) | all."""
    turns: Turns = "auto"
    """Which renders become examples: whole (the conversation rendered once; each reply trained as the template
    shows it in history) | per_turn (one example per reply: exactly the prompt inference fed and the reply as it
    was generated, reasoning included; prompts repeat, counted) | last (the final reply only, as generated) |
    auto (per_turn when the template rewrites history, as Qwen3 and Mistral v0.3 do; else whole)."""
    reasoning: Reasoning = "train"
    """An assistant turn's reasoning (reasoning_content, thinking, inline <think>): train (rendered and trained) |
    mask (rendered as context, only the answer trained) | drop (removed before rendering)."""
    max_length: int = 2048
    """Longest example in tokens; longer ones are cut (counted), and dropped if no trained token is left."""
    skip_invalid: bool = False
    """Skip (and count) invalid records instead of stopping at the first one."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. {date_string: '26 Jul 2024'}."""
    fast_bpe: bool = True
    """Tokenize with tiktoken where it gives the tokenizer's own ids (Qwen2/2.5/3, Llama-3; checked,
    and audited as it runs): 2-3x faster preparation. false = the tokenizer alone."""
    batching: Batching = "padded"
    """How examples become micro-batches: padded (to the longest of the batch) | grouped (padded, similar
    lengths together: runs of 50 x batch_size sorted, seeded) | padding_free (each micro-batch one row,
    documents end to end and kept apart) | packed (whole conversations packed into rows of up to max_length,
    best-fit decreasing, never split; batch_size counts rows). Packed and padding-free rows restart
    position_ids per conversation and attention never crosses one. Shorthands: data.packing=true,
    data.padding_free=true, data.group_by_length=true."""
    num_proc: int = 1
    """Processes that render the data (tokenization is most of the preparation)."""
    cache: bool = True
    """Keep the rendered examples on disk, memory-mapped, keyed by everything that changes a token (data files,
    tokenizer, template, settings): a second run with the same inputs starts at once (sftkit.data.store)."""
    cache_dir: str | None = None
    """Where the token cache lives; null = $SFTKIT_CACHE_DIR, else ~/.cache/sftkit/tokens (`sftkit data cache`)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        if isinstance(self.train, str):
            self.train = [self.train]
        _fail_if(not self.train, "data.train", "required: a path or a list of paths")
        self.sources()  # validates every entry
        _fail_if(not 0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", f"{self.eval_fraction} must be in [0, 1)")
        _fail_if(self.eval and self.eval_fraction, "data.eval", "give data.eval or data.eval_fraction, not both")
        _fail_if(self.max_length < 2, "data.max_length", f"{self.max_length} is too short (at least 2 tokens)")
        _fail_if(self.num_proc < 1, "data.num_proc", f"{self.num_proc} must be at least 1")
        if self.strategy == "all" and self.turns in ("per_turn", "last"):
            _fail("data.turns", f"{self.turns} trains assistant replies, but data.strategy=all trains every token: "
                  "drop one of the two")

    def sources(self) -> list[Source]:
        """Every `data.train` entry as a `Source`, in order."""
        out = []
        for i, entry in enumerate(self.train):
            if isinstance(entry, str):
                out.append(Source(entry))
                continue
            if set(entry) - {"path", "weight", "samples"} or not isinstance(entry.get("path"), str):
                _fail(f"data.train[{i}]", f"expected a path or {{path, weight}} / {{path, samples}}, got {entry!r}")
            try:
                out.append(Source(**entry))
            except (TypeError, ValueError) as err:
                _fail(f"data.train[{i}]", str(err))
        return out

    @property
    def packed_documents(self) -> bool:
        """Whether rows hold several documents kept apart (packed or padding-free batches)."""
        return self.batching in ("packed", "padding_free")


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing."""

    __pydantic_config__ = _SCHEMA
    section: ClassVar[str] = "train"

    epochs: int = 1
    """Passes over the training set (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs when set."""
    lr: float = 2e-5
    """Peak learning rate (AdamW), reached after warm-up, then cosine decay to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay; never applied to biases, norms or 1-D parameters."""
    batch_size: int = 4
    """Examples per micro-batch, per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is averaged over every trained token of the window."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (null = no clipping)."""
    seed: int = 0
    """Seeds python, numpy and torch, the data order and the eval split."""
    log_every: int = 10
    """Log loss, lr and throughput every N optimizer steps."""
    eval_every: int = 0
    """Evaluate (loss, perplexity, one sample) every N steps; 0 = only at the end."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps; 0 = only the final model."""
    resume: bool = False
    """Continue from the latest complete checkpoint in output_dir/checkpoints (damaged ones are skipped)."""
    keep_checkpoints: int | None = 3
    """Keep only the newest N checkpoints (older ones are deleted once a new one is safely written); null = all."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient norm: stop (name the step, its records and the last good checkpoint) | skip
    (zero the gradients, no optimizer step for that batch; counted and reported)."""
    sample_prompt: str | None = None
    """Prompt for the sample generated at each eval; default: the first eval example's prompt."""
    sample_max_new_tokens: int = 64
    """Longest sample generated at each eval."""
    eval_max_batches: int | None = None
    """Evaluate on at most this many batches (null = the whole eval split)."""
    eval_every_epoch: bool = False
    """Also evaluate at the end of every epoch (eval loss per epoch: the overfitting curve)."""
    keep_best: bool = False
    """Keep the model with the lowest eval loss so far as output_dir/best/ (written atomically at each new best)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations in a row without a lower eval loss (null = never stop early)."""
    device: str = "auto"
    """auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward: less memory, about a third more compute."""
    compile: bool = False
    """torch.compile each decoder layer (dynamic shapes). Off by default: compiling takes about a minute and
    inductor needs a C++ compiler on CPU; whether it pays depends on the model and the machine — measure it."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How torchrun's processes (`sftkit train --nproc N`) share the work: ddp (each holds the whole model) | fsdp
    (FSDP2: weights, gradients, optimizer state sharded; a layer gathered at a time). docs/distributed.md."""
    mixed_precision: Literal["float32", "bfloat16", "float16"] | None = None
    """With strategy=fsdp: compute in bfloat16 | float16, weights and optimizer in model.dtype (float32 master
    weights: model.dtype=float32), gradients reduced in float32; null = compute in model.dtype."""
    cpu_offload: bool = False
    """With strategy=fsdp on GPUs: keep the sharded weights, gradients and optimizer state in CPU memory."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics.jsonl's rows also go, offline under output_dir (sftkit.trackers): any of tensorboard | trackio
    | mlflow | wandb ([] = metrics.jsonl only); all but tensorboard need pip install 'sftkit[trackers]'."""

    def __post_init__(self) -> None:
        _check_choices(self)
        for name in self.report_to:
            _fail_if(name not in TRACKERS, "train.report_to", f"{name!r} is not one of {', '.join(TRACKERS)}")
        _fail_if(len(set(self.report_to)) != len(self.report_to), "train.report_to", f"{self.report_to}: a tracker twice")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "sample_max_new_tokens": self.sample_max_new_tokens}
        for name, value in positive.items():
            _fail_if(value < 1, f"train.{name}", f"{value} must be at least 1")
        for name in ("max_steps", "eval_max_batches", "early_stopping_patience"):
            value = getattr(self, name)
            _fail_if(value is not None and value < 1, f"train.{name}", f"{value} must be at least 1 (or null)")
        _fail_if(not (self.lr > 0 and math.isfinite(self.lr)), "train.lr", f"{self.lr} must be a positive number")
        _fail_if(self.weight_decay < 0, "train.weight_decay", f"{self.weight_decay} must be >= 0")
        _fail_if(not 0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", f"{self.warmup_ratio} must be in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            _fail("train.max_grad_norm", f"{self.max_grad_norm} must be > 0 (or null)")
        for name in ("eval_every", "save_every"):
            _fail_if(getattr(self, name) < 0, f"train.{name}", f"{getattr(self, name)} must be >= 0")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            _fail("train.keep_checkpoints", f"{self.keep_checkpoints} must be at least 1 (or null to keep all)")
        for name in ("mixed_precision", "cpu_offload"):
            if getattr(self, name) and self.strategy != "fsdp":
                _fail(f"train.{name}", "applies to FSDP's sharded weights: set train.strategy=fsdp too")
        if self.early_stopping_patience and not (self.eval_every or self.eval_every_epoch):
            _fail("train.early_stopping_patience", "needs evaluations during training "
                                                   "(train.eval_every or train.eval_every_epoch)")

    def evaluates_at(self, step: int, steps_per_epoch: int, total_steps: int) -> bool:
        """Whether optimizer step `step` (1-based) ends with an evaluation."""
        return (step == total_steps or bool(self.eval_every and step % self.eval_every == 0)
                or (self.eval_every_epoch and step % steps_per_epoch == 0))

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run."""
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch

    def warmup_steps(self, total_steps: int) -> int:
        return int(self.warmup_ratio * total_steps)


@dataclass
class LoraConfig:
    """Parameter-efficient fine-tuning with PEFT: LoRA, DoRA, and QLoRA on a 4-bit base (see sftkit.lora)."""

    __pydantic_config__ = _SCHEMA
    section: ClassVar[str] = "lora"

    enabled: bool = False
    """Train LoRA adapters on a frozen base instead of every weight; checkpoints and final/ hold the adapter."""
    r: int = 16
    """Rank of the low-rank update B @ A added to each targeted linear layer."""
    alpha: float = 32.0
    """Scale of the update: it is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: str | list[str] = "all-linear"
    """Layers that get adapters: all-linear (every linear layer of the transformer blocks, not lm_head) or names
    such as [q_proj, v_proj]."""
    dora: bool = False
    """DoRA: learn a magnitude per output channel as well as the LoRA direction (slower, often a bit better)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter; null = the embeddings and output head when the chat
    template added new tokens (their rows would never train otherwise), else none; [] = none."""
    quantize: Literal["nf4"] | None = None
    """null, or nf4 for QLoRA: the frozen base in 4-bit NormalFloat (needs a CUDA GPU and bitsandbytes)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _fail_if(self.r < 1, "lora.r", f"{self.r} must be at least 1")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            _fail("lora.alpha", f"{self.alpha} must be a positive number")
        _fail_if(not 0.0 <= self.dropout < 1.0, "lora.dropout", f"{self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]  # one module name, not a regular expression
        names = [] if self.target_modules == "all-linear" else self.target_modules
        if self.target_modules != "all-linear" and not (names and all(map(str.strip, names))):
            _fail("lora.target_modules", "must not be empty: all-linear, or module names like [q_proj, v_proj]")
        if self.quantize and not self.enabled:
            _fail("lora.quantize", "QLoRA trains LoRA adapters on the quantized base: set lora.enabled=true too")
        if self.dora and not self.enabled:
            _fail("lora.dora", "DoRA is a kind of LoRA adapter: set lora.enabled=true too")


@dataclass
class EvalConfig:
    """What is measured at each evaluation besides the eval loss (sftkit.evaluate.monitor)."""

    __pydantic_config__ = _SCHEMA
    section: ClassVar[str] = "eval"

    reference_data: str | None = None
    """Plain text the model should keep knowing (a .txt/.md or {"text"} .jsonl file, read like training
    text); its perplexity is measured before training and at every eval: the forgetting monitor."""
    forgetting_tolerance: float = 0.2
    """Warn when the reference perplexity rises by more than this fraction over the base model's (0.2 = +20%)."""
    tasks: str | None = None
    """A task file (`sftkit eval --tasks`: {prompt|messages, expected, match} or {choices, answer} a line) scored
    at every eval with greedy replies through the chat template: task_accuracy etc. in metrics.jsonl."""
    tasks_max_new_tokens: int = 128
    """Longest reply generated per task item (the same default as `sftkit eval --max-new-tokens`)."""
    best_metric: Literal["eval_loss", "task_accuracy"] = "eval_loss"
    """What train.keep_best and train.early_stopping_patience follow: the lowest eval loss, or the highest
    task accuracy (needs eval.tasks; no eval split needed then)."""

    def __post_init__(self) -> None:
        if not (self.forgetting_tolerance >= 0 and math.isfinite(self.forgetting_tolerance)):
            _fail("eval.forgetting_tolerance", f"{self.forgetting_tolerance} must be a number >= 0")
        if self.tasks_max_new_tokens < 1:
            _fail("eval.tasks_max_new_tokens", f"{self.tasks_max_new_tokens} must be >= 1")
        if self.best_metric == "task_accuracy" and not self.tasks:
            _fail("eval.best_metric", "task_accuracy needs a task file: eval.tasks=FILE")


SECTIONS: tuple[type, ...] = (ModelConfig, DataConfig, TrainConfig, LoraConfig, EvalConfig)


@dataclass
class Config:
    """A whole run: model, data, train, and where everything is written."""

    __pydantic_config__ = _SCHEMA
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/sft"
    """Run directory: sftkit_config.yaml, metrics.jsonl, tb/, loss.png, checkpoints/, final/."""

    def __post_init__(self) -> None:
        tc = self.train
        for name, on in (("keep_best", tc.keep_best), ("early_stopping_patience", tc.early_stopping_patience)):
            if on and not (self.data.eval or self.data.eval_fraction) and self.eval.best_metric == "eval_loss":
                _fail(f"train.{name}", "needs an eval split (data.eval or data.eval_fraction), or a task file to "
                                       "follow (eval.tasks=FILE eval.best_metric=task_accuracy)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML (`sftkit.recipe.load_config` reads it back; checkpoint.save_config writes it)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
