"""Recipes: a YAML file plus dotted `key=value` overrides, read into a validated `Config`.

    sftkit train configs/tiny-cpu.yaml train.lr=1e-5 data.max_length=1024 data.train='[a.jsonl, b.jsonl]'
    sftkit config keys [SECTION]        # every key with its type, default and description

Every value on the command line is parsed with `yaml.safe_load`, so `true`, `1e-5`, `null` and
`[a, b]` mean what they look like. Paths written in a recipe (model.path, data.train, data.eval, a
data.template .jinja file, eval.reference_data, output_dir) are read from the recipe's own directory,
so a recipe runs from any working directory; paths given on the command line, and the default
output_dir, are read from the working directory. Both become absolute, so the resolved config written
beside every run (sftkit_config.yaml) is itself a recipe that means the same wherever it is read. Types and unknown keys are checked by pydantic against the
dataclasses of `sftkit.config`; every problem is a `ConfigError` naming the dotted key
(`train.learning_rate: unknown key — did you mean 'train.lr'?`).
"""

from __future__ import annotations

import difflib
import os
import types
from dataclasses import MISSING, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import TypeAdapter, ValidationError

from sftkit.config import BATCHING, SECTIONS, Config, ConfigError

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


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start empty), apply dotted overrides, validate.

    Relative paths in the recipe are resolved against the recipe's directory; those of the overrides
    (and the default output_dir) against the working directory (`resolve_paths`)."""
    raw = resolve_paths(read_recipe(path), Path(path).parent) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    if isinstance(raw, dict) and "output_dir" not in raw:
        raw["output_dir"] = next(f.default for f in fields(Config) if f.name == "output_dir")
    return config_from_dict(resolve_paths(raw, Path.cwd()))


def resolve_paths(raw: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """`raw` with every relative path made absolute against `base`: model.path, data.train (paths and the
    `path` of `{path, weight}` entries), data.eval, data.template when it names a .jinja file,
    eval.reference_data and output_dir. `~` is expanded; anything that is not a string is left for
    validation to report."""
    root = os.path.abspath(base)

    def absolute(value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            return value
        return os.path.normpath(os.path.join(root, os.path.expanduser(value)))

    raw = dict(raw)
    sections = {name: dict(raw[name]) for name in ("model", "data", "eval") if isinstance(raw.get(name), dict)}
    raw.update(sections)
    if "model" in sections and "path" in sections["model"]:
        sections["model"]["path"] = absolute(sections["model"]["path"])
    data = sections.get("data", {})
    train = data.get("train")
    if isinstance(train, str):
        data["train"] = absolute(train)
    elif isinstance(train, list):
        data["train"] = [absolute(entry) if isinstance(entry, str) else
                         {**entry, "path": absolute(entry.get("path"))} if isinstance(entry, dict) else entry
                         for entry in train]
    for key in ("eval",) + (("template",) if str(data.get("template") or "").endswith(".jinja") else ()):
        if key in data:
            data[key] = absolute(data[key])
    if "eval" in sections and "reference_data" in sections["eval"]:
        sections["eval"]["reference_data"] = absolute(sections["eval"]["reference_data"])
    if "output_dir" in raw:
        raw["output_dir"] = absolute(raw["output_dir"])
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a config from nested dicts (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    if "model" not in raw:
        raise ConfigError("model.path: required: a local directory with config.json, weights and a tokenizer")
    if "data" not in raw:
        raise ConfigError("data.train: required: a path or a list of paths")
    if isinstance(raw.get("data"), dict):
        raw["data"] = _expand_shorthands(raw["data"])
    return _validate(Config, raw, "")


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
        doc = next(f for f in fields(Config) if f.name == "output_dir")
        rows.append(("output_dir", "str", doc.default, " ".join(
            _adapter(Config).json_schema()["properties"]["output_dir"].get("description", "").split())))
    if not rows:
        names = [cls.section for cls in SECTIONS] + ["output_dir"]
        raise ConfigError(f"{section}: no such section (one of {', '.join(names)})")
    return rows


def _expand_shorthands(data: dict[str, Any]) -> dict[str, Any]:
    """`packing: true` -> `batching: packed` (and padding_free, group_by_length); false is the default."""
    data = dict(data)
    chosen = [key for key in SHORTHANDS if data.get(key)]
    if len(chosen) > 1 or (chosen and data.get("batching", "padded") != SHORTHANDS[chosen[0]] and "batching" in data):
        named = [f"data.{k}" for k in chosen] + (["data.batching"] if "batching" in data else [])
        raise ConfigError(f"data.{chosen[-1]}: choose one way of batching (got {' and '.join(named)}); "
                          f"data.batching is one of {', '.join(BATCHING)}")
    for key, batching in SHORTHANDS.items():
        value = data.pop(key, None)
        if value not in (None, True, False):
            raise ConfigError(f"data.{key}: expected true or false, got {value!r}")
        if value:
            data["batching"] = batching
    return data


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _validate(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """`cls` built from `raw` by pydantic; its first error as a `ConfigError` naming the dotted key."""
    try:
        return _adapter(cls).validate_python(raw)
    except ValidationError as err:
        raise _config_error(err.errors()[0], prefix, cls) from None


def _config_error(error: dict[str, Any], prefix: str, cls: type | None = None) -> ConfigError:
    """One pydantic error in sftkit's words: `section.key: problem`."""
    kind, value = error["type"], error.get("input")
    path = [p for p in error["loc"] if isinstance(p, int) or (isinstance(p, str) and p.isidentifier())]
    key = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    if kind == "value_error":  # raised by a __post_init__: a ConfigError already naming its key
        inner = error.get("ctx", {}).get("error")
        return inner if isinstance(inner, ConfigError) else ConfigError(f"{key}: {inner}")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return _unknown_key(key)
    if kind in ("missing", "missing_argument"):
        return ConfigError(f"{key}: required")
    if kind == "literal_error":
        options = error["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        hint: Any = cls
        for part in path:  # the key's declared type, e.g. Literal["nf4"] | None
            hint = get_type_hints(hint).get(part) if isinstance(part, str) and isinstance(hint, type) else None
        if type(None) in get_args(hint):  # an optional choice: null is one too
            options = "null, " + options
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
    close = [prefix + c for c in difflib.get_close_matches(name, known, n=1, cutoff=0.5)]
    if ALIASES.get(name) in known:
        close = [prefix + ALIASES[name]]
    elsewhere = [f"{s.section}.{name}" for s in SECTIONS if name in {f.name for f in fields(s)}]
    if elsewhere and f"{prefix}{name}" not in elsewhere:  # `lr=...` means train.lr, not the close word `lora`
        close = elsewhere[:1]
    hint = f" — did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{dotted}: unknown key{hint} (valid keys: {', '.join(prefix + k for k in known)})")


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
