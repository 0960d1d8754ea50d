"""The one exception for bad input data, so users see which file is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path

from segcore.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data. The message reads ``"<file>: <what is wrong>. <fix>"``.

    Build it either from a finished message, ``DataError("a.png: ...")``, or from its parts,
    ``DataError(path, "mask is missing", "add masks/a.png")``; the parts stay available as
    ``path``, ``problem`` and ``fix`` for callers that want to re-word or aggregate errors.
    """

    def __init__(self, path: str | Path, problem: str | None = None, fix: str | None = None) -> None:
        self.path = str(path) if problem is not None else None
        self.problem = problem
        self.fix = fix
        if problem is None:
            message = str(path)
        else:
            message = f"{path}: {problem.rstrip('.')}."
            if fix:
                message += f" {fix.rstrip('.')}."
        super().__init__(message)
