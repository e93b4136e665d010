"""ctest fixture bundle_tiny_wan: build the tiny-wan bundle with `sencache build` (and its
sensitivity table with a short `sencache calibrate`: 2 samples of 12 steps, enough for tests), unless
it exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(out: str) -> int:
    bundle = Path(out)
    if not (bundle / "manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "sencache.cli", "build", "--model", "tiny-wan", "--out", str(bundle)], check=True
        )
    if not (bundle / "sensitivity.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sencache.cli",
                "calibrate",
                "--engine",
                str(bundle),
                "--samples",
                "2",
                "--steps",
                "12",
            ],
            check=True,
        )
    print(f"bundle ready: {bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
