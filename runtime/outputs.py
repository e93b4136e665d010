"""The files of a generation: raw frames, videos and `stats.json`, written into one run folder
(a partial folder from `files.staged_folder(out, files.RUN)`, swapped in whole when complete)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import CachePolicy
from sencache.runtime.files import write_atomic
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams, Result
from sencache.runtime.video import write_mp4

STATS = "stats.json"


def run_bytes(bundle: Bundle, samples: int) -> int:
    """A generous estimate of a run folder's size: the raw frames, the videos and the stats."""
    shapes = bundle.shapes
    frames = shapes.frames * shapes.height * shapes.width * 3 * 4
    return samples * 2 * frames + (1 << 20)


def stats(
    engine: Model,
    request: GenerationParams,
    policy: CachePolicy,
    result: Result,
    total_s: float,
    files: list[tuple[str, str]],
) -> dict[str, Any]:
    """The stats.json document (the command-line contract, plus the per-step trace)."""
    steps = request.steps
    return {
        "model": engine.preset.name,
        "backend": engine.backend.name,
        "backend_detail": engine.backend.describe(),
        "precision": engine.bundle.manifest.precision,
        "steps": steps,
        "guidance": request.guidance,
        "dynamic_cfg": request.dynamic_cfg,
        "sampling": request.sampling,
        "image": None
        if request.image is None
        else {"sha256": hashlib.sha256(request.image.tobytes()).hexdigest(), "shape": list(request.image.shape)},
        "cache": policy.settings(),
        "timesteps": result.timesteps,
        "samples": [
            {
                "prompt": p,
                "seed": s,
                "nfe": result.nfe[i],
                "decisions": result.decisions[i],
                "frames": files[i][0],
                "video": files[i][1],
                "trace": result.trace[i],
            }
            for i, (p, s) in enumerate(zip(request.prompts, request.seeds, strict=True))
        ],
        "timing": {
            "denoise_s": result.timing["denoise_s"],
            "decision_s": result.timing["decision_s"],
            "total_s": total_s,
            "per_step_s": result.timing["denoise_s"] / steps,
        },
        "warnings": result.warnings,
    }


def write_run(
    folder: Path,
    engine: Model,
    request: GenerationParams,
    policy: CachePolicy,
    result: Result,
    frames: np.ndarray,
    total_s: float,
) -> dict[str, Any]:
    """Write frames (float32 [T, H, W, 3] .npy), MP4s and stats.json into the run's partial `folder`."""
    files = [(f"sample_{i}.npy", f"sample_{i}.mp4") for i in range(len(request.prompts))]
    document = stats(engine, request, policy, result, total_s, files)
    for (npy, mp4), clip in zip(files, frames, strict=True):
        np.save(folder / npy, clip.astype(np.float32))
        write_mp4(clip, folder / mp4)
    write_atomic(folder / STATS, json.dumps(document, indent=1).encode())
    return document
