"""Streamed checksums: the digest of any size in bounded memory (bundles of tens of GB), and the
chunks' digests of large files, checked on every core."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import pytest

from sencache.runtime.bundle import _matches, list_files
from sencache.runtime.errors import BadInput
from sencache.runtime.files import CHUNK_BYTES, HASH_CHUNK, READ_AHEAD, chunk_digests, sha256
from sencache.runtime.manifest import FileEntry, _Fields, _files


@pytest.mark.parametrize("size", [0, 1, HASH_CHUNK - 1, HASH_CHUNK, HASH_CHUNK + 1, 3 * HASH_CHUNK + 5])
def test_the_streamed_digest_is_sha256(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_a_large_file_is_hashed_in_bounded_memory(tmp_path):
    path = tmp_path / "large"
    with open(path, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(HASH_CHUNK))  # 64 MiB, four times the read-ahead buffers
    tracemalloc.start()
    try:
        sha256(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < READ_AHEAD * HASH_CHUNK + (1 << 20)


@pytest.mark.parametrize("size", [0, 1, 3 * HASH_CHUNK - 1, 3 * HASH_CHUNK, 7 * HASH_CHUNK + 5])
def test_chunk_digests_are_each_chunks_sha256(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    chunk = 2 * HASH_CHUNK + 3  # not a multiple of the read buffer: a chunk ends inside one read
    expected = [hashlib.sha256(data[i : i + chunk]).hexdigest() for i in range(0, size, chunk)]
    assert chunk_digests(tmp_path / "f", chunk) == expected


def test_a_large_file_is_listed_by_chunks_and_a_changed_chunk_is_refused(tmp_path):
    """Past CHUNK_BYTES a file is listed with its chunks' digests (checked on every core), which the
    manifest keeps; a changed byte in the last chunk fails the check; an entry without chunks (a
    bundle written before them) is checked by the whole file's SHA-256."""
    path = tmp_path / "blocks.onnx.data"
    with open(path, "wb") as f:
        f.write(os.urandom(CHUNK_BYTES))
        f.write(os.urandom(HASH_CHUNK))
    entry = list_files(tmp_path)["blocks.onnx.data"]
    assert entry.chunk_bytes == CHUNK_BYTES and len(entry.chunks) == 2
    assert entry.sha256 == sha256(path) and _matches(path, entry)
    assert _files(_Fields({"f": entry.to_json()}, "files")) == {"f": entry}
    whole = FileEntry(entry.bytes, entry.sha256)
    assert _matches(path, whole)
    with open(path, "r+b") as f:
        f.seek(CHUNK_BYTES + 7)
        byte = f.read(1)
        f.seek(CHUNK_BYTES + 7)
        f.write(bytes([byte[0] ^ 1]))
    assert not _matches(path, entry) and not _matches(path, whole)


def test_chunk_lists_that_do_not_fit_the_file_are_refused():
    entry = {"bytes": 3 << 20, "sha256": "0" * 64, "chunk_bytes": 1 << 20, "chunks": ["0" * 64] * 2}
    with pytest.raises(BadInput, match=r"files\.f\.chunks must be the 64-hex-digit SHA-256 of each of the file's 3"):
        _files(_Fields({"f": entry}, "files"))


def test_chunked_checksums_use_bounded_memory(tmp_path):
    path = tmp_path / "large"
    with open(path, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(HASH_CHUNK))
    tracemalloc.start()
    try:
        chunk_digests(path, 2 * HASH_CHUNK)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ((os.cpu_count() or 1) + 1) * HASH_CHUNK + (1 << 20)  # one read buffer per worker
