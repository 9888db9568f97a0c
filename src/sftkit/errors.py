"""Errors meant for people: the CLI prints these as one clear message instead of a traceback.

Asked only once something has gone wrong (`sftkit.cli.main`), and it imports nothing: an error
can only be an instance of a class whose module is already loaded, so the classes are looked up
among the loaded modules. A bad config therefore fails in a fraction of a second, without torch.
"""

from __future__ import annotations

import sys

# module -> its exception classes that describe a user's mistake or the machine's state
USER_ERRORS: dict[str, tuple[str, ...]] = {
    "sftkit.config": ("ConfigError",),
    "sftkit.data.messages": ("DataError",),
    "sftkit.data.templates": ("TemplateError",),
    "sftkit.data.fast_bpe": ("FastBPEMismatch",),
    "sftkit.model": ("ModelError",),
    "sftkit.durable": ("UnsafePathError",),
    "sftkit.faults": ("NumericalFault", "OutputNotWritable"),
    "sftkit.checkpoint": ("CheckpointWriteError",),
}


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that describe a user's mistake or the machine's state, not a bug of sftkit:
    `OSError` (a missing file, a full disk, ...) and those of `USER_ERRORS` whose modules are loaded."""
    classes: list[type[BaseException]] = [OSError]
    for name, class_names in USER_ERRORS.items():
        module = sys.modules.get(name)
        if module is not None:
            classes += [getattr(module, class_name) for class_name in class_names]
    return tuple(classes)
