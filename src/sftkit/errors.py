"""Errors meant for people: the CLI prints these as one clear message instead of a traceback."""

from __future__ import annotations

from sftkit.checkpoint import UnsafePathError
from sftkit.config import ConfigError
from sftkit.data.fast_bpe import FastBPEMismatch
from sftkit.data.messages import DataError
from sftkit.data.render_all import RenderError
from sftkit.data.templates import TemplateError
from sftkit.faults import NumericalFault
from sftkit.model import ModelError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, ModelError, RenderError, TemplateError, FileNotFoundError, OSError,
    NumericalFault, UnsafePathError, FastBPEMismatch,
)
