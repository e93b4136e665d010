"""LTX-Video text-to-video: diffusers' LTXVideoTransformer3DModel split into head / blocks / tail.

Facts of the real pipeline (diffusers' LTXPipeline, 0.9.x): latents [C, F, H/32, W/32] with
F = (frames - 1) / 8 + 1, packed to [F*H*W, C] tokens (patch 1); timesteps 0..1000 from the
flow-matching Euler scheduler with sigmas linspace(1, 1/N, N) and a shift mu from the token count;
cond and uncond batched in one call; T5 text (128 tokens) with an attention mask; rotary tables
from latent coordinates scaled by (8 / frame_rate, 32, 32). The tables depend only on the bundle's
static grid and frame rate, so the transformer's own rotary module computes them once at split
time and the blocks carry them as constants. The text mask travels as the last channel of the text
input, so every family's head takes the same three inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sencache.runtime.conventions import SenCacheConventions
from sencache.runtime.errors import BadInput
from sencache.runtime.families.base import (
    FamilyAdapter,
    ModelPreset,
    Sampler,
    Shapes,
    StageLayout,
    TinyFormat,
    pipeline_encode_prompt,
    register_family,
    tiny_preset,
)
from sencache.runtime.tiny_grammar import MAX_TOKENS, PAD, VOCABULARY, tokenize
from sencache.runtime.tiny_text import TinyTextEncoder

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

    from sencache.runtime.parallel.sequence import SequenceShard

FRAME_RATE = 25
"""The pipeline's default frame rate; it scales the temporal rotary coordinates."""
SPATIAL, TEMPORAL = 32, 8
"""The LTX VAE's compression."""

_REAL: dict[str, Any] = {
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "cross_attention_dim": 2048,
    "num_layers": 28,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "attention_bias": True,
    "attention_out_bias": True,
}

TINY_CONFIG: dict[str, Any] = {
    **_REAL,
    "in_channels": 3,
    "out_channels": 3,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "cross_attention_dim": 64,
    "num_layers": 2,
    "caption_channels": 32,
}

# Lightricks/LTX-Video scheduler/scheduler_config.json (0.9.0 / 0.9.1 diffusers format).
_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.95,
    "max_shift": 2.05,
    "base_image_seq_len": 1024,
    "max_image_seq_len": 4096,
    "shift_terminal": 0.1,
}

# SPEC section 1 (authors' LTX-Video argparse defaults); TeaCache's slow threshold and its published
# LTX-Video 0.9.1 polynomial (shared/reference, TeaCache @7c10efc4); no published MagCache ratios.
_TEACACHE_0_9_1 = (21.4700694, -12.8016453, 2.31279151, 0.792487521, 0.00969274326)
_CACHE = {
    "sencache": {"eps_start": 0.01, "eps_main": 0.7, "max_reuse": 4},
    "teacache": {"threshold": 0.03},
    "magcache": {"threshold": 0.12, "max_reuse": 4, "retention": 0.2},
}

VERSIONS = ("0.9.0", "0.9.1")
"""The LTX-Video releases with presets (Lightricks/LTX-Video in diffusers format)."""


def lightricks_preset(name: str, family: str, version: str, description: str) -> ModelPreset:
    """LTX-Video `version` at Lightricks' defaults (161 x 512 x 704, guidance 3.0, 50 steps, their
    scheduler config), with TeaCache's polynomial where one is published (0.9.1)."""
    return ModelPreset(
        name=name,
        family=family,
        config=_REAL,
        frames=161,
        height=512,
        width=704,
        guidance=3.0,
        steps=50,
        cache_defaults=_CACHE,
        scheduler=_SCHEDULER,
        published_baselines=(_TEACACHE_0_9_1, None) if version == "0.9.1" else None,
        description=description,
    )


def pack_text(embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """T5 embeddings [B, T, C] and their attention mask [B, T] as one text input [B, T, C + 1]."""
    return np.concatenate([embeds, mask[..., None].astype(embeds.dtype)], axis=-1).astype(np.float32)


# `t` is the diffusers transformer, typed Any: its submodules are set from its config and read through
# nn.Module.__getattr__, which mypy types as Tensor | Module.
class LTXHead(nn.Module):
    """LTXVideoTransformer3DModel.forward up to the blocks; `embed_timestep` is what a variant's
    head changes (image-to-video: a timestep per token)."""

    def __init__(self, t: Any) -> None:
        super().__init__()
        self.t = t

    def embed_timestep(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype):
        """The timestep embeddings (temb, embedded), [batch, 1, C] each: one timestep per row. The
        transformer's view(batch, -1, C) of [B, C] is unsqueeze(1), written so the exporter sees
        the middle dimension is 1."""
        temb, embedded = self.t.time_embed(timestep.flatten(), batch_size=batch, hidden_dtype=dtype)
        return temb.unsqueeze(1), embedded.unsqueeze(1)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor):
        t = self.t
        batch = latent.shape[0]
        bias = ((1 - text[..., -1].to(latent.dtype)) * -10000.0).unsqueeze(1)
        hidden = t.proj_in(latent)
        temb, embedded = self.embed_timestep(timestep, batch, hidden.dtype)
        encoder = t.caption_projection(text[..., :-1])
        first = t.transformer_blocks[0]
        ada = first.scale_shift_table[None, None] + temb.unflatten(2, (first.scale_shift_table.shape[0], -1))
        shift, scale = ada[:, :, 0], ada[:, :, 1]
        modulated = first.norm1(hidden) * (1 + scale) + shift
        return hidden, encoder, temb, bias, embedded, modulated


class _Blocks(nn.Module):
    def __init__(self, t: Any, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.blocks = t.transformer_blocks
        self.register_buffer("rope_cos", rope[0], persistent=False)
        self.register_buffer("rope_sin", rope[1], persistent=False)

    def forward(self, hidden: torch.Tensor, encoder: torch.Tensor, temb: torch.Tensor, text_bias: torch.Tensor):
        for block in self.blocks:
            hidden = block(hidden, encoder, temb, (self.rope_cos, self.rope_sin), text_bias)
        return hidden


class _Tail(nn.Module):
    def __init__(self, t: Any) -> None:
        super().__init__()
        self.t = t

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        t = self.t
        values = t.scale_shift_table[None, None] + embedded[:, :, None]
        shift, scale = values[:, :, 0], values[:, :, 1]
        return t.proj_out(t.norm_out(hidden) * (1 + scale) + shift)


class LTXSampler(Sampler):
    """The pipeline's timesteps: sigmas linspace(1, 1/N, N) shifted by mu from the token count.

    One step is the schedule's first sigma, 1, alone: the shift and the stretch to `shift_terminal`
    both keep 1 at 1, but diffusers' stretch divides 0 by 0 for a single sigma (NaN timesteps, then
    an IndexError in `step`), so for one step the scheduler is made without the stretch."""

    def __init__(self, scheduler, steps: int, tokens: int) -> None:
        self.tokens = tokens
        super().__init__(scheduler, steps)

    def set_timesteps(self, steps: int) -> None:
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

        config = self.scheduler.config
        if steps == 1 and config.get("shift_terminal"):
            self.scheduler = type(self.scheduler).from_config({**config, "shift_terminal": None})
            config = self.scheduler.config
        mu = calculate_shift(
            self.tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)


class TinyTokens(TinyFormat):
    """Tiny LTX: the clip's pixels are the latent tokens [B, T*H*W, 3] (patch 1, as the pipeline packs
    latents), and the text carries its token mask as the last channel (`pack_text`)."""

    def latents(self, clips: np.ndarray) -> np.ndarray:
        b, f, h, w, c = clips.shape
        return (clips.reshape(b, f * h * w, c) * 2.0 - 1.0).astype(np.float32)

    def frames(self, latents: np.ndarray, shapes: Shapes) -> np.ndarray:
        frames = latents.reshape(len(latents), shapes.frames, shapes.height, shapes.width, -1)
        return np.clip((frames + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)

    def text_dim(self, text_shape: tuple[int, int]) -> int:
        """The text's width less its mask channel."""
        return text_shape[1] - 1

    def encode_text(self, encoder: TinyTextEncoder, prompts: list[str]) -> np.ndarray:
        ids = np.array([tokenize(p) for p in prompts])
        return pack_text(encoder.encode(prompts).numpy(), ids != VOCABULARY.index(PAD))


@register_family
class LTXAdapter(FamilyAdapter):
    family = "ltx"
    layout = StageLayout(
        streams=("hidden",),
        block_context=("encoder", "temb", "text_bias"),
        tail_context=("embedded",),
        signals=("modulated",),
        tokens=("hidden",),
    )
    modulation = "modulated"
    tiny_format = TinyTokens()
    # vita-epfl/SenCache LTX-Video/sencache.py: one call per step, switch at round(0.2 N),
    # int(round(0.02 N)) steps always run at each end (and the anchorless first), the nearest
    # calibrated timestep, a fixed constant. Not matched (runtime/conventions.py): their cache holds
    # the residual after norm_out and the anchor's modulation; a reused step here runs both with the
    # current timestep in the tail.
    sencache_reference = SenCacheConventions(
        switch_frac=0.2, retain_frac=0.02, nearest_lookup=True, score_constant=1015.9685034488028
    )
    aliases = {"ltx-video": "ltx-video-0.9.1"}
    presets = {
        "tiny-ltx": tiny_preset(
            "tiny-ltx",
            "ltx",
            TINY_CONFIG,
            "tiny LTX-Video, UNTRAINED (random weights, seed 0): for export and parity checks only, "
            "its videos are noise",
            height=16,
            width=16,
            trained=False,
            guidance=3.0,
            cache_defaults=_CACHE,
            scheduler=_SCHEDULER,
        ),
        **{
            f"ltx-video-{version}": lightricks_preset(
                f"ltx-video-{version}", "ltx", version, f"Lightricks/LTX-Video {version} (diffusers format)"
            )
            for version in VERSIONS
        },
    }

    def transformer_class(self) -> type[ModelMixin]:
        from diffusers.models.transformers.transformer_ltx import LTXVideoTransformer3DModel

        return LTXVideoTransformer3DModel

    def grid(self, preset: ModelPreset, shapes: Shapes) -> tuple[int, int, int]:
        """Latent (frames, height, width) before packing."""
        if preset.tiny:
            return shapes.frames, shapes.height, shapes.width
        if (shapes.frames - 1) % TEMPORAL or shapes.height % SPATIAL or shapes.width % SPATIAL:
            raise BadInput(f"{preset.name}: frames must be 8k+1 and height/width multiples of 32")
        return (shapes.frames - 1) // TEMPORAL + 1, shapes.height // SPATIAL, shapes.width // SPATIAL

    def latent_shape(self, preset: ModelPreset, shapes: Shapes) -> tuple[int, ...]:
        f, h, w = self.grid(preset, shapes)
        return (f * h * w, preset.config["in_channels"])

    def text_shape(self, preset: ModelPreset) -> tuple[int, int]:
        return (MAX_TOKENS if preset.tiny else 128, preset.config["caption_channels"] + 1)

    def split(self, transformer: Any, preset: ModelPreset, shapes: Shapes) -> dict[str, nn.Module]:
        f, h, w = self.grid(preset, shapes)
        scale = (
            1.0 if preset.tiny else TEMPORAL / FRAME_RATE,
            1.0 if preset.tiny else SPATIAL,
            1.0 if preset.tiny else SPATIAL,
        )
        probe = torch.zeros(1, f * h * w, 1, device=transformer.device)
        rope = transformer.rope(probe, f, h, w, scale, None)
        return {"head": LTXHead(transformer), "blocks": _Blocks(transformer, rope), "tail": _Tail(transformer)}

    def shard_blocks(self, blocks: nn.Module, preset: ModelPreset, shapes: Shapes, shard: SequenceShard) -> None:
        shard.check_heads(preset.config["num_attention_heads"])
        tables: Any = blocks  # its rotary tables are buffers, typed Tensor | Module through nn.Module
        part = shard.tokens(tables.rope_cos.shape[1])
        tables.rope_cos = tables.rope_cos[:, part].contiguous()
        tables.rope_sin = tables.rope_sin[:, part].contiguous()
        for block in tables.blocks:
            block.attn1.processor._parallel_config = shard.diffusers_config

    def sampler(self, scheduler, steps: int, preset: ModelPreset, shapes: Shapes) -> Sampler:
        return LTXSampler(scheduler, steps, self.latent_shape(preset, shapes)[0])

    def initial_latents(self, generators: list[torch.Generator], preset: ModelPreset, shapes: Shapes) -> torch.Tensor:
        from diffusers import LTXPipeline

        f, h, w = self.grid(preset, shapes)
        noise = torch.stack([torch.randn((preset.config["in_channels"], f, h, w), generator=g) for g in generators])
        return LTXPipeline._pack_latents(noise, 1, 1)

    def pipeline_class(self) -> type[Any]:
        from diffusers import LTXPipeline

        return LTXPipeline

    def encode_prompts(self, pipeline, prompts: list[str], preset: ModelPreset) -> np.ndarray:
        embeds, mask, _, _ = pipeline_encode_prompt(self, pipeline, prompts, preset)
        return pack_text(embeds.float().numpy(), mask.numpy())

    def decode_real(self, latents: torch.Tensor, pipeline, preset: ModelPreset, shapes: Shapes) -> torch.Tensor:
        """The pipeline's decoding at its defaults. A timestep-conditioned VAE (0.9.1) is told
        decode_timestep 0 with noise scale 0, so the noise the pipeline mixes in has weight 0 and
        is not drawn here."""
        f, h, w = self.grid(preset, shapes)
        vae = pipeline.vae
        latents = pipeline._unpack_latents(latents, f, h, w, 1, 1)
        latents = pipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        timestep = torch.zeros(len(latents)) if vae.config.timestep_conditioning else None
        return vae.decode(latents, timestep, return_dict=False)[0]
