"""Typed run configuration: YAML recipe + dotted `key=value` overrides, validated, dumped beside the run.

    sftkit train configs/tiny-cpu.yaml train.lr=1e-5 data.max_length=1024 data.train='[a.jsonl, b.jsonl]'
    sftkit config keys [SECTION]        # every key with its type, default and description

Every value on the command line is parsed with `yaml.safe_load`, so `true`, `1e-5`, `null` and
`[a, b]` mean what they look like. Types are checked by pydantic against the dataclasses below
(a docstring under every field is its documentation); cross-field rules are each section's
`__post_init__`. Every problem is a `ConfigError` naming the dotted key
(`train.learning_rate: unknown key — did you mean 'train.lr'?`). The resolved config is written
to `output_dir/config.yaml` and loads again with `load_config`.

This module imports nothing of sftkit: every other module may import it.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
import types
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

DType = Literal["auto", "float32", "bfloat16", "float16"]
Strategy = Literal["assistant", "last", "all"]
Batching = Literal["padded", "grouped", "padding_free", "packed"]
DTYPES: tuple[str, ...] = get_args(DType)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
BATCHING: tuple[str, ...] = get_args(Batching)

# Names other trainers use, so an unknown key can still get a did-you-mean.
ALIASES = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size", "seq_len": "max_length", "max_seq_length": "max_length",
    "torch_dtype": "dtype", "precision": "dtype", "model_name_or_path": "path", "dataset": "train",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_dora": "dora",
}
# Shorthands kept from the first recipes: `data.packing: true` is `data.batching: packed`.
SHORTHANDS = {"packing": "packed", "padding_free": "padding_free", "group_by_length": "grouped"}
_SCHEMA = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ConfigError(ValueError):
    """A config problem, always naming the dotted key it is about."""


def _fail(key: str, problem: str) -> None:
    raise ConfigError(f"{key}: {problem}")


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
        if not self.path:
            _fail("model.path", "required: a local directory with config.json, weights and a tokenizer")
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
        if self.max_length < 2:
            _fail("data.max_length", f"{self.max_length} is too short (at least 2 tokens)")
        if self.num_proc < 1:
            _fail("data.num_proc", f"{self.num_proc} must be at least 1")

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
                out.append(_validate(Source, entry, f"data.train[{i}]"))
            except ConfigError as err:
                raise ConfigError(str(err).replace(f"data.train[{i}]: Value error, ", f"data.train[{i}]: ")) from None
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
    """How the processes of `torchrun` (or `sftkit train --nproc N`) share the work: ddp (each holds the whole
    model; DistributedDataParallel) | fsdp (FSDP2: weights, gradients and optimizer state sharded, one decoder
    layer gathered at a time). Ignored in a single process. See docs/distributed.md."""
    mixed_precision: Literal["float32", "bfloat16", "float16"] | None = None
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

    def __post_init__(self) -> None:
        if not (self.forgetting_tolerance >= 0 and math.isfinite(self.forgetting_tolerance)):
            _fail("eval.forgetting_tolerance", f"{self.forgetting_tolerance} must be a number >= 0")


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
    """Run directory: config.yaml, metrics.jsonl, tb/, loss.png, checkpoints/, final/."""

    def __post_init__(self) -> None:
        tc = self.train
        for name, on in (("keep_best", tc.keep_best), ("early_stopping_patience", tc.early_stopping_patience)):
            if on and not (self.data.eval or self.data.eval_fraction):
                _fail(f"train.{name}", "needs an eval split (data.eval or data.eval_fraction)")

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
        raw = dict(raw)
        if "model" not in raw:
            _fail("model.path", "required: a local directory with config.json, weights and a tokenizer")
        if "data" not in raw:
            _fail("data.train", "required: a path or a list of paths")
        if isinstance(raw.get("data"), dict):
            raw["data"] = _expand_shorthands(raw["data"])
        return _validate(cls, raw, "")


def _expand_shorthands(data: dict[str, Any]) -> dict[str, Any]:
    """`packing: true` -> `batching: packed` (and padding_free, group_by_length); false is the default."""
    data = dict(data)
    chosen = [key for key in SHORTHANDS if data.get(key)]
    if len(chosen) > 1 or (chosen and data.get("batching", "padded") != SHORTHANDS[chosen[0]] and "batching" in data):
        named = [f"data.{k}" for k in chosen] + (["data.batching"] if "batching" in data else [])
        _fail(f"data.{chosen[-1]}", f"choose one way of batching (got {' and '.join(named)}); "
                                    f"data.batching is one of {', '.join(BATCHING)}")
    for key in SHORTHANDS:
        value = data.pop(key, None)
        if value not in (None, True, False):
            _fail(f"data.{key}", f"expected true or false, got {value!r}")
        if value:
            data["batching"] = SHORTHANDS[key]
    return data


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _validate(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """`cls` built from `raw` by pydantic; its first error as a `ConfigError` naming the dotted key."""
    try:
        return _adapter(cls).validate_python(raw)
    except ValidationError as err:
        raise _config_error(err.errors()[0], prefix) from None


def _config_error(error: dict[str, Any], prefix: str) -> ConfigError:
    """One pydantic error in sftkit's words: `section.key: problem`."""
    kind, value = error["type"], error.get("input")
    path = [p for p in error["loc"] if isinstance(p, int) or (isinstance(p, str) and p.isidentifier())]
    key = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    if kind == "value_error":  # raised by a __post_init__: a ConfigError already naming its key
        inner = error.get("ctx", {}).get("error")
        return inner if isinstance(inner, ConfigError) else ConfigError(f"{key}: {inner}")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return _unknown_key(key)
    if kind == "missing" or kind == "missing_argument":
        return ConfigError(f"{key}: required")
    if kind == "literal_error":
        options = error["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return ConfigError(f"{key}: {value!r} is not one of {options}")
    expected = {"float": "a number", "int": "an integer", "bool": "true or false", "string": "a string",
                "dict": "a mapping", "list": "a list", "dataclass": "a mapping"}
    what = next((text for name, text in expected.items() if kind.startswith(name)), None)
    if what is None:
        return ConfigError(f"{key}: {error['msg']} (got {value!r})")
    return ConfigError(f"{key}: expected {what}, got {value!r}")


def _unknown_key(dotted: str) -> ConfigError:
    """`x.y: unknown key — did you mean 'x.z'? (valid keys: ...)`."""
    section, _, name = dotted.rpartition(".")
    known = [f.name for f in fields(Config)] if not section else next(
        ([f.name for f in fields(s)] for s in SECTIONS if s.section == section), [])
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if ALIASES.get(name) in known:
        close = [ALIASES[name]]
    hint = f" — did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"{dotted}: unknown key{hint} (valid keys: {', '.join(prefix + k for k in known)})")


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


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML recipe file, or a `ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, output_dir)")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start empty), apply dotted overrides, validate."""
    raw = read_recipe(path) if path is not None else {}
    return Config.from_dict(apply_overrides(raw, list(overrides)))


def describe_keys(section: str | None = None) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every key, or of one section: `sftkit config keys`."""
    rows = []
    for cls in SECTIONS:
        if section not in (None, cls.section):
            continue
        schema = _adapter(cls).json_schema()["properties"]
        hints = get_type_hints(cls)
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else (
                None if f.default is MISSING else f.default)
            value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            doc = " ".join(schema[f.name].get("description", "").split())
            rows.append((f"{cls.section}.{f.name}", _type_name(hints[f.name]), value, doc))
    if section in (None, "output_dir"):
        rows.append(("output_dir", "str", "runs/sft", "Run directory: config.yaml, metrics.jsonl, tb/, loss.png, "
                                                      "checkpoints/, final/."))
    if not rows:
        names = [cls.section for cls in SECTIONS] + ["output_dir"]
        raise ConfigError(f"{section}: no such section (one of {', '.join(names)})")
    return rows


def _type_name(hint: Any) -> str:
    """`int | None`, `assistant | last | all`, `list[str]`: a type as a person reads it."""
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(map(str, get_args(hint)))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(hint))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(hint))}]"
    return "any" if hint is Any else getattr(hint, "__name__", str(hint))
