"""Does a tiny model follow its prompt? Colour and motion read back from generated clips.

    python -m sencache.engine_builder.tiny.evaluate --engine bundles/tiny-cogvideox

Generates one-object clips on black for every colour and every motion (static, and left / right /
up / down at both speeds), uncached, and reads back from the frames: the colour (mean of the
bright pixels, nearest colour of the palette the clips were drawn with) and the motion (the
object's circular centroid across frames: static below 0.4 pixel per frame, else the dominant
direction). Prints and returns the accuracy of each against the prompt, and chance levels.
"""

from __future__ import annotations

import argparse
import json
from itertools import product
from pathlib import Path

import numpy as np
import torch

from sencache.console.output import progress
from sencache.data.clips import RGB, STEP
from sencache.data.grammar import COLOURS, DIRECTIONS, PromptSpec
from sencache.runtime.cache import NoCache
from sencache.runtime.errors import BadInput
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams

STATIC_BELOW = 0.4
"""Pixels per frame under which a centroid counts as not moving."""


def cases() -> list[PromptSpec]:
    """Every colour with every motion class, one small or large circle or square on black."""
    motions = [(None, None)] + [(d, s) for d, s in product(DIRECTIONS, ("slow", "fast"))]
    specs = []
    for i, (colour, (direction, speed)) in enumerate(product(COLOURS, motions)):
        specs.append(
            PromptSpec(
                "one", ("small", "large")[i % 2], colour, ("circle", "square")[i // 2 % 2], direction, speed, "black"
            )
        )
    return specs


def read_colour(clip: np.ndarray) -> str | None:
    """The palette colour nearest to the mean of the clip's bright pixels (None if none are)."""
    mask = clip.max(axis=-1) > 0.25
    if mask.sum() < 4:
        return None
    mean = clip[mask].mean(axis=0)
    return min(RGB, key=lambda name: float(np.sum((np.asarray(RGB[name]) - mean) ** 2)))


def read_motion(clip: np.ndarray) -> str | None:
    """static, left, right, up or down from the brightness-weighted circular centroid per frame."""
    frames, height, width, _ = clip.shape
    weight = np.clip(clip.max(axis=-1) - 0.25, 0.0, None)
    if weight.sum() == 0:
        return None
    angles = {"y": 2 * np.pi * np.arange(height) / height, "x": 2 * np.pi * np.arange(width) / width}
    centre = []
    for f in range(frames):
        w = weight[f]
        wy, wx = w.sum(axis=1), w.sum(axis=0)
        y = np.angle(np.sum(wy * np.exp(1j * angles["y"]))) * height / (2 * np.pi)
        x = np.angle(np.sum(wx * np.exp(1j * angles["x"]))) * width / (2 * np.pi)
        centre.append((y, x))
    steps = np.diff(np.asarray(centre), axis=0)
    steps = (steps + np.array([height, width]) / 2) % np.array([height, width]) - np.array([height, width]) / 2
    velocity = np.median(steps, axis=0)
    if np.hypot(*velocity) < STATIC_BELOW:
        return "static"
    return max(STEP, key=lambda d: float(np.dot(STEP[d], velocity)))


def evaluate(engine: Model, steps: int | None = None, batch: int = 4, show_progress: bool = True) -> dict:
    """Accuracy of colour and motion over `cases()`, uncached (a progress bar on stderr per batch)."""
    if not engine.preset.tiny:
        raise BadInput("evaluate reads the clips of the bundled tiny models (RGB latents) only")
    steps = steps or engine.bundle.manifest.defaults.steps
    batch = max(1, min(batch, engine.bundle.shapes.max_batch))
    specs = cases()
    rows = []
    starts = range(0, len(specs), batch)
    for start in progress(starts, desc="evaluate", unit="batch", disable=not show_progress):
        chunk = specs[start : start + batch]
        request = GenerationParams(
            [s.prompt for s in chunk],
            [1000 + start + i for i in range(len(chunk))],
            steps,
            engine.bundle.manifest.defaults.guidance,
        )
        clips = engine.decode(engine.generate(request, NoCache(len(chunk))).latents)
        for spec, clip in zip(chunk, clips, strict=True):
            rows.append(
                {
                    "prompt": spec.prompt,
                    "colour": read_colour(clip),
                    "motion": read_motion(clip),
                    "want_motion": spec.direction or "static",
                }
            )
    colour = np.mean([r["colour"] == s.colour for r, s in zip(rows, specs, strict=True)])
    motion = np.mean([r["motion"] == r["want_motion"] for r in rows])
    return {
        "clips": len(rows),
        "colour_accuracy": float(colour),
        "motion_accuracy": float(motion),
        "chance": {"colour": 1 / len(COLOURS), "motion": 1 / 5},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="write the per-clip readings here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    engine = Model.open(args.engine, threads=1)
    bundle = engine.bundle
    report = evaluate(engine)
    print(
        f"{bundle.manifest.model}: colour {report['colour_accuracy']:.0%} (chance 12%), "
        f"motion {report['motion_accuracy']:.0%} (chance 20%) over {report['clips']} one-object clips on black"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
