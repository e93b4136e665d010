"""The contract between the engine and one model family (Wan, CogVideoX, LTX-Video).

An adapter owns everything that differs between families: the diffusers transformer class and
its configs, how the transformer splits into head / blocks / tail (SPEC section 2), the latent
layout, the timestep units, how classifier-free guidance is batched, the scheduler the real
pipeline uses, and how latents become frames. The runtime, the builder and calibration only talk
to this interface, so a new family is one new module.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sencache.runtime.errors import BadInput


@dataclass(frozen=True)
class StageLayout:
    """Names of the tensors that flow between the stages.

    head(latent, timestep, text) -> streams + block_context + tail_context
    blocks(streams + block_context) -> streams      (the cache holds blocks(s) - s per stream)
    tail(streams + tail_context) -> noise
    `shared` names carry no batch dimension (rotary tables), so they are never gathered.
    """

    streams: tuple[str, ...]
    block_context: tuple[str, ...]
    tail_context: tuple[str, ...]
    shared: tuple[str, ...] = ()

    @property
    def head_outputs(self) -> tuple[str, ...]:
        return self.streams + self.block_context + self.tail_context

    @property
    def blocks_inputs(self) -> tuple[str, ...]:
        return self.streams + self.block_context

    @property
    def tail_inputs(self) -> tuple[str, ...]:
        return self.streams + self.tail_context


HEAD_INPUTS = ("latent", "timestep", "text")
NOISE = "noise"


@dataclass(frozen=True)
class ModelPreset:
    """A named model: its transformer config and what a run of it needs by default."""

    name: str
    family: str
    config: dict[str, Any]
    frames: int
    height: int
    width: int
    tiny: bool = False
    guidance: float = 5.0
    steps: int = 50
    cache_defaults: dict[str, dict[str, float]] = field(default_factory=dict)
    """Default knobs per cache method ("sencache", "teacache", "magcache")."""
    published_baselines: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    """(TeaCache coefficients, MagCache cond-branch ratios) published for this model, if any."""
    description: str = ""


@dataclass(frozen=True)
class Shapes:
    """The shapes a bundle is built for: pixel-space video size and the batch range."""

    frames: int
    height: int
    width: int
    max_batch: int


class FamilyAdapter(ABC):
    """One model family. Subclasses are stateless; presets are class data."""

    family: str
    layout: StageLayout
    modulation: str
    """The head output whose change TeaCache watches (its "modulated input")."""
    presets: dict[str, ModelPreset]

    @abstractmethod
    def transformer_class(self) -> type[nn.Module]:
        """The diffusers transformer class of this family."""

    @abstractmethod
    def latent_shape(self, preset: ModelPreset, shapes: Shapes) -> tuple[int, ...]:
        """Shape of one sample's latent (no batch dimension) for a video of `shapes`."""

    @abstractmethod
    def text_shape(self, preset: ModelPreset) -> tuple[int, int]:
        """(tokens, channels) of one prompt's text embedding as the transformer takes it."""

    @abstractmethod
    def split(self, transformer: nn.Module, preset: ModelPreset, shapes: Shapes) -> dict[str, nn.Module]:
        """The head, blocks and tail stages of `transformer` as modules with tensor-only I/O."""

    @abstractmethod
    def scheduler_config(self, preset: ModelPreset) -> dict[str, Any]:
        """The diffusers scheduler (`_class_name` plus config) that the real pipeline uses."""

    @abstractmethod
    def diffusers_pipeline(self, transformer: nn.Module, scheduler):
        """diffusers' own pipeline of this family around `transformer`, without text encoder or
        VAE (it takes prompt embeddings and returns latents): the reference our loop must match."""

    @abstractmethod
    def decode(self, latents: np.ndarray, preset: ModelPreset) -> np.ndarray:
        """Latents [B, ...] to frames [B, T, H, W, 3] float32 in [0, 1]."""

    def preset(self, name: str) -> ModelPreset:
        try:
            return self.presets[name]
        except KeyError:
            raise BadInput(f"unknown {self.family} model {name!r} (known: {', '.join(self.presets)})") from None

    def build_transformer(self, preset: ModelPreset, weights: Path | None, device: str = "cpu") -> nn.Module:
        """Construct the diffusers transformer; load weights from a diffusers folder when given.

        On `device="meta"` no memory is allocated (shape planning). A real model without
        weights is an error that says what to pass.
        """
        cls = self.transformer_class()
        if weights is None:
            if not preset.tiny and device != "meta":
                raise BadInput(
                    f"{preset.name} needs its weights: pass --weights DIR, a diffusers-format folder "
                    f"with transformer/config.json and transformer/*.safetensors"
                )
            with torch.device(device):
                return cls(**preset.config).eval()
        folder = Path(weights)
        sub = folder / "transformer" if (folder / "transformer").is_dir() else folder
        if not (sub / "config.json").is_file():
            raise BadInput(f"--weights {folder}: no transformer/config.json (expected a diffusers-format folder)")
        if not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
            raise BadInput(f"--weights {folder}: no weight files (*.safetensors) in {sub}")
        config = json.loads((sub / "config.json").read_text())
        if config.get("_class_name") not in (None, cls.__name__):
            raise BadInput(f"--weights {folder}: holds a {config['_class_name']}, not a {cls.__name__}")
        try:
            model = cls.from_pretrained(str(sub))
        except (OSError, ValueError, RuntimeError) as e:
            raise BadInput(f"--weights {folder}: cannot load {cls.__name__}: {e}".splitlines()[0]) from None
        return model.float().eval()

    def make_scheduler(self, preset: ModelPreset, config: dict[str, Any] | None = None):
        """A fresh diffusers scheduler, from the bundle's stored config or the preset's."""
        import diffusers

        config = dict(config or self.scheduler_config(preset))
        cls = getattr(diffusers, config.pop("_class_name"))
        return cls.from_config(config)

    def example_inputs(self, preset: ModelPreset, shapes: Shapes, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random head inputs of the right shapes and dtypes, for export and validation."""
        g = torch.Generator().manual_seed(seed)
        latent = torch.randn((batch, *self.latent_shape(preset, shapes)), generator=g)
        timestep = torch.rand(batch, generator=g) * 1000.0
        text = torch.randn((batch, *self.text_shape(preset)), generator=g)
        return {"latent": latent, "timestep": timestep, "text": text}
