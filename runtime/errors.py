"""Errors the engine raises: input a user can fix (exit status 2 at the command line), and the
ends of a request other than its result."""


class BadInput(Exception):
    """The user's input is wrong: a missing file, an unknown name, a corrupt table, a bad shape."""


class Cancelled(Exception):
    """The request was cancelled before it finished."""


class Failed(Exception):
    """The request met an error while it ran; the error is the cause."""
