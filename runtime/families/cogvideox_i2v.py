"""CogVideoX image-to-video: the image's latents concatenated to the noise latent on channels.

Facts of the real pipeline (diffusers' CogVideoXImageToVideoPipeline): the image is resized to the
video's size by the pipeline's video processor, encoded by the VAE with a draw from each sample's
own generator (before its starting noise), scaled by the VAE's scaling factor, and followed by zero
frames up to the latent's frame count; the transformer takes noise and image latents concatenated
on the channel axis (`in_channels` twice the VAE's). CogVideoX-5B-I2V adds learned position
embeddings for its one size (49 x 480 x 720); CogVideoX 1.5-5B-I2V adds an `ofs` embedding of the
constant 2.0 to the timestep embedding. The image latents are the same at every step and for both
guidance rows, so they are a head input; the blocks, tail, sampler and cache rules are CogVideoX's
unchanged (the rules read the noise latent, the timestep and its embedding, and TeaCache's
modulated input is that embedding, to which the constant offset is added in the head).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from sencache.runtime.errors import BadInput
from sencache.runtime.families.base import ModelPreset, Shapes, register_family
from sencache.runtime.families.cogvideox import _TEACACHE_5B, CogVideoXAdapter, thudm_preset

OFS = 2.0
"""The offset CogVideoXImageToVideoPipeline embeds (`ofs_emb`) for models with an ofs embedding."""

# TeaCache's published CogVideoX1.5-5B-I2V polynomial (shared/reference/baseline_constants.json,
# TeaCache @7c10efc4); its CogVideoX-5b one is published for T2V and I2V alike.
_TEACACHE_1_5_I2V = (122.842302, -104.088754, 26.2981677, -0.306009921, 0.037121322)


def _preset(
    name: str, config: dict[str, Any], size: tuple[int, int, int], teacache: tuple[float, ...], description: str
) -> ModelPreset:
    """A CogVideoX 5B I2V model: the 5B transformer (rotary positions) on twice the VAE's channels,
    `config` its own further settings, `size` (frames, height, width) its default video, sampled as
    THUDM publishes it (`thudm_preset`)."""
    config = {
        "num_attention_heads": 48,
        "num_layers": 42,
        "in_channels": 32,
        "use_rotary_positional_embeddings": True,
        **config,
    }
    return thudm_preset(name, "cogvideox-i2v", config, size, teacache, description)


# `t` is the diffusers transformer, typed Any (see cogvideox.py).
class _Head(nn.Module):
    """CogVideoX's head with the image latents after the noise latent's channels, and the ofs
    embedding where the model has one (CogVideoXTransformer3DModel.forward)."""

    def __init__(self, t: Any) -> None:
        super().__init__()
        self.t = t

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image_latent: torch.Tensor):
        t = self.t
        temb = t.time_embedding(t.time_proj(timestep).to(dtype=latent.dtype))
        if t.ofs_embedding is not None:
            offset = t.ofs_proj(latent.new_full((1,), OFS)).to(dtype=latent.dtype)
            temb = temb + t.ofs_embedding(offset)
        tokens = t.patch_embed(text, torch.cat([latent, image_latent], dim=2))
        words = text.shape[1]
        return tokens[:, words:], tokens[:, :words], temb


@register_family
class CogVideoXI2VAdapter(CogVideoXAdapter):
    family = "cogvideox-i2v"
    layout = replace(CogVideoXAdapter.layout, conditions=("image_latent",))
    aliases: dict[str, str] = {}
    presets = {
        "cogvideox-5b-i2v": _preset(
            "cogvideox-5b-i2v",
            {"use_learned_positional_embeddings": True},
            (49, 480, 720),
            _TEACACHE_5B,
            "THUDM/CogVideoX-5b-I2V (49 x 480 x 720 only: learned position embeddings)",
        ),
        "cogvideox1.5-5b-i2v": _preset(
            "cogvideox1.5-5b-i2v",
            {
                "ofs_embed_dim": 512,
                "sample_width": 170,
                "sample_height": 96,
                "sample_frames": 81,
                "patch_size_t": 2,
                "patch_bias": False,
            },
            (81, 768, 1360),
            _TEACACHE_1_5_I2V,
            "THUDM/CogVideoX1.5-5B-I2V (81x768x1360: 21 latent frames padded to 22)",
        ),
    }

    def latent_shape(self, preset: ModelPreset, shapes: Shapes) -> tuple[int, ...]:
        """The noise latent: half the transformer's input channels (the pipeline's latent_channels)."""
        frames, _, h, w = super().latent_shape(preset, shapes)
        return (frames, preset.config["in_channels"] // 2, h, w)

    def condition_shapes(self, preset: ModelPreset, shapes: Shapes) -> dict[str, tuple[int, ...]]:
        return {"image_latent": self.latent_shape(preset, shapes)}

    def split(self, transformer: nn.Module, preset: ModelPreset, shapes: Shapes) -> dict[str, nn.Module]:
        """The stages; BadInput for a size other than that of the model's learned position
        embeddings (CogVideoX-5B-I2V), which diffusers' pipeline refuses too."""
        config = preset.config
        _, _, h, w = self.latent_shape(preset, shapes)
        sample = (config["sample_height"], config["sample_width"])
        if config.get("use_learned_positional_embeddings") and (h, w) != sample:
            raise BadInput(
                f"{preset.name}: its learned position embeddings take {8 * sample[0]}x{8 * sample[1]} "
                f"(height x width) only, as diffusers' pipeline does; got {shapes.height}x{shapes.width}"
            )
        return {**super().split(transformer, preset, shapes), "head": _Head(transformer)}

    def pipeline_class(self) -> type[Any]:
        from diffusers import CogVideoXImageToVideoPipeline

        return CogVideoXImageToVideoPipeline

    def encode_image(
        self, image: np.ndarray, generators: list[torch.Generator], pipeline, preset: ModelPreset, shapes: Shapes
    ) -> dict[str, torch.Tensor]:
        """The pipeline's prepare_latents for the image: one VAE posterior draw per sample from its
        generator (the encoder runs once: the pipeline encodes the same image per sample), scaled,
        then zero frames; the starting noise is drawn next from the same generators, as there."""
        frames = self.latent_shape(preset, shapes)[0]
        drawn = self.image_draws(image, generators, pipeline, preset, shapes).permute(0, 2, 1, 3, 4)
        scale = pipeline.vae_scaling_factor_image
        drawn = 1 / scale * drawn if pipeline.vae.config.invert_scale_latents else scale * drawn
        latents = torch.cat([drawn, drawn.new_zeros((len(generators), frames - 1, *drawn.shape[2:]))], dim=1)
        return {"image_latent": latents}
