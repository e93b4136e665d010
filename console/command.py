"""How a sencache command line parses and runs, for every entry point that has one: the `sencache`
command and the builder's own script (`engine_builder/build_engine.py`, which must not import the
command). Here so both answer alike without one importing the other.

A bad command line is reported in one line; each option's help shows its default. A run ends in
exit status 0 done; 2 bad input or environment (one line on stderr, nothing written); 1 an internal
error (one line naming the log file with the traceback); 130 interrupted (Ctrl-C or SIGTERM;
partial outputs removed). An error about one parameter names it as the command's flag (`--eps-main`).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from sencache.console.output import set_verbose
from sencache.runtime.errors import BadInput

VERBOSE_HELP = "also show what third-party libraries print (diffusers' calibration lists, exporter notes)"
OURS = "; only folders this tool wrote are ever replaced"
"""The end of every --overwrite help."""

ENVIRONMENT_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.EMFILE,
    errno.ENFILE,
    errno.EBUSY,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: partial outputs are removed on the way out."""


def _signalled(signum: int, frame: FrameType | None) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def one_line(text: object, limit: int = 400) -> str:
    """`text` on one line, cut to `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _crash_log(name: str) -> Path:
    """Write the current exception's traceback to a log file and return its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = f"{name} ({' '.join(sys.argv)})\n{traceback.format_exc()}"
    for folder in (
        Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "sencache",
        Path(tempfile.gettempdir()),
    ):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"sencache-crash-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    return Path("(no writable log folder)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default when it has one (not for unset or off ones); the
    description and epilog keep their line breaks (the prompt grammar)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default == argparse.SUPPRESS:
            return text
        if isinstance(default, (list, tuple)):
            shown = " ".join(str(value) for value in default).replace("%", "%%")
            return f"{text} (default: {shown})"
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit status 2), like every other error,
    and shows each option's default in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def flag(self, param: str | None) -> str | None:
        """The option of this command that sets `param` (its dest), e.g. --eps-main for eps_main;
        None when it has none (the error then names the parameter as the runtime does)."""
        return next(
            (
                action.option_strings[0]
                for action in self._actions
                if param is not None and action.dest == param and action.option_strings
            ),
            None,
        )


def run(name: str, args: argparse.Namespace, failure: Callable[[Exception], str]) -> int:
    """Run the parsed command `args.func(args)` and return its exit status (module docstring).
    `name` starts each line it prints (`sencache build`); `failure` words an internal error's kind."""
    set_verbose(args.verbose)
    handled = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    previous = {signum: signal.signal(signum, _signalled) for signum in handled}
    try:
        args.func(args)
    except BadInput as e:
        print(f"{name}: error: {one_line(e.worded(args.flag(e.param)), 800)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(
            f"{name}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; nothing was left half-written",
            file=sys.stderr,
        )
        return 130
    except MemoryError:
        print(f"{name}: error: out of memory; use fewer samples or a smaller bundle", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRORS:
            return _internal(name, e, failure)
        where = f" ({e.filename})" if e.filename else ""
        print(f"{name}: error: {e.strerror}{where}", file=sys.stderr)
        return 2
    except Exception as e:
        return _internal(name, e, failure)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _internal(name: str, error: Exception, failure: Callable[[Exception], str]) -> int:
    log = _crash_log(name)
    print(f"{name}: {failure(error)}: {one_line(error, 200)}; traceback in {log}", file=sys.stderr)
    return 1
