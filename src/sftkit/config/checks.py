"""The config's building blocks: its choices, its error, and the checks every section runs.

Part of `sftkit.config` (which re-exports all of it); imports nothing of sftkit.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin, get_type_hints

DType = Literal["auto", "float32", "bfloat16", "float16"]
Strategy = Literal["assistant", "last", "all"]
Batching = Literal["padded", "grouped", "padding_free", "packed"]
Turns = Literal["auto", "whole", "per_turn", "last"]
Reasoning = Literal["train", "mask", "drop"]
CONFIG_FILE = "sftkit_config.yaml"  # the resolved config, in every run directory and beside every model written
DTYPES: tuple[str, ...] = get_args(DType)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
BATCHING: tuple[str, ...] = get_args(Batching)
TRACKERS = ("tensorboard", "trackio", "mlflow", "wandb")

# Read by pydantic (sftkit.recipe): no unknown keys; the docstring under a field is its description.
_SCHEMA = {"extra": "forbid", "use_attribute_docstrings": True}


class ConfigError(ValueError):
    """A config problem, always naming the dotted key it is about."""


def _fail(key: str, problem: str) -> None:
    raise ConfigError(f"{key}: {problem}")


def _fail_if(wrong: bool, key: str, problem: str) -> None:
    if wrong:
        _fail(key, problem)


def _check_choices(section: Any) -> None:
    """Every Literal-typed key of `section` holds one of its choices (also when built directly, not from YAML)."""
    for name, hint in get_type_hints(type(section)).items():
        args = get_args(hint)
        literal = hint if get_origin(hint) is Literal else next((a for a in args if get_origin(a) is Literal), None)
        value = getattr(section, name)
        if literal is None or value in get_args(literal) or (value is None and type(None) in args):
            continue
        options = ("null, " if type(None) in args else "") + ", ".join(get_args(literal))
        _fail(f"{section.section}.{name}", f"{value!r} is not one of {options}")
