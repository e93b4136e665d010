"""Where a bundle's verification spends its time: per file, one plain read against the whole-file
SHA-256 (one core, as bundles without chunk digests are checked) and the chunks' SHA-256 on every
core (as bundles listing them are), each from disk (the file's pages evicted first) and from the
page cache.

    python -m sencache.benchmarks.verify_speed --bundle BUNDLE

Writes `benchmarks/results/real_size/verify/<model>-<precision>.json` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sencache.benchmarks.real_size import evict, read_once
from sencache.runtime.bundle import Bundle
from sencache.runtime.files import CHUNK_BYTES, chunk_digests, sha256, write_atomic

RESULTS = Path("benchmarks/results/real_size/verify")
LARGE = CHUNK_BYTES
"""Files measured one by one (smaller ones are a fraction of a second together)."""


def timed(path: Path, work: Callable[[], object]) -> tuple[float, float]:
    """Seconds of `work` from disk (the file's pages evicted) and then from the page cache."""
    evict([path])
    started = time.perf_counter()
    work()
    disk = time.perf_counter() - started
    started = time.perf_counter()
    work()
    return disk, time.perf_counter() - started


def measure(bundle: Path) -> dict[str, Any]:
    """Per large file: read, whole SHA-256 and chunks, from disk and from the page cache."""
    manifest = Bundle.load(bundle).manifest
    rows = []
    for name, entry in manifest.files.items():
        if entry.bytes <= LARGE:
            continue
        path = bundle / name
        row: dict[str, Any] = {"file": name, "bytes": entry.bytes, "load_average_1m": os.getloadavg()[0]}
        for label, work in (
            ("read", lambda p=path: read_once([p])),
            ("whole", lambda p=path: sha256(p)),
            ("chunks", lambda p=path: chunk_digests(p)),
        ):
            row[f"{label}_disk_s"], row[f"{label}_cached_s"] = timed(path, work)
        rows.append(row)
    total = {k: sum(r[k] for r in rows) for k in rows[0] if k.endswith("_s")} if rows else {}
    return {"model": manifest.model, "precision": manifest.precision, "files": rows, "total": total}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| file | GB | read disk s | whole SHA-256 disk s (x read) | chunks disk s (x read) | read cached s | "
        "whole cached s (x read) | chunks cached s (x read) | load avg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in [*result["files"], {"file": "all", "bytes": sum(f["bytes"] for f in result["files"]), **result["total"]}]:
        disk, cached = r["read_disk_s"], r["read_cached_s"]
        load = f"{r['load_average_1m']:.1f}" if "load_average_1m" in r else ""
        lines.append(
            f"| {r['file']} | {r['bytes'] / 1e9:.2f} | {disk:.2f} | {r['whole_disk_s']:.2f} "
            f"({r['whole_disk_s'] / disk:.2f}) | {r['chunks_disk_s']:.2f} ({r['chunks_disk_s'] / disk:.2f}) | "
            f"{cached:.2f} | {r['whole_cached_s']:.2f} ({r['whole_cached_s'] / cached:.2f}) | "
            f"{r['chunks_cached_s']:.2f} ({r['chunks_cached_s'] / cached:.2f}) | {load} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sencache.benchmarks.verify_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, default=RESULTS, help="the results folder")
    args = p.parse_args(argv)
    result = measure(args.bundle)
    result["cpus"] = os.cpu_count()
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / f"{result['model']}-{result['precision']}.json", json.dumps(result, indent=1).encode())
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
