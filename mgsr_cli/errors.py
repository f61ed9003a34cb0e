"""The one exception type that the CLI turns into a one-line error message."""


class UsageError(Exception):
    """Bad input from the user (file, flag, model, artifact): reported in one line, exit code 2."""
