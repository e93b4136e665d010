"""ctest engine_image: build a tiny random Wan 2.1 I2V (diffusers folder and our bundle) unless it
exists, run the C++ image test on it and on tiny-wan, then compare the frames it wrote with
`sencache.Engine.generate` on the same pixels (1e-5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 56, 40
"""The picture engine_image.cpp submits: pixel (y, x, c) = (7 y + 13 x + 101 c) mod 256."""


def picture() -> np.ndarray:
    y, x, c = np.meshgrid(np.arange(HEIGHT), np.arange(WIDTH), np.arange(3), indexing="ij")
    return ((y * 7 + x * 13 + c * 101) % 256).astype(np.uint8)


def main(program: str, t2v_bundle: str, work: str) -> int:
    from sencache.runtime.api import Engine

    root = Path(work)
    bundle = root / "bundle"
    if not (bundle / "manifest.json").exists():
        save = [sys.executable, "-m", "sencache.benchmarks.reference_pipelines", "--save", "wan2.1-i2v-14b-480p"]
        subprocess.run([*save, "--out", str(root)], check=True)
    out = root / "frames.bin"
    subprocess.run([program, str(bundle), t2v_bundle, str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    data = out.read_bytes()
    shape = np.frombuffer(data[:32], np.int64)
    ours = np.frombuffer(data[32:], np.float32).reshape(shape)
    with Engine.from_bundle(bundle, threads=1) as engine:
        video = engine.generate(
            "a red circle moving left", seed=3, steps=3, guidance=5.0, cache="none", image=picture()
        )
    worst = float(np.abs(ours - video.frames).max())
    print(f"frames {list(shape)}: max abs difference to Engine.generate {worst:.2e}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
