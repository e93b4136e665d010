"""Built bundles shared by every test and every xdist worker of one test run.

Each bundle is made once, under a file lock, in a folder named by a hash of its options and of the
bytes of the code and tiny models that decide its content: a change to the builder, the runtime, the
calibration or the tiny weights makes a new key, never a stale bundle. Tests read these folders;
one that changes a bundle works on its own copy.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("engine_builder", "runtime", "calibration", "data", "kernels", "benchmarks/reference_pipelines.py")
"""What a test bundle is made from: the builder with the tiny models' weights, the runtime it
writes manifests and runs calibration with, the calibration, the prompts and clips both draw from,
and the reference pipelines."""


@functools.cache
def source_digest() -> str:
    """SHA-256 over the paths and bytes of every file under SOURCES."""
    digest = hashlib.sha256()
    for source in SOURCES:
        top = ROOT / source
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` held across processes (two workers never make one key at once)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class BundleCache:
    """Folders made once per key under `root`, which every worker of the run shares."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, make: Callable[[Path], object], **options: object) -> Path:
        """The folder `make` fills for `name` with `options`, made now if no worker made it yet.

        `options` must name everything that decides what `make` writes, besides the SOURCES."""
        described = json.dumps({"name": name, **options}, sort_keys=True, default=str)
        key = hashlib.sha256(f"{described}\0{source_digest()}".encode()).hexdigest()[:16]
        folder = self.root / f"{name}-{key}"
        done = self.root / f"{name}-{key}.done"
        with _locked(self.root / f"{name}-{key}.lock"):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
                make(folder)
                done.write_text(described)
        return folder
