"""Procedural training clips for the tiny models: coloured shapes moving over varied backgrounds.

Each clip is drawn from a `PromptSpec` whose prompt says everything the clip shows: how many
objects, their size, colour and shape, whether and how fast they move, and the background. The
specs differ in difficulty on purpose (static vs fast motion, one vs three objects, black vs
textured backgrounds), so denoising trajectories differ per sample and an adaptive cache has
something to adapt to. Clips are float32 [T, H, W, 3] in [0, 1]; the tiny models use them
directly as latents after mapping to [-1, 1].
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from sencache.data.grammar import COUNTS, PromptSpec, random_spec
from sencache.runtime.errors import BadInput
from sencache.runtime.tiny_grammar import parse_prompt

FRAMES, HEIGHT, WIDTH = 8, 32, 32

RGB = {
    "red": (0.95, 0.15, 0.12),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.15),
    "cyan": (0.1, 0.9, 0.9),
    "magenta": (0.9, 0.15, 0.85),
    "white": (0.97, 0.97, 0.97),
    "orange": (0.98, 0.55, 0.1),
}
STEP = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
PIXELS_PER_FRAME = {"slow": 1.0, "fast": 2.5}
RADIUS = {"small": (2.5, 3.5), "large": (5.0, 6.5)}


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    if kind == "black":
        return np.zeros((HEIGHT, WIDTH, 3), np.float32)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / (HEIGHT + WIDTH) * 2
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        a, b = rng.uniform(0.0, 0.45, 3), rng.uniform(0.0, 0.45, 3)
        return (a + (b - a) * ramp[..., None]).astype(np.float32)
    period = rng.uniform(4.0, 9.0)
    angle = rng.uniform(0, np.pi)
    phase = np.cos(angle) * xx + np.sin(angle) * yy
    pattern = np.sign(np.sin(2 * np.pi * phase / period)) * np.sign(np.sin(2 * np.pi * (xx - yy) / period))
    a, b = rng.uniform(0.05, 0.4, 3), rng.uniform(0.05, 0.4, 3)
    return (a + (b - a) * (pattern[..., None] * 0.5 + 0.5)).astype(np.float32)


def render(spec: PromptSpec, rng: np.random.Generator) -> np.ndarray:
    """Draw the clip described by `spec` (positions, exact speed and textures from `rng`)."""
    clip = np.repeat(_background(spec.background, rng)[None], FRAMES, axis=0)
    n = COUNTS.index(spec.count) + 1
    colour = np.asarray(RGB[spec.colour], np.float32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    if spec.direction is None:
        velocity = np.zeros(2, np.float32)
    else:
        velocity = np.asarray(STEP[spec.direction], np.float32) * PIXELS_PER_FRAME[spec.speed] * rng.uniform(0.85, 1.15)
    for _ in range(n):
        radius = rng.uniform(*RADIUS[spec.size])
        start = rng.uniform(0, [HEIGHT, WIDTH])
        for f in range(FRAMES):
            cy, cx = start + velocity * f
            dy = (yy - cy + HEIGHT / 2) % HEIGHT - HEIGHT / 2
            dx = (xx - cx + WIDTH / 2) % WIDTH - WIDTH / 2
            dist = np.sqrt(dy * dy + dx * dx) if spec.shape == "circle" else np.maximum(np.abs(dy), np.abs(dx)) * 1.1
            alpha = np.clip(radius - dist + 0.5, 0.0, 1.0)[..., None]
            clip[f] = clip[f] * (1 - alpha) + colour * alpha
    return clip


def batch(rng: np.random.Generator, size: int) -> tuple[list[str], np.ndarray]:
    """A batch of prompts and their clips [B, T, H, W, 3] in [0, 1]."""
    specs = [random_spec(rng) for _ in range(size)]
    return [s.prompt for s in specs], np.stack([render(s, rng) for s in specs])


def first_frame(prompt: str, seed: int) -> np.ndarray:
    """The first frame of a clip of `prompt` (a sentence of the grammar) drawn with `seed`, as the
    RGB uint8 [H, W, 3] a request to a tiny image-to-video model carries."""
    spec = parse_prompt(prompt)
    if spec is None:
        raise BadInput("the empty prompt describes no clip to take a first frame from")
    return np.round(render(spec, np.random.default_rng(seed))[0] * 255.0).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    """Write the first frame of a clip as a PNG: an image for a tiny image-to-video model."""
    import argparse

    from PIL import Image

    from sencache.runtime.files import write_atomic

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("prompt", help="a sentence of the tiny grammar")
    parser.add_argument("--seed", type=int, default=0, help="draws the clip's positions, speed and textures")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    buffer = io.BytesIO()
    Image.fromarray(first_frame(args.prompt, args.seed)).save(buffer, format="PNG")
    write_atomic(args.out, buffer.getvalue())


if __name__ == "__main__":
    main()
