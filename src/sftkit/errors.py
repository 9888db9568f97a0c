"""Errors meant for people: the CLI prints these as one clear message instead of a traceback.

Imported only once something has gone wrong (`sftkit.cli.main`), so the classes are those of the
modules that raised them; nothing here slows `sftkit --help` down.
"""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that describe a user's mistake or the machine's state, not a bug of sftkit."""
    from sftkit.checkpoint import CheckpointWriteError
    from sftkit.config import ConfigError
    from sftkit.data.fast_bpe import FastBPEMismatch
    from sftkit.data.messages import DataError
    from sftkit.data.templates import TemplateError
    from sftkit.durable import UnsafePathError
    from sftkit.faults import NumericalFault, OutputNotWritable
    from sftkit.model import ModelError

    return (ConfigError, DataError, ModelError, TemplateError, FileNotFoundError, OSError, NumericalFault,
            UnsafePathError, FastBPEMismatch, CheckpointWriteError, OutputNotWritable)
