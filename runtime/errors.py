"""Errors the engine raises for input a user can fix (exit status 2 at the command line)."""


class BadInput(Exception):
    """The user's input is wrong: a missing file, an unknown name, a corrupt table, a bad shape."""
