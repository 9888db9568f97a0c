"""Typed run configuration: YAML recipe + dotted `key=value` overrides, validated, dumped beside the run.

    sftkit train configs/tiny-cpu.yaml train.lr=1e-5 data.max_length=1024 data.train='[a.jsonl, b.jsonl]'

Every value on the command line is parsed with `yaml.safe_load`, so `true`, `1e-5`, `null` and
`[a, b]` mean what they look like. Unknown keys and bad values are errors that name the key
(`train.learning_rate: unknown key — did you mean 'train.lr'?`). The resolved config is written
to `output_dir/config.yaml` and can be loaded again with `load_config`.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from sftkit.data.mixing import MixSpec

# Names other trainers use, so an unknown key can still get a did-you-mean.
ALIASES = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size", "seq_len": "max_length", "max_seq_length": "max_length",
    "torch_dtype": "dtype", "precision": "dtype", "model_name_or_path": "path", "dataset": "train",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_dora": "dora",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("assistant", "last", "all")
QUANTIZE = ("nf4",)


class ConfigError(ValueError):
    """A config problem, always naming the dotted key it is about."""


def _fail(key: str, problem: str) -> None:
    raise ConfigError(f"{key}: {problem}")


@dataclass
class ModelConfig:
    """Which local model to fine-tune and how to load it."""

    section: ClassVar[str] = "model"

    path: str = ""
    """Local directory holding a Hugging Face model + tokenizer (sftkit never downloads)."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16; auto = bfloat16 on CUDA, float32 on CPU."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the model directory. Off unless you trust that directory."""
    allow_pickle: bool = False
    """Also load pickled weights (pytorch_model.bin), which can run code when unpickled; off = safetensors only."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa | eager | flash_attention_2 | ..."""

    def __post_init__(self) -> None:
        if not self.path:
            _fail("model.path", "required: a local directory with config.json, weights and a tokenizer")
        if self.dtype not in DTYPES:
            _fail("model.dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not self.attn_implementation:
            _fail("model.attn_implementation", "must not be empty (e.g. 'sdpa' or 'eager')")


@dataclass
class DataConfig:
    """Which files to train on and how conversations become tokens and masks."""

    section: ClassVar[str] = "data"

    train: list[str | dict[str, Any]] = field(default_factory=list)
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
    strategy: str = "assistant"
    """Which tokens are trained: assistant (every reply) | last (final reply) | all."""
    max_length: int = 2048
    """Longest example in tokens; longer ones are cut (counted), and dropped if no trained token is left."""
    skip_invalid: bool = False
    """Skip (and count) invalid records instead of stopping at the first one."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. {date_string: '26 Jul 2024'}."""
    fast_bpe: bool = True
    """Tokenize with tiktoken where it gives the tokenizer's own ids (Qwen2/2.5/3, Llama-3; checked,
    and audited as it runs): 2-3x faster preparation. false = the tokenizer alone."""
    packing: bool = False
    """Pack whole conversations into rows of up to max_length tokens (best-fit decreasing; never split or
    cropped); position_ids restart per conversation and attention never crosses one. batch_size counts rows."""
    padding_free: bool = False
    """Put each micro-batch's conversations end to end in one row (no padding), kept apart like packing."""
    group_by_length: bool = False
    """Padded batches of similar lengths: sort within runs of 50 x batch_size shuffled examples (seeded)."""

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if not self.train:
            _fail("data.train", "required: a path or a list of paths")
        self.sources()  # validates every entry
        if not 0.0 <= self.eval_fraction < 1.0:
            _fail("data.eval_fraction", f"{self.eval_fraction} must be in [0, 1)")
        if self.eval and self.eval_fraction:
            _fail("data.eval", "give data.eval or data.eval_fraction, not both")
        if self.strategy not in STRATEGIES:
            _fail("data.strategy", f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.max_length < 2:
            _fail("data.max_length", f"{self.max_length} is too short (at least 2 tokens)")
        chosen = [name for name in ("packing", "padding_free", "group_by_length") if getattr(self, name)]
        if len(chosen) > 1:
            _fail(f"data.{chosen[1]}", f"choose one of data.packing, data.padding_free, data.group_by_length "
                                       f"(got {' and '.join(chosen)})")

    def sources(self) -> list[tuple[str, MixSpec]]:
        """(path, how much of it) for every `data.train` entry, in order."""
        out = []
        for i, entry in enumerate(self.train):
            if isinstance(entry, str):
                out.append((entry, MixSpec()))
                continue
            unknown = set(entry) - {"path", "weight", "samples"}
            if unknown or not isinstance(entry.get("path"), str):
                _fail(f"data.train[{i}]", f"expected a path or {{path, weight}} / {{path, samples}}, got {entry!r}")
            try:
                out.append((entry["path"], MixSpec(weight=entry.get("weight"), samples=entry.get("samples"))))
            except ValueError as err:
                _fail(f"data.train[{i}]", str(err))
        return out

    def paths(self) -> list[str]:
        return [path for path, _ in self.sources()]


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing."""

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
    on_nan: str = "stop"
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
    strategy: str = "ddp"
    """How the processes of `torchrun` (or `sftkit train --nproc N`) share the work: ddp (each holds the whole
    model; DistributedDataParallel) | fsdp (FSDP2: weights, gradients and optimizer state sharded, one decoder
    layer gathered at a time). Ignored in a single process. See docs/distributed.md."""
    mixed_precision: str | None = None
    """With strategy=fsdp: bfloat16 | float16 computes in that dtype while the sharded weights and the optimizer
    stay in model.dtype (float32 master weights: model.dtype=float32) and gradients are reduced in float32;
    null = compute in model.dtype."""
    cpu_offload: bool = False
    """With strategy=fsdp on GPUs: keep the sharded weights, gradients and optimizer state in CPU memory."""

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "sample_max_new_tokens": self.sample_max_new_tokens}
        for name, value in positive.items():
            if value < 1:
                _fail(f"train.{name}", f"{value} must be at least 1")
        for name in ("max_steps", "eval_max_batches", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _fail(f"train.{name}", f"{value} must be at least 1 (or null)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            _fail("train.lr", f"{self.lr} must be a positive number")
        if self.weight_decay < 0:
            _fail("train.weight_decay", f"{self.weight_decay} must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            _fail("train.warmup_ratio", f"{self.warmup_ratio} must be in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            _fail("train.max_grad_norm", f"{self.max_grad_norm} must be > 0 (or null)")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                _fail(f"train.{name}", f"{getattr(self, name)} must be >= 0")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            _fail("train.keep_checkpoints", f"{self.keep_checkpoints} must be at least 1 (or null to keep all)")
        if self.on_nan not in ("stop", "skip"):
            _fail("train.on_nan", f"{self.on_nan!r} is not one of stop, skip")
        if self.strategy not in ("ddp", "fsdp"):
            _fail("train.strategy", f"{self.strategy!r} is not one of ddp, fsdp")
        if self.mixed_precision is not None and self.mixed_precision not in DTYPES[1:]:
            _fail("train.mixed_precision", f"{self.mixed_precision!r} is not one of null, {', '.join(DTYPES[1:])}")
        for name in ("mixed_precision", "cpu_offload"):
            if getattr(self, name) and self.strategy != "fsdp":
                _fail(f"train.{name}", "applies to FSDP's sharded weights: set train.strategy=fsdp too")

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
    quantize: str | None = None
    """null, or nf4 for QLoRA: the frozen base in 4-bit NormalFloat (needs a CUDA GPU and bitsandbytes)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            _fail("lora.r", f"{self.r} must be at least 1")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            _fail("lora.alpha", f"{self.alpha} must be a positive number")
        if not 0.0 <= self.dropout < 1.0:
            _fail("lora.dropout", f"{self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]  # one module name, not a regular expression
        names = [] if self.target_modules == "all-linear" else self.target_modules
        if self.target_modules != "all-linear" and not (names and all(map(str.strip, names))):
            _fail("lora.target_modules", "must not be empty: all-linear, or module names like [q_proj, v_proj]")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            _fail("lora.quantize", f"{self.quantize!r} is not one of null, {', '.join(QUANTIZE)}")
        if self.quantize and not self.enabled:
            _fail("lora.quantize", "QLoRA trains LoRA adapters on the quantized base: set lora.enabled=true too")
        if self.dora and not self.enabled:
            _fail("lora.dora", "DoRA is a kind of LoRA adapter: set lora.enabled=true too")


@dataclass
class EvalConfig:
    """What is measured at each evaluation besides the eval loss (sftkit.evidence.monitor)."""

    section: ClassVar[str] = "eval"

    reference_data: str | None = None
    """Plain text the model should keep knowing (.txt: documents separated by blank lines; .jsonl: {"text"});
    its perplexity is measured before training and at every eval: the forgetting monitor."""
    forgetting_tolerance: float = 0.2
    """Warn when the reference perplexity rises by more than this fraction over the base model's (0.2 = +20%)."""

    def __post_init__(self) -> None:
        if not (self.forgetting_tolerance >= 0 and math.isfinite(self.forgetting_tolerance)):
            _fail("eval.forgetting_tolerance", f"{self.forgetting_tolerance} must be a number >= 0")


@dataclass
class Config:
    """A whole run: model, data, train, and where everything is written."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/sft"
    """Run directory: config.yaml, metrics.jsonl, tb/, loss.png, checkpoints/, final/."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dump(self, path: str | Path) -> Path:
        """Write the resolved config as YAML (loadable again with `load_config`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        return path

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build and validate a config from nested dicts (as read from YAML)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
        _check_keys(raw, _top_level_keys(), "")
        sections = {}
        for sub in (ModelConfig, DataConfig, TrainConfig, LoraConfig, EvalConfig):
            values = raw.get(sub.section) or {}
            if not isinstance(values, dict):
                _fail(sub.section, f"expected a mapping, got {values!r}")
            sections[sub.section] = _build(sub, values)
        output_dir = _coerce("output_dir", raw.get("output_dir", "runs/sft"), str)
        return cls(**sections, output_dir=output_dir)


def _top_level_keys() -> list[str]:
    return ["model", "data", "train", "lora", "eval", "output_dir"]


def _check_keys(values: dict[str, Any], known: list[str], prefix: str) -> None:
    for key in values:
        if key not in known:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            if ALIASES.get(str(key)) in known:
                close = [ALIASES[str(key)]]
            hint = f" — did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(f"{prefix}{k}" for k in known)
            raise ConfigError(f"{dotted}: unknown key{hint} (valid keys: {valid})")


def _build(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate one section, type-checking every value against the field annotations."""
    names = [f.name for f in fields(cls)]
    _check_keys(values, names, f"{cls.section}.")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(f"{cls.section}.{k}", v, hints[k]) for k, v in values.items()}
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    for name in missing:
        if name not in kwargs:
            _fail(f"{cls.section}.{name}", "required")
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check (and gently convert) one value: '1e-5' -> 1e-5 for floats, 'x' -> ['x'] for lists."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if errors else f"{key}: bad value {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        _fail(key, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _fail(key, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _fail(key, f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        _fail(key, f"expected a string, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            _fail(key, f"expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported field type {hint!r}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to nested dicts; values are parsed with yaml.safe_load."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{item!r}: an override reads key=value, e.g. train.lr=1e-5")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: the value {text!r} is not valid YAML ({err.__class__.__name__})") from None
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[:depth + 1])}: is a value, not a section (in {item!r})")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start empty), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, output_dir)")
    return Config.from_dict(apply_overrides(raw, list(overrides)))
