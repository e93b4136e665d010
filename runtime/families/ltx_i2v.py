"""LTX-Video image-to-video: the image is the first latent frame, held fixed, with timestep 0.

Facts of the real pipeline (diffusers' LTXImageToVideoPipeline): the image, resized to the video's
size by the pipeline's video processor, is encoded by the VAE with a draw from each sample's own
generator (before its starting noise) and normalized; the starting latent is that frame where the
conditioning mask is 1 (latent frame 0) and the noise elsewhere. Each call gives every token its
own timestep, t * (1 - mask), so the first frame's tokens are embedded at timestep 0; the solver
steps frames 1.. only, so frame 0 stays the image. The transformer is LTX-Video's own (no extra
input channels), so the image is not a head input: the mask depends only on the bundle's grid and
is a constant of the head, and of the sampler that keeps the first frame.

The cache rules read the latent (whose first frame never moves, so it adds nothing to the drift),
the row's timestep (the step's t, as for text-to-video), and TeaCache's modulated input of block 0,
here per token with the first frame's tokens at timestep 0: no rule needs anything new.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from sencache.runtime.families.base import ModelPreset, Sampler, Shapes, register_family
from sencache.runtime.families.ltx import VERSIONS, LTXAdapter, LTXHead, LTXSampler, lightricks_preset


def first_frame_mask(frames: int, height: int, width: int) -> torch.Tensor:
    """The pipeline's conditioning mask, packed: [frames * height * width] tokens, 1 on frame 0."""
    mask = torch.zeros(frames, height, width)
    mask[0] = 1.0
    return mask.flatten()


# `t` is the diffusers transformer, typed Any (see ltx.py).
class _Head(LTXHead):
    """LTX-Video's head with one timestep per token, t * (1 - mask) (LTXVideoTransformer3DModel.forward
    on the pipeline's timestep)."""

    def __init__(self, t: Any, mask: torch.Tensor) -> None:
        super().__init__(t)
        self.keep: torch.Tensor
        self.register_buffer("keep", 1 - mask[None], persistent=False)

    def embed_timestep(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype):
        """The timestep embeddings (temb, embedded), [batch, tokens, C] each: the row's timestep
        on every token but the first frame's, which are at timestep 0."""
        tokens = timestep.flatten()[:, None] * self.keep
        temb, embedded = self.t.time_embed(tokens.flatten(), batch_size=batch, hidden_dtype=dtype)
        return temb.view(batch, -1, temb.size(-1)), embedded.view(batch, -1, embedded.size(-1))


class LTXImageSampler(LTXSampler):
    """LTX-Video's stepping with the first frame held: the solver step is elementwise, so stepping
    every token and keeping frame 0's old values is the pipeline's step of frames 1.. alone."""

    def __init__(self, scheduler, steps: int, mask: torch.Tensor) -> None:
        super().__init__(scheduler, steps, len(mask))
        self.held = mask.bool()[None, :, None]

    def step(
        self, index: int, noise: torch.Tensor, x: torch.Tensor, generators: list[torch.Generator] | None = None
    ) -> torch.Tensor:
        stepped = super().step(index, noise, x, generators)
        return torch.where(self.held.to(x.device), x, stepped.to(x.dtype))


@register_family
class LTXI2VAdapter(LTXAdapter):
    family = "ltx-i2v"
    aliases = {"ltx-video-i2v": "ltx-video-0.9.1-i2v"}
    presets = {
        f"ltx-video-{version}-i2v": lightricks_preset(
            f"ltx-video-{version}-i2v",
            "ltx-i2v",
            version,
            f"Lightricks/LTX-Video {version} (diffusers format) through LTXImageToVideoPipeline",
        )
        for version in VERSIONS
    }

    def mask(self, preset: ModelPreset, shapes: Shapes) -> torch.Tensor:
        return first_frame_mask(*self.grid(preset, shapes))

    def condition_shapes(self, preset: ModelPreset, shapes: Shapes) -> dict[str, tuple[int, ...]]:
        return {"image_latent": self.latent_shape(preset, shapes)}

    def split(self, transformer: Any, preset: ModelPreset, shapes: Shapes) -> dict[str, nn.Module]:
        mask = self.mask(preset, shapes).to(transformer.device)
        return {**super().split(transformer, preset, shapes), "head": _Head(transformer, mask)}

    def sampler(self, scheduler, steps: int, preset: ModelPreset, shapes: Shapes) -> Sampler:
        return LTXImageSampler(scheduler, steps, self.mask(preset, shapes))

    def pipeline_class(self) -> type[Any]:
        from diffusers import LTXImageToVideoPipeline

        return LTXImageToVideoPipeline

    def encode_image(
        self, image: np.ndarray, generators: list[torch.Generator], pipeline, preset: ModelPreset, shapes: Shapes
    ) -> dict[str, torch.Tensor]:
        """The pipeline's prepare_latents for the image: one VAE posterior draw per sample from its
        generator (the encoder runs once: the pipeline encodes the same image per sample),
        normalized, repeated over the frames and packed; the starting noise is drawn next."""
        frames = self.grid(preset, shapes)[0]
        drawn = self.image_draws(image, generators, pipeline, preset, shapes)
        drawn = pipeline._normalize_latents(drawn, pipeline.vae.latents_mean, pipeline.vae.latents_std)
        packed = pipeline._pack_latents(drawn.repeat(1, 1, frames, 1, 1), 1, 1)
        return {"image_latent": packed}

    def start_latents(
        self, noise: torch.Tensor, conditions: dict[str, torch.Tensor], preset: ModelPreset, shapes: Shapes
    ) -> torch.Tensor:
        """The pipeline's init_latents * mask + noise * (1 - mask), on the packed tokens."""
        mask = self.mask(preset, shapes)[None, :, None]
        return conditions["image_latent"] * mask + noise * (1 - mask)
