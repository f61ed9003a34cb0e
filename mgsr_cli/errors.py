"""The one exception type that the CLI turns into a one-line error message, and the one line
that any other failure (OS errors, damaged weights, bad flags) is reported as."""

from __future__ import annotations

import errno
import signal


class UsageError(Exception):
    """Bad input from the user (file, flag, model, artifact): reported in one line, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the stage stops where a re-run continues (exit 128 + the signal's number).

    `hint` says how to continue; what was written so far is kept.
    """

    def __init__(self, signum: int = signal.SIGINT, hint: str = "the output so far is kept: run the same command again to continue"):
        super().__init__(f"stopped by {signal.Signals(signum).name}; {hint}")
        self.signum = signum


def raise_interrupted(signum: int, frame) -> None:
    """A signal handler: SIGTERM stops a stage as Ctrl-C does, instead of killing it mid-write."""
    raise Interrupted(signum)


def error_line(error: BaseException) -> str:
    """One line naming what went wrong and where, for any exception."""
    if isinstance(error, UsageError):
        return str(error)
    if is_parse_error(error):
        return _parse_error_line(error)
    if isinstance(error, OSError) and error.errno is not None:
        where = f" '{error.filename}'" if error.filename else ""
        what = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit is reached", errno.EROFS: "read-only file system"}
        return f"cannot access{where}: {what.get(error.errno, error.strerror or errno.errorcode.get(error.errno, ''))}"
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return f"{type(error).__name__}: {text}"


def is_parse_error(error: BaseException) -> bool:
    """A flag Click/Typer could not parse (Typer vendors its own Click, so match by shape)."""
    return callable(getattr(error, "format_message", None)) and hasattr(error, "exit_code")


# Typer checks flag values with pydantic; its wording, in the words of config's own checks.
_PYDANTIC_WORDS = {"int_parsing": "expected an integer", "int_from_float": "expected an integer", "int_type": "expected an integer",
                   "float_parsing": "expected a number", "float_type": "expected a number", "bool_parsing": "expected true or false"}


def _parse_error_line(error: BaseException) -> str:
    """A bad flag value as `--flag: what is wrong, got 'value'`, like every other bad value."""
    param, cause = getattr(error, "param", None), error.__cause__
    if param is None or not callable(getattr(cause, "errors", None)) or not cause.errors():
        return error.format_message().replace("\n", " ")
    first = cause.errors()[0]
    flag = max(param.opts, key=len) if param.opts else param.name
    what = _PYDANTIC_WORDS.get(first["type"], first["msg"].removeprefix("Value error, ").rstrip("."))
    shown = "" if repr(first.get("input")) in what else f", got {first.get('input')!r}"
    return f"{flag}: {what}{shown}"
