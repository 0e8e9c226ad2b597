"""The one error type for bad user input: the CLI prints it and exits with status 2."""


class InputError(ValueError):
    """Bad user input (a config field, a file, a value); the message names what is wrong."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name when empty), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def input_error_of(exc: BaseException) -> InputError | None:
    """The InputError an exception is or carries (a Ray task's error keeps the worker's as its cause), else None."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, InputError):
        return cause
    return exc if isinstance(exc, InputError) else None
