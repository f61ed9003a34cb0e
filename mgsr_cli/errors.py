"""The one exception type that the CLI turns into a one-line error message, and the one line
that any other failure (OS errors, damaged weights, bad flags) is reported as."""

from __future__ import annotations

import errno


class UsageError(Exception):
    """Bad input from the user (file, flag, model, artifact): reported in one line, exit code 2."""


def error_line(error: BaseException) -> str:
    """One line naming what went wrong and where, for any exception."""
    if isinstance(error, UsageError):
        return str(error)
    if is_parse_error(error):
        return error.format_message().replace("\n", " ")
    if isinstance(error, OSError) and error.errno is not None:
        where = f" '{error.filename}'" if error.filename else ""
        what = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit is reached", errno.EROFS: "read-only file system"}
        return f"cannot access{where}: {what.get(error.errno, error.strerror or errno.errorcode.get(error.errno, ''))}"
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return f"{type(error).__name__}: {text}"


def is_parse_error(error: BaseException) -> bool:
    """A flag Click/Typer could not parse (Typer vendors its own Click, so match by shape)."""
    return callable(getattr(error, "format_message", None)) and hasattr(error, "exit_code")
