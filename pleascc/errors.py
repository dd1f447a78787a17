"""One exception type for every bad input, so the CLI can print one line and exit 2."""


class PleasccError(Exception):
    """A user-facing error: the message names the cause and the fix, on one line."""
