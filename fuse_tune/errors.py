"""The one error type for bad input: what the user gave (a file, a field, an argument, a resource) is wrong.

``fuse-tune`` prints a :class:`UserError` as one line and exits with status 2; any other exception is a bug
in fuse and shows its traceback (exit 1). ``--debug`` shows the traceback of a user error too.

Raise it where input from outside the code is refused: study and comparison fields, missing files, command
line arguments, resources a study asks for and the machine lacks, storage that cannot be reached, an
optional dependency that is not installed. Library functions that validate their own arguments (the
optimizers, the workloads, ``TrainConfig``) raise ``ValueError`` as torch does; the places where a user's
settings meet them (the study dry run, ``fuse-tune train``) turn what they refuse into a ``UserError``.

This module imports nothing, so that every layer (the dashboards included) can raise it.
"""

from __future__ import annotations

__all__ = ["UserError", "first_line"]


class UserError(ValueError):
    """Bad input, reported as one line naming what was wrong and what is accepted.

    A ``ValueError`` so that code (and tests) written against the ``ValueError``s these replaced still catch it.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what a one-line error quotes of it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
