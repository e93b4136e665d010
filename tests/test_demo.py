"""The README's first command: `sencache demo` runs through and prints what the README shows."""

from __future__ import annotations

import json
import re

import pytest

from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.demo import DEMO_PROMPTS, run_demo
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.model import Model


@pytest.mark.slow
def test_demo_runs_and_prints_each_prompt(tmp_path, capsys):
    """The demo on a tiny-wan bundle it finds in its folder (built and calibrated small here, as
    the demo itself would build it): one line per prompt whose NFE is that of the run it wrote,
    and the speed-up line."""
    out = tmp_path / "demo"
    build(BuildOptions(model="tiny-wan", out=out / "tiny-wan", max_batch=len(DEMO_PROMPTS)), log=lambda _: None)
    engine = Model.open(out / "tiny-wan", threads=1)
    bundle = engine.bundle
    calibration = calibrate(engine, CalibrationPlan(samples=2, steps=8))
    bundle.write_tables(calibration.sensitivity, calibration.baselines)
    capsys.readouterr()

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
