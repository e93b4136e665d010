"""Wan image-to-video: WanTransformer3DModel with first-frame channels, and an image encoder in 2.1.

Facts of the real pipeline (diffusers' WanImageToVideoPipeline, Wan2.1-I2V-14B-*-Diffusers): the
image is resized to the video's size by the pipeline's video processor and put as frame 0 of an
otherwise black video, which the Wan VAE encodes (its mode, no draw); a 4-channel first-frame mask
and those 16 channels are concatenated to the 16-channel noise latent (36 input channels). The
image also goes through the CLIP ViT-H/14 image encoder (its second-to-last hidden states, 257 x
1280), which the transformer projects (`image_dim`) and puts before the text tokens; each block's
cross-attention reads them through its added key/value projections (`added_kv_proj_dim`). Both
conditionings are the same for the cond and uncond calls and at every step, so they are head
inputs; the blocks, the tail, the sampler and the cache rules are Wan 2.1's unchanged (a rule reads
the 16-channel latent, the timestep and the timestep embedding, none of which the image changes).

Wan 2.2 I2V-A14B (Wan2.2-I2V-A14B-Diffusers) is two experts, switching as Wan 2.2 T2V-A14B's do
(runtime/experts.py), each taking the same 36 channels; it has no image encoder (the pipeline's
image_encoder is None, the transformer's `image_dim` None, `expand_timesteps` false), so the first
frame's channels are its only image input.

The tiny model (`tiny-wan-i2v`, RGB as latent like every tiny model) has no VAE and no CLIP: its
first-frame channels are a 1-channel mask and the image's RGB in [-1, 1] at frame 0 (the real
layout, mask before image, without the VAE's 4x temporal packing), and its image encoder is the
image's pixels cut into the transformer's own spatial patches (3 x 4 x 4 = 48 values per token).
Its text is the tiny encoder's tokens padded with zeros to 512, as the pipeline pads UMT5's: diffusers'
Wan attention takes the last 512 context tokens as text and the ones before them as the image's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sencache.runtime.errors import BadInput
from sencache.runtime.families.base import ModelPreset, Shapes, TinyClipAxes, register_family, tiny_preset
from sencache.runtime.families.wan import (
    _REAL_COMMON,
    _WAN22_A14B,
    TINY_CONFIG,
    WanAdapter,
    WanEmbedding,
    a14b_preset,
)

if TYPE_CHECKING:
    from sencache.runtime.tiny_text import TinyTextEncoder

IMAGE_TOKENS = 257
"""Hidden states of CLIP ViT-H/14 at 224 x 224: 16 x 16 patches and the class token."""

TEXT_TOKENS = 512
"""The text tokens diffusers' WanAttnProcessor splits off the end of the context (hard-coded there)."""

TINY_I2V_CONFIG: dict[str, Any] = {
    **TINY_CONFIG,
    "num_layers": 2,
    "in_channels": 7,
    "image_dim": 48,
    "added_kv_proj_dim": 128,
}
"""tiny-wan's transformer with tiny-wan's first 2 blocks (the carried weights stay small), 4
first-frame channels (mask, RGB) and image tokens of 4 x 4 RGB patches (48 values)."""

_I2V_CONFIG: dict[str, Any] = {
    **_REAL_COMMON,
    "num_attention_heads": 40,
    "ffn_dim": 13824,
    "num_layers": 40,
    "in_channels": 36,
    "image_dim": 1280,
    "added_kv_proj_dim": 5120,
}

# Published baseline constants (shared/reference/baseline_constants.json): TeaCache's Wan2.1 I2V
# polynomials on the timestep embedding e, and MagCache's cond-branch ratios (every other entry of
# the published [cond, uncond] list of 40 steps, the I2V default).
_TEACACHE_480P = (-302.33167, 223.948934, -52.546397, 5.8734844, -0.201973289)
_TEACACHE_720P = (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683)
# fmt: off
_MAGCACHE_480P = (
    1.0, 0.98783, 0.97559, 0.98311, 0.98202, 0.9888, 0.98762, 0.98957, 0.99052, 0.99383, 0.98857, 0.99065,
    0.98845, 0.99057, 0.98957, 0.98601, 0.98823, 0.98756, 0.98808, 0.98721, 0.98571, 0.98543, 0.98157, 0.98411,
    0.97952, 0.98149, 0.9774, 0.97825, 0.97355, 0.97085, 0.97056, 0.96588, 0.96113, 0.9567, 0.94961, 0.93973,
    0.93217, 0.91878, 0.90955, 0.92617,
)
# fmt: on
_CACHE = {
    "sencache": {"eps_start": 0.045, "eps_main": 2.0, "max_reuse": 3},
    "teacache": {"threshold": 0.05},
    "magcache": {"threshold": 0.12, "max_reuse": 2, "retention": 0.2},
}


@dataclass(frozen=True)
class TinyPaddedText(TinyClipAxes):
    """Wan's tiny clip axes, with the tiny encoder's text padded with zeros to TEXT_TOKENS tokens."""

    def encode_text(self, encoder: TinyTextEncoder, prompts: list[str]) -> np.ndarray:
        text = encoder.encode(prompts).numpy()
        return np.pad(text, ((0, 0), (0, TEXT_TOKENS - text.shape[1]), (0, 0)))


class _Head(WanEmbedding):
    """Wan's head with the first-frame channels after the noise latent (Wan 2.2 I2V: no image encoder)."""

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image_latent: torch.Tensor):
        return self.embed(torch.cat([latent, image_latent], dim=1), timestep, text)


class _ImageHead(WanEmbedding):
    """Wan 2.1 I2V's head: the first-frame channels after the noise latent, the projected image
    tokens before the text tokens (WanTransformer3DModel.forward)."""

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        image_latent: torch.Tensor,
        image_embeds: torch.Tensor,
    ):
        return self.embed(torch.cat([latent, image_latent], dim=1), timestep, text, image_embeds)


@register_family
class WanI2VAdapter(WanAdapter):
    family = "wan-i2v"
    layout = replace(WanAdapter.layout, conditions=("image_latent", "image_embeds"))
    image_components: tuple[str, ...] = ("image_encoder", "image_processor")
    tiny_format = TinyPaddedText((0, 4, 1, 2, 3))  # [B, C, F, H, W]
    aliases: dict[str, str] = {}
    presets = {
        f"wan2.1-i2v-14b-{size}": ModelPreset(
            name=f"wan2.1-i2v-14b-{size}",
            family="wan-i2v",
            config=_I2V_CONFIG,
            frames=81,
            height=height,
            width=width,
            guidance=5.0,
            steps=40,
            cache_defaults=_CACHE,
            published_baselines=(teacache, magcache),
            description=f"Wan-AI/Wan2.1-I2V-14B-{size.upper()}-Diffusers",
        )
        for size, height, width, teacache, magcache in (
            ("480p", 480, 832, _TEACACHE_480P, _MAGCACHE_480P),
            ("720p", 720, 1280, _TEACACHE_720P, None),
        )
    }

    presets["tiny-wan-i2v"] = tiny_preset(
        "tiny-wan-i2v",
        "wan-i2v",
        TINY_I2V_CONFIG,
        "bundled tiny Wan 2.1 I2V (0.7 M parameters, 2 blocks) fine-tuned from tiny-wan on procedural clips "
        "continued from their first frame; RGB used as latent, image tokens are pixel patches",
    )

    def text_shape(self, preset: ModelPreset) -> tuple[int, int]:
        """TEXT_TOKENS, a tiny model's too: the transformer's attention splits text from image by it."""
        return (TEXT_TOKENS, preset.config["text_dim"])

    def latent_shape(self, preset: ModelPreset, shapes: Shapes) -> tuple[int, ...]:
        """The noise latent: the transformer's output channels (its input adds the image's)."""
        _, f, h, w = super().latent_shape(preset, shapes)
        return (preset.config["out_channels"], f, h, w)

    def condition_shapes(self, preset: ModelPreset, shapes: Shapes) -> dict[str, tuple[int, ...]]:
        c, f, h, w = self.latent_shape(preset, shapes)
        _, p_h, p_w = preset.config["patch_size"]
        tokens = (h // p_h) * (w // p_w) if preset.tiny else IMAGE_TOKENS
        return {
            "image_latent": (preset.config["in_channels"] - c, f, h, w),
            "image_embeds": (tokens, preset.config["image_dim"]),
        }

    def split(self, transformer: nn.Module, preset: ModelPreset, shapes: Shapes) -> dict[str, nn.Module]:
        return {**super().split(transformer, preset, shapes), "head": _ImageHead(transformer)}

    def pipeline_class(self) -> type[Any]:
        from diffusers import WanImageToVideoPipeline

        return WanImageToVideoPipeline

    def first_frame(self, image: np.ndarray, batch: int, pipeline, preset: ModelPreset, shapes: Shapes) -> torch.Tensor:
        """The pipeline's prepare_latents for the image: the first-frame mask and the VAE's mode of
        the image followed by black frames, [batch, in - out channels, ...]; the mode draws nothing,
        so one encoding serves every sample."""
        pixels = self.image_pixels(image, pipeline, preset, shapes)
        zeros = torch.zeros((1, *self.latent_shape(preset, shapes)))
        with torch.no_grad():
            _, condition = pipeline.prepare_latents(
                pixels, 1, zeros.shape[1], shapes.height, shapes.width, shapes.frames, torch.float32, "cpu", None, zeros
            )
        return condition.expand(batch, -1, -1, -1, -1)

    def encode_image(
        self, image: np.ndarray, generators: list[torch.Generator], pipeline, preset: ModelPreset, shapes: Shapes
    ) -> dict[str, torch.Tensor]:
        """The pipeline's encode_image (CLIP hidden states) and its first frame (`first_frame`)."""
        from PIL import Image

        if preset.tiny:
            return self._tiny_conditions(image, len(generators), preset, shapes)
        if pipeline.image_encoder is None or pipeline.image_processor is None:
            raise BadInput(
                f"{preset.name}: the weights folder needs image_encoder/, image_processor/ and vae/ to take an image",
                param="image",
            )
        batch = len(generators)
        with torch.no_grad():
            embeds = pipeline.encode_image(Image.fromarray(image), torch.device("cpu")).float()
        if tuple(embeds.shape[1:]) != self.condition_shapes(preset, shapes)["image_embeds"]:
            raise BadInput(
                f"{preset.name}: the image encoder gives {list(embeds.shape[1:])} states, not the "
                f"{[IMAGE_TOKENS, preset.config['image_dim']]} the transformer was built for",
                param="image",
            )
        return {
            "image_latent": self.first_frame(image, batch, pipeline, preset, shapes),
            "image_embeds": embeds.expand(batch, -1, -1),
        }

    def _tiny_conditions(
        self, image: np.ndarray, batch: int, preset: ModelPreset, shapes: Shapes
    ) -> dict[str, torch.Tensor]:
        """A tiny model's image inputs (module docstring): `image` resized to the video's size as
        the real pipeline's video processor resizes (Lanczos), in [-1, 1]; nothing is drawn."""
        from PIL import Image

        picture = Image.fromarray(image)
        if picture.size != (shapes.width, shapes.height):
            picture = picture.resize((shapes.width, shapes.height), Image.Resampling.LANCZOS)
        rgb = torch.from_numpy(np.asarray(picture, np.float32) / 127.5 - 1.0)  # [H, W, 3]
        shape = self.condition_shapes(preset, shapes)
        latent = torch.zeros(shape["image_latent"])
        latent[0, 0] = 1.0
        latent[1:, 0] = rgb.permute(2, 0, 1)
        _, p_h, p_w = preset.config["patch_size"]
        patches = rgb.reshape(shapes.height // p_h, p_h, shapes.width // p_w, p_w, 3).permute(0, 2, 1, 3, 4)
        embeds = patches.reshape(shape["image_embeds"])
        return {
            "image_latent": latent.expand(batch, *latent.shape).contiguous(),
            "image_embeds": embeds.expand(batch, *embeds.shape).contiguous(),
        }


@register_family
class Wan22I2VAdapter(WanI2VAdapter):
    """Wan 2.2 I2V-A14B: two experts (as Wan 2.2 T2V-A14B) whose transformers take the first-frame
    channels of Wan 2.1 I2V but no image encoder: diffusers' WanImageToVideoPipeline with
    `transformer_2`, `boundary_ratio`, `expand_timesteps` false and no image_encoder, which then
    passes no image states (the transformer's `image_dim` is None)."""

    family = "wan-i2v-2.2"
    layout = replace(WanAdapter.layout, conditions=("image_latent",))
    image_components = ()
    presets = {
        # Wan-Video/Wan2.2 wan/configs/wan_i2v_A14B.py: 40 steps with shift 5.0, boundary 0.900,
        # guidance 3.5 for both experts; the Wan 2.1 VAE (36 = 16 noise + 4 mask + 16 image channels).
        "wan2.2-i2v-a14b": a14b_preset(
            "wan2.2-i2v-a14b",
            "wan-i2v-2.2",
            {**_WAN22_A14B, "in_channels": 36},
            guidance=(3.5, 3.5),
            boundary_ratio=0.9,
            shift=5.0,
            description="Wan-AI/Wan2.2-I2V-A14B-Diffusers (two experts: transformer/ and transformer_2/)",
        ),
    }

    def condition_shapes(self, preset: ModelPreset, shapes: Shapes) -> dict[str, tuple[int, ...]]:
        return {"image_latent": super().condition_shapes(preset, shapes)["image_latent"]}

    def split(self, transformer: nn.Module, preset: ModelPreset, shapes: Shapes) -> dict[str, nn.Module]:
        return {**super().split(transformer, preset, shapes), "head": _Head(transformer)}

    def encode_image(
        self, image: np.ndarray, generators: list[torch.Generator], pipeline, preset: ModelPreset, shapes: Shapes
    ) -> dict[str, torch.Tensor]:
        """The pipeline's first frame (`first_frame`) alone: it has no image encoder."""
        return {"image_latent": self.first_frame(image, len(generators), pipeline, preset, shapes)}
