"""The folders and files this tool writes: owned, locked, staged, swapped in whole.

Every output folder (an engine bundle, a generation run, a bench report) is assembled in a partial
folder beside its target and swapped into place only when complete. Guarantees:

- Ownership. A folder is ours only when it holds `OWNER`, a marker that only this tool writes,
  naming the kind of folder and every file the tool put in it. Replacing a target needs it to be
  absent, empty, or ours of the same kind and holding nothing else; otherwise nothing is touched.
- One writer. A lock per target (`flock` on a hidden lock file beside it, removed on release) makes
  a second writer fail at once instead of racing; a killed writer's lock dies with it.
- Crash safety. Partial folders are named `.NAME.sencache-partial.*` and carry the marker from
  their first moment, so the next writer of NAME sweeps them; the swap is one atomic
  `renameat2(RENAME_EXCHANGE)` where the filesystem has it, else two renames that the next writer
  completes or rolls back (never deleting the only complete copy).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import queue
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import blake3
from tqdm import tqdm

from sencache.runtime.errors import BadInput

HASH_CHUNK = 1 << 18
"""The read buffer of a checksum: small enough to stay in a core's L2 cache, so the hash reads the
bytes the copy out of the page cache has just written there instead of reading memory twice."""
LARGE_FILE = 1 << 30
"""Files this large show a progress bar while they are hashed."""
CHUNK_BYTES = 1 << 26
"""A file is listed by the digest of each 64 MiB chunk (`chunk_digests`), which a check hashes on
every core at once and which names the chunk that differs."""
BLAKE3 = "blake3"
"""The digest of bundles written now: 4 to 5x SHA-256's bytes per second on one core here (AVX-512),
so a check costs about a copy of the bytes rather than several."""
SHA256 = "sha256"
"""The digest of bundles written before BLAKE3, still checked."""


class Hash(Protocol):
    """What a checksum needs of a hash object (hashlib's and blake3's have it)."""

    def update(self, data: memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


ALGORITHMS: dict[str, Callable[[], Hash]] = {BLAKE3: lambda: blake3.blake3(max_threads=1), SHA256: hashlib.sha256}
"""A new hash object per algorithm. One thread per BLAKE3 hash: the parallelism is across chunks."""

OWNER = ".sencache-owner.json"
"""The ownership marker: {"tool": "sencache", "kind": ..., "state": "partial"|"complete", "files": [...]}."""
BUNDLE = "bundle"
"""The kind of an engine bundle folder."""
RUN = "run"
"""The kind of a generation run folder (videos, frames, stats.json)."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync and a rename."""
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


def digest_of(data: bytes | memoryview, algorithm: str, chunk_bytes: int) -> list[str]:
    """The `algorithm` digest of each `chunk_bytes` chunk of bytes in memory (one for empty data),
    as `chunk_digests` lists a file's."""
    view = memoryview(data)
    digests = []
    for offset in range(0, max(len(view), 1), chunk_bytes):
        h = ALGORITHMS[algorithm]()
        h.update(view[offset : offset + chunk_bytes])
        digests.append(h.hexdigest())
    return digests


def chunk_digests(path: Path, algorithm: str = BLAKE3, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """The `algorithm` digest of each `chunk_bytes` chunk of a file (one for an empty file), hashed
    on every core at once.

    Chunks are independent: each worker reads its chunk with `pread` into its own HASH_CHUNK buffer
    and hashes it (both release the GIL), so reading and hashing overlap across workers, memory
    stays at one buffer per worker whatever the file's size, and the kernel reads ahead of each
    worker's sequential reads. A progress bar on stderr for files of LARGE_FILE or more. A whole-file
    digest is one chunk of the file's size (one worker)."""
    size = Path(path).stat().st_size
    offsets = range(0, max(size, 1), chunk_bytes)
    workers = min(len(offsets), os.cpu_count() or 1)
    buffers: queue.Queue[bytearray] = queue.Queue()
    for _ in range(workers):
        buffers.put(bytearray(HASH_CHUNK))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "posix_fadvise"):  # a larger read-ahead (Linux)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        with (
            tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                desc=f"checksum {Path(path).name}",
                disable=size < LARGE_FILE,
                leave=False,
                file=sys.stderr,
            ) as bar,
            ThreadPoolExecutor(workers, thread_name_prefix="checksum") as pool,
        ):

            def digest(offset: int) -> str:
                buffer = buffers.get()
                try:
                    return _digest_range(fd, offset, min(chunk_bytes, size - offset), algorithm, buffer, bar)
                finally:
                    buffers.put(buffer)

            return list(pool.map(digest, offsets))
    finally:
        os.close(fd)


def _digest_range(fd: int, offset: int, length: int, algorithm: str, buffer: bytearray, bar: tqdm) -> str:
    """The `algorithm` digest of `length` bytes of `fd` from `offset`, read through `buffer`."""
    h, view, done = ALGORITHMS[algorithm](), memoryview(buffer), 0
    while done < length:
        n = os.preadv(fd, [view[: min(len(buffer), length - done)]], offset + done)
        if not n:
            raise OSError(errno.EIO, "the file ended before its listed size")
        h.update(view[:n])
        bar.update(n)
        done += n
    return h.hexdigest()


def _listing(folder: Path) -> list[str]:
    """Every entry below `folder` that is not a folder (files and links), as relative POSIX names."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or not p.is_dir())


def read_owner(folder: Path) -> dict | None:
    """The ownership marker of `folder`, or None when it has none (or an unreadable one)."""
    marker = Path(folder) / OWNER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        owner = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(owner, dict) and owner.get("tool") == "sencache" and isinstance(owner.get("files"), list)):
        return None
    return owner


def _write_owner(folder: Path, kind: str, state: str) -> None:
    files = [name for name in _listing(folder) if name != OWNER]
    document = {"tool": "sencache", "kind": kind, "state": state, "pid": os.getpid(), "files": files}
    write_atomic(folder / OWNER, json.dumps(document, indent=1).encode())


def check_replaceable(target: Path, kind: str) -> None:
    """Refuse (BadInput, nothing touched) unless `target` is absent, an empty folder, or a complete
    folder of `kind` that this tool wrote and that holds nothing the tool did not write."""
    target = Path(target)
    if target.is_symlink():
        raise BadInput(f"output {target} is a symbolic link; name a real folder")
    if not target.exists():
        return
    if not target.is_dir():
        raise BadInput(f"output {target} is a file, not a folder; choose another path")
    present = _listing(target)
    if not present:
        return
    owner = read_owner(target)
    if owner is None:
        raise BadInput(
            f"output {target} holds files this tool did not write (no {OWNER}): it is not ours to "
            f"replace; choose another folder"
        )
    if owner.get("kind") != kind:
        raise BadInput(f"output {target} holds a sencache {owner.get('kind')}, not a {kind}; choose another folder")
    stray = sorted(set(present) - set(owner["files"]) - {OWNER})
    if stray:
        raise BadInput(
            f"output {target} holds {stray[0]!r}, which this tool did not write: nothing was replaced; "
            f"move it away or choose another folder"
        )


def check_output(target: Path, kind: str, overwrite: bool) -> None:
    """`check_replaceable`, and unless `overwrite`, refuse to replace an earlier output: a target
    that holds anything (which that check has found to be this tool's `kind`). Cheap: call it
    before any work, so that a rerun into the same folder stops at once instead of replacing it."""
    check_replaceable(target, kind)
    target = Path(target)
    if not overwrite and target.is_dir() and _listing(target):
        raise BadInput(
            f"overwrite not given: {target} already holds a sencache {kind}; give it to replace that {kind}, "
            f"or choose another folder",
            param="overwrite",
        )


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold the write lock of `target` (BadInput at once if another process holds it)."""
    target = Path(target)
    lock_path = target.with_name(f".{target.name}.sencache-lock")
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise BadInput(f"cannot write beside {target}: {e.strerror} ({lock_path.parent})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BadInput(
                f"output {target} is being written by another sencache process; try again when it finishes"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino  # not unlinked by a releasing holder
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def _partials(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.sencache-partial.*"))


def _remove_ours(folder: Path) -> None:
    """Delete a leftover folder only if it carries our marker (or is empty): never a user's."""
    if folder.is_symlink() or not folder.is_dir():
        return
    if read_owner(folder) is not None or not any(folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def recover(target: Path) -> None:
    """Finish what a crashed writer of `target` left (call with its lock held): put the previous
    complete folder back if the swap stopped between its two renames, then sweep stale partials."""
    target = Path(target)
    old = target.with_name(f".{target.name}.sencache-old")
    if old.is_dir() and read_owner(old) is not None:
        if not target.exists() and not target.is_symlink():
            os.rename(old, target)
        else:
            _remove_ours(old)
    for partial in _partials(target):
        _remove_ours(partial)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_into_place(partial: Path, target: Path) -> None:
    if not target.exists():
        os.rename(partial, target)
        return
    if _exchange(partial, target):
        shutil.rmtree(partial, ignore_errors=True)  # now the previous folder; a crash here leaves a swept partial
        return
    old = target.with_name(f".{target.name}.sencache-old")
    os.rename(target, old)
    os.rename(partial, target)  # a crash between the renames is rolled back by recover()
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(source: Path, folder: Path) -> None:
    """Seed `folder` with the files of `source` (hard links: no bytes copied), but not its marker."""
    for name in _listing(source):
        if name == OWNER:
            continue
        src, dst = source / name, folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)


@contextmanager
def staged_folder(target: Path, kind: str, seed: bool = False) -> Iterator[Path]:
    """Yield a partial folder beside `target`; on success it replaces `target` whole.

    Enter it BEFORE the expensive work: it takes the lock, recovers after a crashed writer, checks
    that `target` may be replaced and that its parent is writable. With `seed`, the partial starts
    as hard links to `target`'s files (to rewrite a few files of a large bundle); files in it must
    then be replaced (write_atomic), never written in place. On any exception, a signal included,
    the partial is removed and `target` is left as it was.
    """
    target = Path(target)
    check_replaceable(target, kind)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create {target.parent}: {e.strerror}") from None
    with output_lock(target):
        recover(target)
        check_replaceable(target, kind)
        partial = target.with_name(f".{target.name}.sencache-partial.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            partial.mkdir(mode=0o755)
            _write_owner(partial, kind, "partial")
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise BadInput(f"cannot write output {target}: {e.strerror}") from None
        try:
            if seed and target.is_dir():
                _link_or_copy(target, partial)
            yield partial
            _write_owner(partial, kind, "complete")
            _swap_into_place(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """BadInput before the work when `folder`'s filesystem has less than `needed` bytes free."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise BadInput(f"{what} needs about {needed / 2**20:.0f} MiB and {folder} has {free / 2**20:.0f} MiB free")
