"""User mistakes as exception classes, each with the exit status its console script ends with.

Why classes: a console script must tell a mistake the user can fix (a missing file, a bad option,
a malformed metadata line) from a bug. The first deserves one line naming the file, line, key or
flag; the second deserves its traceback. Code that detects a user mistake raises one of these;
everything else is a bug. `fdf_core.console` turns them into exit statuses (README, "Errors and
exit codes"); Python callers catch them like the builtin exceptions they also derive from, so
`except ValueError` / `except FileNotFoundError` keep working.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: its traceback is printed
EXIT_USAGE = 2  # unknown or misspelt option, bad option value, bad config key or value
EXIT_INPUT = 3  # missing or unreadable input file, folder, checkpoint or weights
EXIT_NOTHING_TO_DO = 4  # the input holds nothing to work on (unless --allow_empty true)
EXIT_SKIPPED = 5  # finished, every good item written, but some items were skipped
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_BUG: "a bug: unexpected error, traceback printed",
    EXIT_USAGE: "usage or configuration error (option, config key or value)",
    EXIT_INPUT: "missing or invalid input (file, folder, metadata line, checkpoint, weights)",
    EXIT_NOTHING_TO_DO: "nothing to do: the input selects no work",
    EXIT_SKIPPED: "finished, but some items were skipped (listed in the summary)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class UserError(Exception):
    """A mistake the user can fix. The message is the whole report: it names the file, line, key
    or flag concerned and, where it helps, what to do."""

    exit_code = EXIT_USAGE

    def __str__(self) -> str:  # KeyError-derived subclasses would otherwise quote the message
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(UserError, ValueError):
    """An option, config key or value that cannot work (the flag or key is named)."""

    exit_code = EXIT_USAGE


class InputError(UserError, ValueError):
    """An input that exists but cannot be used: a malformed line, an unreadable image, weights of
    another network (the file and, where there is one, the line are named)."""

    exit_code = EXIT_INPUT


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named (or must provide) that is not there."""

    exit_code = EXIT_INPUT


class MissingAssetError(MissingInputError):
    """Weights or a data file that the user has to provide (names the flag and the variable)."""


class NothingToDoError(UserError, ValueError):
    """The input selects no work: an empty folder, metadata that keeps no record. Usually a wrong
    path; commands that can legitimately meet it take `--allow_empty true`."""

    exit_code = EXIT_NOTHING_TO_DO


class SkippedItemsError(UserError):
    """A batch job finished and wrote every good item, but skipped some (the summary lists them).

    Raised by a console `main` after the summary is printed, so that scripts and schedulers see a
    non-zero status; Python callers of the stage's `run` get the summary instead.
    """

    exit_code = EXIT_SKIPPED

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary
