"""A large bundle's load-time verification against one plain read of the same bytes, at size.

For each bundle, file by file: one plain read, the load-time check (`mismatch`, what
`Bundle.checked_file` runs: the BLAKE3 of each 64 MiB chunk, on every core) and, where the bundle
was written before BLAKE3, its SHA-256 check as loading ran it before, each from disk (the file's
pages evicted first) and from the page cache, summed over the files, interleaved and repeated; with
what one core hashes and copies per second, which bounds the page-cache ratio on a machine of few
cores.

    python -m sencache.benchmarks.verify_speed --bundle B [--bundle B2 ...] --copies DIR --repeats 3

A bundle whose manifest lists SHA-256 is checked as it is for the SHA-256 figures and through a copy
in DIR for the BLAKE3 ones: hard links to its files (no bytes copied, nothing in the bundle changed)
and a manifest rewritten with BLAKE3 digests, which is timed (the cost of hashing a bundle whole).
Writes `benchmarks/results/real_size/verify/<model>-<precision>.json`, one per bundle; the real-size
report (benchmarks/real_size.py) shows them.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

from sencache.runtime.bundle import Bundle, mismatch, write_manifest
from sencache.runtime.files import BLAKE3, BUNDLE, HASH_CHUNK, OWNER, SHA256, staged_folder, write_atomic
from sencache.runtime.manifest import DIGEST, MANIFEST, FileEntry

RESULTS = Path("benchmarks/results/real_size/verify")
COMMAND = "python -m sencache.benchmarks.verify_speed"
TARGET = 1.5
"""The load-time check's aim: within 1.5x of one plain read of the same bytes (issue 23)."""
RESIDENT = 0.99
"""The least share of a bundle resident in the page cache for its cached figures to be read as such."""
RATE_BYTES = 1 << 30
"""Bytes each one-core rate is measured over."""


def read_once(paths: list[Path]) -> float:
    """Seconds to read every byte of `paths` once into one reused buffer (the baseline of verification)."""
    buffer = bytearray(HASH_CHUNK)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (theirs only), so the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(path: Path) -> float:
    """The share of `path`'s pages in the page cache now (mincore), so a cached figure whose bytes
    were evicted meanwhile (other jobs' memory) shows as such."""
    size = path.stat().st_size
    if not size:
        return 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed", str(path))
        pages = -(-size // mmap.PAGESIZE)
        vector = ctypes.create_string_buffer(pages)
        try:
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", str(path))
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vector.raw) / pages


def checked(path: Path, entry: FileEntry) -> None:
    """The load-time check of one listed file (what `Bundle.checked_file` runs), refusing a mismatch."""
    why = mismatch(path, entry)
    if why is not None:
        raise SystemExit(f"{path}: {why}")


def blake3_copy(bundle: Path, copies: Path) -> tuple[Path, float | None]:
    """A bundle whose manifest lists BLAKE3 with the bytes of `bundle`: itself when it lists BLAKE3,
    else its copy in `copies` (hard links and a rewritten manifest, made once; the seconds the
    rewrite hashed for, None when the copy was there already)."""
    manifest = Bundle.load(bundle).manifest
    if all(e.algorithm == BLAKE3 for e in manifest.files.values()):
        return bundle, None
    copy = copies / bundle.name
    if copy.is_dir() and all(e.algorithm == BLAKE3 for e in Bundle.load(copy).manifest.files.values()):
        return copy, None
    with staged_folder(copy, BUNDLE) as folder:
        for entry in sorted(os.listdir(bundle)):
            if entry not in (MANIFEST, DIGEST, OWNER):
                os.link(bundle / entry, folder / entry)
        started = time.perf_counter()
        write_manifest(folder, manifest)
        seconds = time.perf_counter() - started
    return copy, seconds


def one_core_rates() -> dict[str, float]:
    """GB/s of one core: BLAKE3 and SHA-256 of a HASH_CHUNK buffer in cache (as the check hashes each
    read) and a copy of one (what a read out of the page cache does to each buffer, from memory)."""
    source, target = os.urandom(HASH_CHUNK), bytearray(HASH_CHUNK)
    rounds = RATE_BYTES // HASH_CHUNK

    def rate(work: Callable[[], object]) -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            work()
        return RATE_BYTES / (time.perf_counter() - started) / 1e9

    b3, sha = blake3.blake3(max_threads=1), hashlib.sha256()
    return {
        BLAKE3: rate(lambda: b3.update(source)),
        SHA256: rate(lambda: sha.update(source)),
        "copy_in_cache": rate(lambda: target.__setitem__(slice(None), source)),
    }


def measure(bundles: list[Path], copies: Path, repeats: int) -> list[dict[str, Any]]:
    """Per bundle: seconds of the read and of each check of every listed file, from disk and cached,
    summed over its files, `repeats` rounds interleaved across bundles (the checks' order reversed
    every other round). One file at a time: a cached figure needs only that file in the page cache
    (a bundle of 11 GB does not stay there beside other jobs' memory); its share resident is kept."""
    results = []
    for bundle in bundles:
        manifest = Bundle.load(bundle).manifest
        copy, hashed = blake3_copy(bundle, copies)
        checks = {BLAKE3: (copy, Bundle.load(copy).manifest.files)}
        if any(e.algorithm == SHA256 for e in manifest.files.values()):
            checks[SHA256] = (bundle, manifest.files)
        results.append(
            {
                "model": manifest.model,
                "precision": manifest.precision,
                "bundle": str(bundle),
                "blake3_bundle": str(copy),
                "bytes": sum(e.bytes for e in manifest.files.values()),
                "blake3_manifest_s": hashed,
                "seconds": {label: {"disk": [], "cached": []} for label in ["read", *checks]},
                "cached_resident": {label: [] for label in ["read", *checks]},
                "load_average_1m": [],
                "_checks": checks,
                "_names": sorted(manifest.files),
            }
        )
    for round_ in range(repeats):
        for result in results:
            labels = list(result["seconds"])
            for label in labels[::-1] if round_ % 2 else labels:
                result["load_average_1m"].append(os.getloadavg()[0])
                for mode in ("disk", "cached"):
                    total, resident_bytes = 0.0, 0.0
                    for name in result["_names"]:
                        folder, files = result["_checks"].get(label, (Path(result["bundle"]), {}))
                        path = folder / name
                        if mode == "disk":
                            evict([path])
                        else:
                            read_once([path])
                            resident_bytes += resident(path) * path.stat().st_size
                        started = time.perf_counter()
                        if label == "read":
                            read_once([path])
                        else:
                            checked(path, files[name])
                        total += time.perf_counter() - started
                    result["seconds"][label][mode].append(total)
                    if mode == "cached":
                        result["cached_resident"][label].append(resident_bytes / result["bytes"])
                    print(f"{result['model']} {label} {mode}: {total:.2f} s", flush=True)
    rates = one_core_rates()
    for result in results:
        del result["_checks"], result["_names"]
        result["repeats"] = repeats
        result["one_core_gb_per_s"] = rates
        result["cpus"] = os.cpu_count()
        result["command"] = (
            f"{COMMAND} {' '.join(f'--bundle {b}' for b in bundles)} --copies {copies} --repeats {repeats}"
        )
    return results


def ratio(result: dict[str, Any], label: str, mode: str) -> tuple[float, float, float]:
    """Median, least and greatest of a check's seconds over the same round's read."""
    seconds = result["seconds"]
    ratios = [c / r for c, r in zip(seconds[label][mode], seconds["read"][mode], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def section(results: list[dict[str, Any]]) -> list[str]:
    """The report's lines on verification: a table of medians and spreads, and what bounds them."""
    if not results:
        return []
    lines = [
        "## Verification against one read",
        "",
        f"`{results[0]['command']}`: per bundle, file by file, one plain read, the load-time check (BLAKE3 of "
        "each 64 MiB chunk on every core, through a hard-linked copy of the bundle with a BLAKE3 manifest) and the "
        "SHA-256 check of the bundle as it was written, from disk (the file's pages evicted first) and from the "
        f"page cache, summed over the files, interleaved, {results[0]['repeats']} rounds: median seconds, and the "
        "median [least, greatest] of each round's check over that round's read; the share of the bytes resident "
        "in the page cache before the cached figures (least over rounds and measures).",
        "",
        "| bundle | GB | read disk s | BLAKE3 disk s (x read) | SHA-256 disk s (x read) | read cached s | "
        "BLAKE3 cached s (x read) | SHA-256 cached s (x read) | cached resident | load avg (1 min) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cells = []
        for mode in ("disk", "cached"):
            cells.append(f"{statistics.median(r['seconds']['read'][mode]):.2f}")
            for label in (BLAKE3, SHA256):
                if label not in r["seconds"]:
                    cells.append("n/a")
                    continue
                mid, low, high = ratio(r, label, mode)
                cells.append(f"{statistics.median(r['seconds'][label][mode]):.2f} ({mid:.2f} [{low:.2f}, {high:.2f}])")
        loads = r["load_average_1m"]
        cells.append(f"{min(min(shares) for shares in r['cached_resident'].values()):.0%}")
        lines.append(
            f"| {r['model']} {r['precision']} | {r['bytes'] / 1e9:.2f} | {' | '.join(cells)} | "
            f"{statistics.median(loads):.1f} ({min(loads):.1f} to {max(loads):.1f}) |"
        )
    rates = results[0]["one_core_gb_per_s"]
    bounds = ", ".join(
        f"{r['model']} {r['bytes'] / statistics.median(r['seconds']['read']['cached']) / 1e9:.1f} GB/s: "
        f"{1 + r['bytes'] / statistics.median(r['seconds']['read']['cached']) / 1e9 / rates[BLAKE3]:.2f}x"
        for r in results
    )
    lines += [
        "",
        f"One core here hashes {rates[BLAKE3]:.1f} GB/s of BLAKE3 and {rates[SHA256]:.2f} GB/s of SHA-256, and "
        f"copies {rates['copy_in_cache']:.1f} GB/s within its cache, on {results[0]['cpus']} CPUs shared with "
        "other jobs (the load averages above). A read out of the page cache is one copy per byte; the check is "
        "that copy and a hash, so on one core it takes at least 1 + (read GB/s / BLAKE3 GB/s) of the read "
        f"(read from the page cache at {bounds}); only cores free beyond the one the read takes bring it lower.",
    ]
    lines += [
        f"- {r['model']} {r['precision']}, against the target of {TARGET}x one read: {_verdict(r)}." for r in results
    ]
    hashed = [r for r in results if r["blake3_manifest_s"] is not None]
    lines += [
        f"- {r['model']} {r['precision']}: hashing its {r['bytes'] / 1e9:.1f} GB into a BLAKE3 manifest took "
        f"{r['blake3_manifest_s']:.1f} s."
        for r in hashed
    ]
    return lines


def _verdict(result: dict[str, Any]) -> str:
    """The median ratios of a bundle's checks, BLAKE3's against the target."""
    parts = []
    for label in (BLAKE3, SHA256):
        if label in result["seconds"]:
            for mode, where in (("disk", "from disk"), ("cached", "from the page cache")):
                median = ratio(result, label, mode)[0]
                within = f" ({'within' if median <= TARGET else 'over'})" if label == BLAKE3 else ""
                parts.append(f"{label} {where} {median:.2f}x{within}")
    resident = min(min(shares) for shares in result["cached_resident"].values())
    if resident < RESIDENT:
        parts.append(
            f"but as little as {resident:.0%} of the bytes stayed in the page cache for a cached figure (other "
            "jobs' memory), so those reads came partly from disk and their ratios are too low"
        )
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, action="append", required=True, help="a bundle (repeat for several)")
    p.add_argument("--copies", type=Path, required=True, help="where BLAKE3 copies of SHA-256 bundles are made")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS, help="the results folder")
    args = p.parse_args(argv)
    results = measure(args.bundle, args.copies, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    for result in results:
        write_atomic(args.out / f"{result['model']}-{result['precision']}.json", json.dumps(result, indent=1).encode())
    print("\n".join(section(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
