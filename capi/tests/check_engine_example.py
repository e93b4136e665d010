"""ctest example_engine: run the C++ two-request example, then `sencache generate` on the same
prompts and seeds, and compare frames (1e-5) and NFE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

PROMPTS = ["one small red circle static on black", "two small blue squares moving right slow on black"]
SEEDS = [1, 2]
STEPS = 12


def main(example: str, bundle: str, work: str) -> int:
    out = Path(work)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([example, bundle, str(out), str(STEPS)], check=True, env=env)
    worst = 0.0
    for k, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        run = out / f"generate_{k}"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sencache.cli",
                "generate",
                "--engine",
                bundle,
                "--prompt",
                prompt,
                "--seed",
                str(seed),
                "--steps",
                str(STEPS),
                "--threads",
                "1",
                "--out",
                str(run),
                "--overwrite",  # a rerun of ctest in the same build tree replaces the run it made before
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        ours = np.load(out / f"request_{k}.npy")
        theirs = np.load(run / "sample_0.npy")
        assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
        diff = float(np.max(np.abs(ours - theirs)))
        worst = max(worst, diff)
        nfe = int((out / f"request_{k}.nfe").read_text())
        want = json.loads((run / "stats.json").read_text())["samples"][0]["nfe"]
        print(f"request {k}: frames {list(ours.shape)}, max |diff| {diff:.3g}, NFE {nfe} (generate: {want})")
        assert diff <= 1e-5, f"request {k}: frames differ from sencache generate by {diff}"
        assert nfe == want, f"request {k}: NFE {nfe} but sencache generate took {want}"
    print(f"passed: both requests equal to sencache generate (max |diff| {worst:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
