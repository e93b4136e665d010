"""Errors the engine raises: input a user can fix (exit status 2 at the command line), and the
ends of a request other than its result.

A BadInput about one parameter carries its name in `param`, and its message begins with that
name as the Python API spells it: `steps must be in [1, 1000], got 0`. The runtime never words
an error for one surface; each front end says the name its own way with `worded`: the command
line as its flag (`--steps must be ...`), the server as the JSON field of its request body
(`cache.knobs.eps_main does not apply ...`), the Python API as it is."""

from __future__ import annotations


class BadInput(Exception):
    """The user's input is wrong: a missing file, an unknown name, a corrupt table, a bad shape.

    `param`, when given, is the parameter at fault, and `message` begins with it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        if param is not None and not message.startswith(param):
            raise ValueError(f"a BadInput about {param!r} must begin with its name, got {message!r}")
        super().__init__(message)
        self.param = param

    def worded(self, spelling: str | None) -> str:
        """The message with the parameter's name replaced by a front end's `spelling` of it (as it
        is when there is no parameter or no spelling)."""
        message = str(self)
        if self.param is None or spelling is None:
            return message
        return spelling + message[len(self.param) :]


class MissingBundle(BadInput):
    """No engine bundle where one was named: no folder there, or a folder without a manifest (as
    against a bundle that is there but corrupt, a plain BadInput)."""


class Cancelled(Exception):
    """The request was cancelled before it finished."""


class Failed(Exception):
    """The request met an error while it ran; the error is the cause."""


class RankFailure(RuntimeError):
    """A collective of an engine's rank group failed (a rank died, or did not answer within the
    group's timeout): the group cannot run another pass, so the engine must be rebuilt."""
