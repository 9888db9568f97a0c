"""Errors meant for people: the CLI prints these as one clear message instead of a traceback."""

from __future__ import annotations

from sftkit.data.messages import DataError
from sftkit.data.render import RenderError
from sftkit.data.templates import TemplateError

USER_ERRORS: tuple[type[BaseException], ...] = (DataError, RenderError, TemplateError, FileNotFoundError, OSError)
