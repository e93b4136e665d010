"""ctest engine_experts: build the tiny two-expert model's PyTorch bundle (tiny-wan2.2) unless it exists, run
the C++ test on it and on tiny-wan, then compare the frames it wrote with `sencache.Engine.generate`
(1e-5): without guidance_2 (guidance for both experts) and with guidance_2 2.0, which must differ."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def main(program: str, one_expert_bundle: str, work: str) -> int:
    from sencache.runtime.api import Engine

    bundle = Path(work) / "tiny-wan2.2"
    if not (bundle / "manifest.json").exists():
        build = ["build", "--model", "tiny-wan2.2", "--backend", "torch", "--out", str(bundle)]  # no export: quick
        subprocess.run([sys.executable, "-m", "sencache.cli", *build], check=True)
    out = Path(work) / "frames.bin"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([program, str(bundle), one_expert_bundle, str(out)], check=True, env=env)
    data = out.read_bytes()
    shape = tuple(np.frombuffer(data[:32], np.int64))
    base, guided = np.frombuffer(data[32:], np.float32).reshape(2, *shape)
    worst = 0.0
    with Engine.from_bundle(bundle, threads=1) as engine:
        for ours, guidance_2 in ((base, None), (guided, 2.0)):
            video = engine.generate(
                "one small red circle moving left fast on black",
                seed=3,
                steps=6,
                guidance=4.0,
                guidance_2=guidance_2,
                cache="none",
            )
            worst = max(worst, float(np.abs(ours - video.frames).max()))
    apart = float(np.abs(base - guided).max())
    print(f"frames {[int(n) for n in shape]}: max abs difference to Engine.generate {worst:.2e}", end="; ")
    print(f"guidance_2 2.0 moves them by up to {apart:.2e}")
    return 0 if worst <= 1e-5 and apart > 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
