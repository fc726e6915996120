"""Failures the user can fix, told apart from bugs.

``train.py`` prints a :class:`UserError`'s message alone (no traceback) and exits 1; any
other exception keeps its traceback. A missing or unwritable file, a full disk and a missing
package are the user's to fix wherever they happen (:func:`is_user_error`); a ``ValueError``
is only while a run reads its inputs (:func:`about_inputs`), where every one names a flag, a
config key or a data file.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

# Disk full, over quota, read-only file system.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class UserError(Exception):
    """A failure the user can fix; its message says how."""


class InputError(UserError, ValueError):
    """A bad flag, config value or data file (still a ``ValueError`` for callers)."""


@contextmanager
def about_inputs() -> Iterator[None]:
    """Turns a ``ValueError`` raised inside into an :class:`InputError` with its message."""
    try:
        yield
    except ValueError as error:
        if isinstance(error, UserError):
            raise
        raise InputError(str(error)) from error


def disk_full(error: BaseException) -> bool:
    """``error`` says the disk is full: ``ENOSPC`` (or quota, read-only), or torch's zip
    writer's ``unexpected pos`` / ``PytorchStreamWriter failed`` (``inline_container.cc``)."""
    if isinstance(error, OSError):
        return error.errno in _DISK_ERRNOS
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "unexpected pos" in text or "PytorchStreamWriter failed" in text)


def is_user_error(error: BaseException) -> bool:
    """Whether ``train.py`` reports ``error`` as one message instead of a traceback."""
    return isinstance(error, (UserError, FileNotFoundError, PermissionError, IsADirectoryError,
                              NotADirectoryError, ImportError)) or disk_full(error)


def message(error: BaseException) -> str:
    """The one line (or paragraph) ``train.py`` prints for a user error."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.strerror}: {error.filename}"
        if disk_full(error):
            text += " (free some space, or write the run elsewhere with --out)"
        return text
    return str(error)
