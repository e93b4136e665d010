"""What the step engine asks of a loaded model: its stages, its device and how a request starts.

`sencache.runtime.model.Model` is the one implementation; the step engine's modules (scheduler,
pass runner, preparation) name this protocol instead of the class, so the model can run a request
through the step engine (`Model.generate`) without the two importing each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from sencache.runtime.backends.base import StageBackend
    from sencache.runtime.bundle import Bundle
    from sencache.runtime.cache import CachePolicy
    from sencache.runtime.drift_meter import CudaDriftMeter, HostDriftMeter
    from sencache.runtime.families.base import FamilyAdapter, Sampler, StageLayout


DriftMeter = Union["HostDriftMeter", "CudaDriftMeter"]


class Denoiser(Protocol):
    """A bundle's head / blocks / tail stages on one backend, with its family's sampler."""

    bundle: Bundle
    backend: StageBackend
    adapter: FamilyAdapter
    layout: StageLayout
    max_rows: int
    numel: int
    """Elements of one sample's latent."""
    latent_shape: tuple[int, ...]

    def policy(self, method: str, steps: int, batch: int, knobs: Mapping[str, float | str | None]) -> CachePolicy:
        """The cache rule `method` for one request; unset knobs take the bundle's defaults."""
        ...

    def embeddings(self, given: np.ndarray | None, prompts: list[str], param: str) -> np.ndarray:
        """Text embeddings of `prompts`, or `given` (the request's parameter `param`) checked against the bundle."""
        ...

    def sampler(self, steps: int, sampling: str = "engine") -> Sampler:
        """A fresh sampler of `steps` steps."""
        ...

    def conditions(self, image: np.ndarray | None, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """The head's image inputs of each sample ({} for a text-to-video model)."""
        ...

    def start_latents(self, noise: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """The latents a run starts from (the noise, and the image where the family puts it there)."""
        ...

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        """The starting noise of each sample."""
        ...

    def to_device(self, value: np.ndarray) -> torch.Tensor:
        """A host array on the backend's device."""
        ...

    def stream(self) -> contextlib.AbstractContextManager:
        """The context every device operation of the engine runs in."""
        ...

    def drift_meter(self, per_sample: int) -> DriftMeter:
        """The fused drift reduction of this device over `per_sample` elements of each sample."""
        ...
