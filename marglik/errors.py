"""The one error type for causes a user can fix, and its kinds.

Every problem a user can fix -- a configuration value, an unavailable device, missing or
undownloadable data, a checkpoint that is damaged, unsafe or from another configuration, a peer
backend that cannot run the model, an installation whose torchvision does not match torch -- is
raised, where its cause is known, as a :class:`UserError` whose ``str`` is one line naming the
cause and the fix. Only the command line turns it into output and an exit status
(:mod:`marglik.cli`: ``marglik: <kind>: <message>``, exit status 2); Python callers catch it like
any exception. The subclasses also derive from the built-in type they replaced (``ValueError``,
``FileNotFoundError``, ``RuntimeError``), so existing ``except`` clauses keep working.

Kinds defined elsewhere, next to their causes: :class:`marglik.tuning.config.ConfigError`,
:class:`marglik.tuning.checkpoint.CheckpointError` (damaged, unsafe, missing, mismatched),
:class:`marglik.tuning.backends.BackendUnsupportedError`, :class:`marglik.tuning.loop.NonFiniteError`.
"""

from __future__ import annotations

__all__ = ["UserError", "DataUnavailableError", "DataSizeError", "IncompatibleInstallError", "one_line"]


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of blanks folded into single spaces.

    Args:
        text: a message, possibly spanning lines.

    Returns:
        The same words on one line.
    """
    return " ".join(str(text).split())


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is one line naming the cause and the fix.

    Attributes:
        kind: the label the command line prints before the message (``marglik: <kind>: ...``):
            ``error``, or ``config error`` for a :class:`~marglik.tuning.config.ConfigError`.
    """

    kind = "error"

    def __str__(self) -> str:
        return one_line(super().__str__())


class DataUnavailableError(UserError, FileNotFoundError):
    """A data set whose files are missing and may not be downloaded, or whose download failed."""


class DataSizeError(UserError, ValueError):
    """A request the data set cannot meet, e.g. more training examples than it holds."""


class IncompatibleInstallError(UserError, RuntimeError):
    """An installed package that cannot work with the installed torch (e.g. a torchvision built
    for another torch release)."""
