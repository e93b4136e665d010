"""ctest example_policy_loop: the C++ loop with the native rule around the stand-in denoiser must
take the engine's own decisions (the Python rule inside sencache.Engine) and give its frames, with
the bundle's default settings and with a hard NFE budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sencache import Engine

PROMPT, SEED, STEPS, NFE = "two small blue squares moving right slow on black", 3, 16, 9


def main(example: str, bundle: str, examples_dir: str, work: str) -> int:
    for nfe in (None, NFE):  # the bundle's defaults, then a hard NFE budget
        out = Path(work) / ("defaults" if nfe is None else f"nfe{nfe}")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        budget = [] if nfe is None else [str(nfe)]
        command = [example, bundle, examples_dir, str(out), str(STEPS), PROMPT, str(SEED), *budget]
        subprocess.run(command, check=True, env=env)
        ours = json.loads((out / "decisions.json").read_text())
        knobs = None if nfe is None else {"nfe": nfe, "budget": "hard"}
        with Engine.from_bundle(bundle, threads=1) as engine:
            video = engine.generate(PROMPT, seed=SEED, steps=STEPS, cache="sencache", knobs=knobs)
        theirs = video.stats["decisions"]
        print(f"native loop ({knobs}): {ours}\nengine:      {theirs}")
        assert ours == theirs, "the native rule decided differently from the engine"
        assert "reuse" in theirs, "no reuse at all: the comparison says little"
        assert nfe is None or STEPS - theirs.count("reuse") == nfe
        diff = float(np.max(np.abs(np.load(out / "frames.npy") - video.frames)))
        print(f"passed: same {len(ours)} decisions ({ours.count('reuse')} reuse), frames max |diff| {diff:.3g}")
        assert diff <= 1e-5
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
