"""ctest example_policy_loop: the C++ loop with the native rule around the stand-in denoiser must
take the engine's own decisions (the Python rule inside sencache.Engine) and give its frames."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sencache import Engine

PROMPT, SEED, STEPS = "two small blue squares moving right slow on black", 3, 16


def main(example: str, bundle: str, examples_dir: str, work: str) -> int:
    out = Path(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([example, bundle, examples_dir, str(out), str(STEPS), PROMPT, str(SEED)], check=True, env=env)
    ours = json.loads((out / "decisions.json").read_text())
    with Engine.from_bundle(bundle, threads=1) as engine:
        video = engine.generate(PROMPT, seed=SEED, steps=STEPS, cache="sencache")
    theirs = video.stats["decisions"]
    print(f"native loop: {ours}\nengine:      {theirs}")
    assert ours == theirs, "the native rule decided differently from the engine"
    assert "reuse" in theirs, "no reuse at all: the comparison says little"
    diff = float(np.max(np.abs(np.load(out / "frames.npy") - video.frames)))
    print(f"passed: same {len(ours)} decisions ({ours.count('reuse')} reuse), frames max |diff| {diff:.3g}")
    assert diff <= 1e-5
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
