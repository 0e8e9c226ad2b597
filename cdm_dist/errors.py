"""The one error type for bad user input: the CLI prints it and exits with status 2."""


class InputError(ValueError):
    """Bad user input (a config field, a file, a value); the message names what is wrong."""
