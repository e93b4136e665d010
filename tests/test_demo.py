"""The README's first command: `sencache demo` runs through and prints what the README shows."""

from __future__ import annotations

import json
import re
import shutil

from sencache.demo import DEMO_PROMPTS, run_demo
from sencache.runtime.bundle import Bundle


def test_demo_runs_and_prints_each_prompt(demo_bundle, tmp_path, capsys):
    """The demo on a tiny-wan bundle it finds in its folder (the shared one the demo itself would
    build, calibrated small): one line per prompt whose NFE is that of the run it wrote, and the
    speed-up line."""
    out = tmp_path / "demo"
    shutil.copytree(demo_bundle, out / "tiny-wan")
    assert Bundle.load(out / "tiny-wan").manifest.shapes.max_batch == len(DEMO_PROMPTS)

    run_demo(out, threads=1, repeats=1)

    printed = capsys.readouterr().out
    stats = json.loads((out / "sencache" / "stats.json").read_text())
    for (prompt, seed), sample in zip(DEMO_PROMPTS, stats["samples"], strict=True):
        assert sample["prompt"] == prompt and sample["seed"] == seed
        line = re.search(rf"^{re.escape(prompt)}\s+(\d+)/30\s+([\d.]+)\s+([R.]+)$", printed, re.M)
        assert line, f"no result line for {prompt!r} in:\n{printed}"
        assert int(line[1]) == sample["nfe"] == line[3].count("R")
    assert re.search(r"speed-up .*steps/NFE [\d.]+x", printed)
    assert (out / "none" / "sample_0.mp4").stat().st_size > 0
