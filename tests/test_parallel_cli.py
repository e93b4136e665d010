"""`sencache generate --parallel` under the real torchrun on 127.0.0.1 (gloo): two ranks of CFG
parallelism on the ONNX Runtime tiny-wan write the run the one-process command writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sencache.cli import main
from sencache.serving.options import free_port

PROMPTS = ("one small red circle moving left slow on black", "one small red circle moving left fast on black")
BOUND_S = 180.0
"""Longest the two-rank run may take (it takes about 12 s on 2 shared cores)."""


def _arguments(bundle: Path, out: Path) -> list[str]:
    """A batch of two prompts whose SenCache decisions reuse some steps."""
    pairs = [item for i, prompt in enumerate(PROMPTS) for item in ("--prompt", prompt, "--seed", str(3 + i))]
    common = ["--steps", "8", "--eps-main", "0.6", "--threads", "1"]
    return ["generate", "--engine", str(bundle), *pairs, *common, "--out", str(out)]


def test_torchrun_cfg_parallel_writes_the_one_process_run(calibrated_bundle, tmp_path, capsys):
    assert main(_arguments(calibrated_bundle, tmp_path / "one")) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command = [*torchrun, *rendezvous, "-m", "sencache.cli", *_arguments(calibrated_bundle, tmp_path / "two")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    ran = subprocess.run(
        [*command, "--parallel", "cfg=2"], capture_output=True, text=True, timeout=BOUND_S, env=env, check=False
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("NFE") == len(PROMPTS), ran.stdout  # rank 0 alone reports the run

    one, two = (json.loads((tmp_path / name / "stats.json").read_text()) for name in ("one", "two"))
    assert [s["decisions"] for s in two["samples"]] == [s["decisions"] for s in one["samples"]]
    assert 0 < sum(s["nfe"] for s in one["samples"]) < 8 * len(PROMPTS)  # some steps reused
    for a, b in zip(one["samples"], two["samples"], strict=True):
        # the same trace; a score is summed from the ranks' partial sums, in another order
        assert [{**t, "score": None} for t in b["trace"]] == [{**t, "score": None} for t in a["trace"]]
        scores = [(t["score"] or 0.0, u["score"] or 0.0) for t, u in zip(a["trace"], b["trace"], strict=True)]
        np.testing.assert_allclose(*zip(*scores, strict=True), rtol=1e-9)
        frames = np.load(tmp_path / "one" / a["frames"]), np.load(tmp_path / "two" / b["frames"])
        np.testing.assert_allclose(frames[1], frames[0], atol=1e-5, rtol=0)
    assert {k: v for k, v in two.items() if k not in ("samples", "timing")} == {
        k: v for k, v in one.items() if k not in ("samples", "timing")
    }


def test_parallel_without_torchrun_is_one_line_exit_2(calibrated_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    for parallel, reason in (("cfg=2", "start them with torchrun"), ("tp=2", "--parallel must be like")):
        code = main([*_arguments(calibrated_bundle, tmp_path / "out"), "--parallel", parallel])
        err = capsys.readouterr().err
        assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
