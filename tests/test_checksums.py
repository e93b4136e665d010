"""Streamed checksums: the digest of any size in bounded memory (bundles of tens of GB)."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import pytest

from sencache.runtime.files import HASH_CHUNK, READ_AHEAD, sha256


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
