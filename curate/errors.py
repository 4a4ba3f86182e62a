"""Errors a user can act on. The CLI prints them as one paragraph, no traceback."""

from __future__ import annotations

import errno


class CurateError(Exception):
    """Base class: something the user can fix (recipe, input, output)."""


class RecipeError(CurateError):
    """A recipe problem, located by file, line and key path."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.file, self.line, self.key, self.detail = file, line, key, message
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        if key:
            where += f"{key}: "
        super().__init__(where + message)


class InputError(CurateError):
    """The source data is missing or has the wrong shape."""


class EnvironmentProblem(CurateError):
    """Something this machine or cluster lacks: a model checkpoint, a package, a stage plugin
    that fails to load, a GPU driver. The message says what is missing and how to get it."""


class OutputError(CurateError):
    """The output location cannot be used as asked (e.g. it holds another recipe's run)."""


class SourceError(InputError):
    """Input shards that could not be read while the run was going (a truncated or corrupt file).

    Raised after every other shard has been committed (``runtime.on_source_error: continue``, the
    default) or at the first bad shard (``fail``); either way re-running the same command resumes.
    """


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the output's storage is full: not a bug


class NoSpaceError(OutputError):
    """The output location ran out of space (or quota) while a file was being written."""
