"""The README's examples run as written, in order, on the bundle its first command makes.

The demo's bundle (`runs/demo/tiny-wan`) is the shared `demo_bundle` placed where the demo writes
it, in a fresh working folder; the CLI lines run through the command line and the Python example as
a Python program there. A line not run here is listed in NOT_RUN with the test that runs it or why
it cannot run, so a new example is run unless someone says otherwise."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from sencache.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
DEMO_BUNDLE = Path("runs/demo/tiny-wan")
NEEDS_CHECKPOINT = "needs the CogVideoX1.5-5B checkpoint, which nothing here downloads"
NOT_RUN = {
    "pip install -e .": "the environment this suite runs in",
    'pip install -e ".[dev]"': "the environment this suite runs in",
    'pip install -e ".[serve]"': "the environment this suite runs in",
    "python -m pytest": "this test suite",
    "sencache demo --overwrite": "tests/test_demo.py runs the demo on a bundle in its folder",
    "sencache build --model cogvideox ": NEEDS_CHECKPOINT,
    "python engine_builder/build_engine.py --model cogvideox --load-format dummy": "a 5B-parameter build; "
    "tests/test_dummy.py builds a real preset's true width with two blocks",
    "nice -n 15 python -m sencache.benchmarks.real_size": "builds a real-size model (benchmarks/results/real_size)",
    "sencache calibrate --engine bundles/cogvideox": NEEDS_CHECKPOINT,
    "sencache build --model wan2.1-i2v-14b-480p": "needs the Wan 2.1 I2V-14B checkpoint, which nothing here "
    "downloads; tests/test_parity_i2v.py builds the tiny reference of its preset",
    "sencache generate --engine bundles/wan-i2v": "needs that bundle; tests/test_images.py runs generate --image "
    "on the tiny Wan I2V reference",
    "sencache build --model tiny-wan-i2v": "tests/test_tiny_i2v.py builds it, calibrates it from a first frame "
    "and benches it, shortened",
    "python -m sencache.data.clips": "tests/test_tiny_i2v.py runs it",
    "sencache calibrate --engine bundles/tiny-wan-i2v": "tests/test_tiny_i2v.py calibrates the tiny I2V bundle",
    "sencache bench --engine bundles/tiny-wan-i2v": "its full run is benchmarks/results/tiny-wan-i2v (about 20 "
    "minutes); tests/test_tiny_i2v.py runs a short bench",
    "sencache serve --engine runs/demo/tiny-wan": "tests/test_serving.py serves a calibrated tiny-wan on 127.0.0.1",
    "torchrun --nproc-per-node 2 ": "tests/test_parallel_cli.py runs it (python -m torch.distributed.run) on 127.0.0.1",
    "curl -s localhost:8000/v1/videos ": "tests/test_serving.py posts this body to the served tiny-wan",
}
"""The README's lines this test does not run, by how they start, and where they are run instead."""


def examples(text: str) -> list[tuple[str, str]]:
    """The README's examples in order: ("bash", one command; continuation lines joined, `&&` split)
    and ("python", a whole block)."""
    found = []
    for language, block in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        if language == "python":
            found.append(("python", block))
            continue
        for line in block.replace("\\\n", " ").splitlines():
            found += [("bash", " ".join(command.split())) for command in line.split("&&") if command.strip()]
    return found


def _not_run(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def test_every_example_is_run_here_or_by_the_test_named_for_it() -> None:
    """Each bash line is a `sencache` command run below or one NOT_RUN names, and every NOT_RUN
    entry still matches a line (none outlives its example)."""
    listed = examples(README.read_text())
    bash = [command for language, command in listed if language == "bash"]
    assert all(_not_run(c) is not None or c.startswith("sencache ") for c in bash), bash
    assert {start for start in NOT_RUN if any(c.startswith(start) for c in bash)} == set(NOT_RUN)
    assert [language for language, _ in listed].count("python") == 1


def test_readme_examples_run_in_order_on_the_demos_bundle(demo_bundle, tmp_path, monkeypatch, capsys) -> None:
    """generate, bench --quick and the Python example, verbatim, each exiting cleanly and writing
    what the README says (bench --quick: about 4 minutes of the suite on 2 cores)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_bundle, DEMO_BUNDLE)
    ran = []
    for language, example in examples(README.read_text()):
        if language == "python":
            done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
        elif _not_run(example) is None:
            assert main(shlex.split(example)[1:]) == 0, capsys.readouterr().err
        else:
            continue
        ran.append(language if language == "python" else " ".join(example.split()[:2]))
    assert ran == ["sencache generate", "sencache bench", "python"]
    generated = json.loads(Path("runs/x/stats.json").read_text())
    assert [(s["prompt"], s["seed"]) for s in generated["samples"]] == [
        ("two small red circles moving left fast on texture", 1),
        ("one large white square static on black", 2),
    ]
    assert json.loads(Path("runs/bench/report.json").read_text())["runs"]
