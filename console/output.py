"""Console output of every layer (the command, the builder, calibration, the benchmarks): results
on stdout, progress on stderr, and third-party chatter (diffusers' calibration lists, exporter
notes) only when verbose (`sencache --verbose`). A leaf: it imports nothing of sencache, so a layer
shows progress without pulling in the command line.

Progress bars go to stderr and vanish when done (`leave=False`); lines printed while a bar is up
go through `say`, which lifts the bar off the terminal first, so bars and results never share a line.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

_verbose = False


def set_verbose(verbose: bool) -> None:
    """Show (True) or capture (False, the default) what third-party libraries print."""
    global _verbose
    _verbose = verbose


def verbose() -> bool:
    return _verbose


def say(line: str) -> None:
    """Print a line to stdout without tearing an active progress bar."""
    with tqdm.external_write_mode(file=sys.stdout):
        print(line, flush=True)


def note(line: str) -> None:
    """Print a progress note to stderr at once (what a long step is doing)."""
    with tqdm.external_write_mode(file=sys.stderr):
        print(line, file=sys.stderr, flush=True)


def progress(iterable: Iterable[T] | None = None, **options: Any) -> tqdm:
    """A progress bar on stderr that is cleared when it closes."""
    return tqdm(iterable, file=sys.stderr, leave=False, dynamic_ncols=True, **options)


@contextlib.contextmanager
def third_party_output(what: str) -> Iterator[io.StringIO]:
    """Capture what Python code inside prints to stdout and stderr (shown as it comes with
    `--verbose`). If the block fails, the captured text goes to stderr so the failure is explained."""
    captured = io.StringIO()
    if _verbose:
        yield captured
        return
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield captured
    except BaseException:
        text = captured.getvalue()
        if text.strip():
            print(f"[{what} printed, before it failed:]\n{text.rstrip()}", file=sys.stderr)
        raise
