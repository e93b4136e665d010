"""Streamed checksums: the BLAKE3 digest of each chunk of a file of any size in bounded memory,
checked on every core; bundles written before BLAKE3 (SHA-256) still checked; a changed byte
refused naming the file and its chunk; a progress bar on large files."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import blake3
import pytest

from sencache.runtime import files
from sencache.runtime.bundle import Bundle, list_files, mismatch
from sencache.runtime.errors import BadInput
from sencache.runtime.files import BLAKE3, CHUNK_BYTES, HASH_CHUNK, SHA256, chunk_digests, digest_of
from sencache.runtime.manifest import FileEntry, _Fields, _files

NEW = {BLAKE3: lambda b: blake3.blake3(b).hexdigest(), SHA256: lambda b: hashlib.sha256(b).hexdigest()}
"""Each algorithm's digest of bytes in memory, from its own library."""


def _flip(path, offset: int) -> None:
    """Change one bit of the file at `path`, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("algorithm", [BLAKE3, SHA256])
@pytest.mark.parametrize("size", [0, 1, 3 * HASH_CHUNK - 1, 3 * HASH_CHUNK, 7 * HASH_CHUNK + 5])
def test_chunk_digests_are_each_chunks_digest(tmp_path, algorithm, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    chunk = 2 * HASH_CHUNK + 3  # not a multiple of the read buffer: a chunk ends inside one read
    expected = [NEW[algorithm](data[i : i + chunk]) for i in range(0, max(size, 1), chunk)]
    assert chunk_digests(tmp_path / "f", algorithm, chunk) == expected == digest_of(data, algorithm, chunk)


def test_a_whole_file_digest_is_one_chunk_of_its_size(tmp_path):
    data = os.urandom(5 * HASH_CHUNK + 1)
    (tmp_path / "f").write_bytes(data)
    assert chunk_digests(tmp_path / "f", SHA256, len(data)) == [hashlib.sha256(data).hexdigest()]


def test_checksums_use_bounded_memory(tmp_path):
    path = tmp_path / "large"
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(HASH_CHUNK))  # 16 MiB: 64 read buffers
    tracemalloc.start()
    try:
        chunk_digests(path, BLAKE3, 4 * HASH_CHUNK)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (os.cpu_count() or 1) * HASH_CHUNK + (1 << 20)  # one read buffer per worker


def test_large_files_show_progress(tmp_path, capsys, monkeypatch):
    (tmp_path / "small.bin").write_bytes(os.urandom(HASH_CHUNK))
    chunk_digests(tmp_path / "small.bin")
    assert "checksum small.bin" not in capsys.readouterr().err
    monkeypatch.setattr(files, "LARGE_FILE", HASH_CHUNK)  # a tiny file counts as large
    chunk_digests(tmp_path / "small.bin")
    assert "checksum small.bin" in capsys.readouterr().err


def test_new_bundles_list_blake3_chunks_and_name_the_chunk_that_differs(tmp_path):
    """Every file is listed by the BLAKE3 digest of each 64 MiB chunk (one for a small file), which
    the manifest keeps; a changed byte is refused naming the chunk it is in."""
    (tmp_path / "small.json").write_bytes(b"{}")
    path = tmp_path / "blocks.onnx.data"
    with open(path, "wb") as f:
        f.write(os.urandom(CHUNK_BYTES))
        f.write(os.urandom(HASH_CHUNK))
    listed = list_files(tmp_path)
    entry = listed["blocks.onnx.data"]
    assert entry.algorithm == BLAKE3 and entry.chunk_bytes == CHUNK_BYTES and len(entry.chunks) == 2
    assert listed["small.json"].chunks == (blake3.blake3(b"{}").hexdigest(),)
    as_json = json.loads(json.dumps({n: e.to_json() for n, e in listed.items()}))
    assert as_json["small.json"]["algorithm"] == BLAKE3 and "sha256" not in as_json["small.json"]
    assert _files(_Fields(as_json, "files")) == listed
    assert mismatch(path, entry) is None
    _flip(path, CHUNK_BYTES + 7)
    assert mismatch(path, entry) == f"chunk 1 of 2 (bytes {CHUNK_BYTES} to {CHUNK_BYTES + HASH_CHUNK}) differs"
    _flip(tmp_path / "small.json", 0)
    assert mismatch(tmp_path / "small.json", listed["small.json"]) == "its blake3 digest differs"
    assert mismatch(path, FileEntry(entry.bytes - 1, entry.chunks)) == "size differs"


def test_bundles_written_before_blake3_are_checked_by_their_sha256(tmp_path):
    """An entry with the whole file's SHA-256 (and, past 64 MiB, each chunk's) parses as SHA-256,
    matches its file, writes back unchanged, and a changed byte is refused."""
    data = os.urandom(3 * (1 << 20) + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    chunks = [hashlib.sha256(data[i : i + (1 << 20)]).hexdigest() for i in range(0, len(data), 1 << 20)]
    whole = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    chunked = {**whole, "chunk_bytes": 1 << 20, "chunks": chunks}
    parsed = _files(_Fields({"whole": whole, "chunked": chunked}, "files"))
    assert parsed["whole"].algorithm == parsed["chunked"].algorithm == SHA256
    assert parsed["whole"].to_json() == whole and parsed["chunked"].to_json() == chunked
    assert mismatch(path, parsed["whole"]) is None and mismatch(path, parsed["chunked"]) is None
    _flip(path, (2 << 20) + 3)
    assert mismatch(path, parsed["whole"]) == "its sha256 digest differs"
    assert mismatch(path, parsed["chunked"]) == f"chunk 2 of 4 (bytes {2 << 20} to {3 << 20}) differs"


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"bytes": 3 << 20, "sha256": "0" * 64, "chunk_bytes": 1 << 20, "chunks": ["0" * 64] * 2}, "SHA-256|sha256"),
        ({"bytes": 3 << 20, "algorithm": BLAKE3, "chunk_bytes": 1 << 20, "chunks": ["0" * 64] * 2}, BLAKE3),
        ({"bytes": 0, "algorithm": BLAKE3, "chunk_bytes": 1 << 20, "chunks": []}, BLAKE3),
    ],
)
def test_chunk_lists_that_do_not_fit_the_file_are_refused(entry, needle):
    with pytest.raises(BadInput, match=rf"files\.f\.chunks must be the 64-hex-digit ({needle}) digest of each of "):
        _files(_Fields({"f": entry}, "files"))


def test_an_unknown_algorithm_is_refused():
    entry = {"bytes": 1, "algorithm": "md5", "chunk_bytes": 1 << 20, "chunks": ["0" * 64]}
    with pytest.raises(BadInput, match=r"files\.f\.algorithm must be 'blake3', got 'md5'"):
        _files(_Fields({"f": entry}, "files"))


def test_a_bundle_refuses_a_corrupt_file_in_one_line_naming_it(ort_bundle, tmp_path):
    """A bundle written now (BLAKE3) and the same bundle relisted as one written before BLAKE3
    (format 3, whole-file SHA-256) both load and verify, and both refuse a changed byte in one line naming the
    file and the digest that differs."""
    from conftest import relist, reseal

    def as_format_3(manifest: dict, folder: Path) -> None:
        manifest["format"] = "sencache-bundle/3"
        for name in manifest["files"]:
            relist(manifest, folder, name)

    for algorithm in (BLAKE3, SHA256):
        copy = tmp_path / algorithm
        copy.mkdir()
        for name in os.listdir(ort_bundle):
            (copy / name).write_bytes((ort_bundle / name).read_bytes())
        if algorithm == SHA256:
            reseal(copy, lambda m, c=copy: as_format_3(m, c))
        bundle = Bundle.load(copy)
        assert {e.algorithm for e in bundle.manifest.files.values()} == {algorithm}
        bundle.verify_files()
        _flip(copy / "head.onnx", 100)
        with pytest.raises(BadInput) as refused:
            Bundle.load(copy).verify_files()
        message = str(refused.value)
        assert "\n" not in message
        assert message.endswith(
            f"file head.onnx does not match its checksum in manifest.json: its {algorithm} digest differs"
        )
