"""Errors that reach the user as one line (the CLI prints them and exits with code 2)."""


class UsageError(ValueError):
    """A bad input: the message names the value and the fix."""
