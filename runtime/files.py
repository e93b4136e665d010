"""Atomic file and folder writes: a crash or an error never leaves a half-written result."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sencache.runtime.errors import BadInput


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_replaceable(target: Path, marker: str) -> None:
    """Refuse to replace anything but an empty folder or one this tool wrote (holding `marker`),
    so a mistyped --out never wipes a user's folder."""
    target = Path(target)
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / marker).is_file())):
        raise BadInput(f"--out {target} exists and holds no {marker}: it is not ours to replace; choose another folder")


@contextmanager
def staged_folder(target: Path, marker: str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it replaces `target` whole.

    `target` must be absent, empty, or a folder this tool wrote (holding `marker`). On any
    exception the temporary folder is removed and `target` is left as it was.
    """
    target = Path(target)
    check_replaceable(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
