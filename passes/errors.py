"""One exception type for every bad input, so the CLI can print one line and exit 2."""


class PleasccError(Exception):
    """A user-facing error: the message names the cause and the fix, on one line."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when empty), to embed in a PleasccError."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def model_name(model: int) -> str:
    """A, B, … as messages and reports name the models (past Z, their numbers)."""
    return chr(ord("A") + model) if model < 26 else str(model)
