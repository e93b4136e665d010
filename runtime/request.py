"""A generation request (one sample or a few) and its undecoded result.

Every check of a request's own values is here, so a bad request is refused with one message
naming the parameter before it is queued, whichever surface (command line, Python API, server)
made it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sencache.runtime.errors import BadInput
from sencache.runtime.manifest import MAX_STEPS

SAMPLINGS = ("engine", "reference")
"""The values of a request's `sampling`: the bundle's scheduler as the family's diffusers pipeline
configures it, or the schedule the SenCache authors' code samples the family with (Wan T2V: shift 5.0)."""


@dataclass(frozen=True)
class Request:
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    prompt_embeds: np.ndarray | None = None
    """Text embeddings [B, tokens, channels] computed elsewhere (serving code that caches them);
    `prompts` then only label the samples."""
    negative_prompt_embeds: np.ndarray | None = None
    """The unconditional embeddings for guidance; the empty prompt's when not given."""
    dynamic_cfg: bool = False
    """CogVideoX's `use_dynamic_cfg`: the guidance scale follows the pipeline's cosine schedule."""
    sampling: str = "engine"
    """One of SAMPLINGS: "reference" runs the authors' sampling schedule where the family has one
    (the family adapter's `reference_scheduler`); the bundle's scheduler is never changed."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise BadInput("prompt is missing: give at least one", param="prompt")
        if not all(isinstance(p, str) for p in self.prompts):
            raise BadInput("prompt must be text", param="prompt")
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, np.ndarray) or value.ndim != 3 or len(value) != len(self.prompts):
                shape = list(value.shape) if isinstance(value, np.ndarray) else type(value).__name__
                raise BadInput(f"{name} must be [{len(self.prompts)}, tokens, channels], got {shape}", param=name)
            if not np.all(np.isfinite(value)):
                raise BadInput(f"{name} holds NaN or infinite values", param=name)
        if self.sampling not in SAMPLINGS:
            raise BadInput(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}", param="sampling")
        if len(self.prompts) != len(self.seeds):
            raise BadInput(f"{len(self.prompts)} prompts but {len(self.seeds)} seeds: they pair up one to one")
        if (
            isinstance(self.steps, bool)
            or not isinstance(self.steps, (int, np.integer))
            or not 1 <= self.steps <= MAX_STEPS
        ):
            raise BadInput(f"steps must be in [1, {MAX_STEPS}], got {self.steps!r}", param="steps")
        if (
            isinstance(self.guidance, bool)
            or not isinstance(self.guidance, (int, float))
            or not math.isfinite(self.guidance)
            or self.guidance < 0
        ):
            raise BadInput(f"guidance must be a finite number >= 0, got {self.guidance!r}", param="guidance")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
                raise BadInput(f"seed must be an integer in [0, 2^63), got {seed!r}", param="seed")

    @property
    def cfg(self) -> bool:
        """Whether the request runs an unconditional branch (classifier-free guidance)."""
        return self.guidance > 1.0


@dataclass
class Result:
    latents: np.ndarray
    timesteps: list[float]
    decisions: list[list[str]]
    trace: list[list[dict[str, Any]]]
    timing: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    trajectory: list[np.ndarray] | None = None
    """The denoiser input latent of every step, when recorded (calibration)."""

    @property
    def nfe(self) -> list[int]:
        return [d.count("run") for d in self.decisions]
