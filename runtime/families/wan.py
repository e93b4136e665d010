"""Wan 2.1 and 2.2 text-to-video: diffusers' WanTransformer3DModel split into head / blocks / tail.

Facts of the real pipeline (diffusers' WanPipeline and the published Diffusers configs):
timesteps in 0..1000 from UniPCMultistepScheduler with flow sigmas and shift (3.0 at 480p,
5.0 at 720p), cond and uncond as two separate transformer calls, latents [16, (F-1)/4+1, H/8, W/8]
from the Wan VAE, and text from UMT5 at 512 tokens x 4096 channels.

Wan 2.2 T2V-A14B is two such transformers (`transformer` and `transformer_2` of WanPipeline): the
high-noise expert at timesteps >= boundary_ratio x 1000 with `guidance_scale`, the low-noise expert
below with `guidance_scale_2` (runtime/experts.py). TI2V-5B is one transformer on the Wan 2.2 VAE's
48-channel latents at 16x spatial compression; its pipeline sets `expand_timesteps` (a timestep per
token, from a mask that only an image condition makes uneven), which for text-to-video gives every
token the same timestep: the same numbers as one timestep per sample, which is what the engine runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
    TinyClipAxes,
    register_family,
    tiny_preset,
)
from sencache.runtime.families.unipc import UniPCSampler
from sencache.runtime.tiny_grammar import MAX_TOKENS

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

    from sencache.runtime.parallel.sequence import SequenceShard

_REAL_COMMON: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

TINY_CONFIG: dict[str, Any] = {
    "patch_size": (1, 4, 4),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": 32,
    "freq_dim": 64,
    "ffn_dim": 384,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 64,
}

_WAN22_A14B: dict[str, Any] = {**_REAL_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
"""Each expert of Wan2.2-T2V-A14B-Diffusers (transformer/ and transformer_2/ have the same config)."""
_WAN22_TI2V_5B: dict[str, Any] = {
    **_REAL_COMMON,
    "in_channels": 48,
    "out_channels": 48,
    "num_attention_heads": 24,
    "ffn_dim": 14336,
    "num_layers": 30,
}
"""Wan2.2-TI2V-5B-Diffusers' transformer: 3072 wide, on the 48 channels of the Wan 2.2 VAE."""
_VAE_SPATIAL = {"wan2.2-ti2v-5b": 16}
"""The VAE's spatial compression where it is not the Wan 2.1 VAE's 8 (Wan 2.2's VAE: 16)."""
_AUTHORS_PRESETS = ("tiny-wan", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
"""The Wan models whose sampling the SenCache authors' code fixes (their Wan2.1 scripts)."""

REFERENCE_SHIFT = 5.0
"""The flow shift the SenCache authors sample Wan 2.1 T2V with (`sample_shift`, at every size)."""

_SCHEDULER: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}

# SPEC section 1 (SenCache authors' Wan 2.1 T2V-1.3B defaults) and the baselines' published settings
# (shared/reference/baseline_constants.json: TeaCache "slow", MagCache per model).
_WAN_1_3B_CACHE = {
    "sencache": {"eps_start": 0.045, "eps_main": 2.0, "max_reuse": 3},
    "teacache": {"threshold": 0.05},
    "magcache": {"threshold": 0.12, "max_reuse": 4, "retention": 0.2},
}
_WAN_14B_CACHE = {**_WAN_1_3B_CACHE, "magcache": {"threshold": 0.24, "max_reuse": 6, "retention": 0.2}}


# Published baseline constants (shared/reference/baseline_constants.json, sources TeaCache @7c10efc4 and
# MagCache @df81cb18): TeaCache polynomial on the timestep embedding e, and MagCache's per-step ratios
# of the cond branch (every other entry of the published [cond, uncond] list, 50 steps).
_TEACACHE_1_3B = (2396.76752, -1311.10545, 201.331979, -8.29855975, 0.137887774)
_TEACACHE_14B = (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)
_MAGCACHE_1_3B = (
    1.0,
    1.0124,
    1.00166,
    0.99791,
    0.99682,
    0.99634,
    0.99567,
    0.99416,
    0.99578,
    0.9957,
    0.99511,
    0.99535,
    0.99552,
    0.99541,
    0.9954,
    0.99489,
    0.99518,
    0.99484,
    0.99481,
    0.99415,
    0.99419,
    0.99396,
    0.99388,
    0.99349,
    0.99309,
    0.9927,
    0.99228,
    0.99171,
    0.99137,
    0.99068,
    0.99005,
    0.98944,
    0.98849,
    0.98758,
    0.98644,
    0.98504,
    0.9836,
    0.98202,
    0.97977,
    0.97717,
    0.9741,
    0.97003,
    0.96538,
    0.9593,
    0.95086,
    0.94013,
    0.92402,
    0.90241,
    0.86821,
    0.81838,
)
_MAGCACHE_14B = (
    1.0,
    1.02504,
    1.00025,
    0.9985,
    0.99779,
    0.9966,
    0.99482,
    0.99467,
    0.99664,
    0.99434,
    0.99533,
    0.99468,
    0.99438,
    0.99516,
    0.99384,
    0.99404,
    0.99517,
    0.99409,
    0.99428,
    0.99347,
    0.99418,
    0.99271,
    0.99313,
    0.99215,
    0.99218,
    0.99216,
    0.99163,
    0.99138,
    0.98982,
    0.98996,
    0.9887,
    0.98772,
    0.98767,
    0.98573,
    0.98501,
    0.9838,
    0.98177,
    0.98037,
    0.97678,
    0.97546,
    0.97184,
    0.96711,
    0.96349,
    0.95629,
    0.94926,
    0.93964,
    0.92511,
    0.90693,
    0.8796,
    0.86111,
)


def a14b_preset(
    name: str,
    family: str,
    config: dict[str, Any],
    guidance: tuple[float, float],
    boundary_ratio: float,
    shift: float,
    description: str,
) -> ModelPreset:
    """A Wan 2.2 A14B model as Wan 2.2's configs (Wan-Video/Wan2.2 wan/configs) sample it: two 14 B
    experts switching at `boundary_ratio`, `guidance` (high-noise, low-noise), 40 steps of flow
    shift `shift`, 81 frames at 720 x 1280. No published TeaCache or MagCache constants exist for
    them: calibration measures each expert's tables."""
    return ModelPreset(
        name=name,
        family=family,
        config=config,
        frames=81,
        height=720,
        width=1280,
        guidance=guidance[0],
        guidance_2=guidance[1],
        steps=40,
        boundary_ratio=boundary_ratio,
        cache_defaults=_WAN_14B_CACHE,
        scheduler={"flow_shift": shift},
        description=description,
    )


# `t` is the diffusers transformer, typed Any: its submodules are set from its config and read through
# nn.Module.__getattr__, which mypy types as Tensor | Module.
class WanEmbedding(nn.Module):
    """What every Wan head computes; each head's `forward` calls `embed` on its own inputs."""

    def __init__(self, t: Any) -> None:
        super().__init__()
        self.t = t

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None):
        """WanTransformer3DModel.forward up to the blocks on the transformer's input `x`; the
        projected `image` states, where the model has an image encoder, before the text tokens."""
        t = self.t
        rope_cos, rope_sin = t.rope(x)
        hidden = t.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        temb, tproj, encoder, image_tokens = t.condition_embedder(timestep, text, image)
        if image_tokens is not None:
            encoder = torch.cat([image_tokens, encoder], dim=1)
        return hidden, encoder, tproj.unflatten(1, (6, -1)), rope_cos, rope_sin, temb


class _Head(WanEmbedding):
    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor):
        return self.embed(latent, timestep, text)


class _Blocks(nn.Module):
    def __init__(self, t: Any) -> None:
        super().__init__()
        self.blocks = t.blocks

    def forward(self, hidden, encoder, tproj, rope_cos, rope_sin):
        for block in self.blocks:
            hidden = block(hidden, encoder, tproj, (rope_cos, rope_sin))
        return hidden


class _Tail(nn.Module):
    def __init__(self, t: Any, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.t = t
        self.grid = grid

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        t = self.t
        shift, scale = (t.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (t.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = t.proj_out(hidden)
        f, h, w = self.grid
        p_t, p_h, p_w = t.config.patch_size
        hidden = hidden.reshape(hidden.shape[0], f, h, w, p_t, p_h, p_w, -1)
        hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)


@register_family
class WanAdapter(FamilyAdapter):
    family = "wan"
    layout = StageLayout(
        streams=("hidden",),
        block_context=("encoder", "tproj", "rope_cos", "rope_sin"),
        tail_context=("temb",),
        shared=("rope_cos", "rope_sin"),
        tokens=("hidden", "rope_cos", "rope_sin"),
    )
    modulation = "temb"
    tiny_format = TinyClipAxes((0, 4, 1, 2, 3))  # [B, C, F, H, W]
    # vita-epfl/SenCache Wan2.1/sencache.py: cond and uncond are separate calls, the switch is at
    # call round(0.2 * 2N) and step i is call 2i; no retention (only the anchorless first step
    # runs); the nearest calibrated timestep; eps times sqrt(numel) of a 480x832, 81-frame latent.
    sencache_reference = SenCacheConventions(
        switch_frac=0.2, switch_calls=2, nearest_lookup=True, score_constant=1447.97790038
    )
    presets = {
        "tiny-wan": tiny_preset(
            "tiny-wan",
            "wan",
            TINY_CONFIG,
            "bundled tiny Wan (1.6 M parameters) trained on procedural clips, RGB used as latent",
        ),
        "tiny-wan2.2": tiny_preset(
            "tiny-wan2.2",
            "wan",
            TINY_CONFIG,
            "bundled tiny two-expert Wan (Wan 2.2's shape: 2 x 1.6 M parameters) fine-tuned from tiny-wan, the "
            "high-noise expert on timesteps >= 875, the low-noise expert below",
            guidance_2=3.0,
            boundary_ratio=0.875,
        ),
        **{
            f"wan2.1-t2v-{size}": ModelPreset(
                name=f"wan2.1-t2v-{size}",
                family="wan",
                config={**_REAL_COMMON, "num_attention_heads": heads, "ffn_dim": ffn_dim, "num_layers": layers},
                frames=81,
                height=height,
                width=width,
                guidance=5.0,
                steps=50,
                cache_defaults=cache,
                published_baselines=baselines,
                description=f"Wan-AI/Wan2.1-T2V-{size.upper()}-Diffusers",
            )
            for size, (heads, ffn_dim, layers), (height, width), cache, baselines in (
                ("1.3b", (12, 8960, 30), (480, 832), _WAN_1_3B_CACHE, (_TEACACHE_1_3B, _MAGCACHE_1_3B)),
                ("14b", (40, 13824, 40), (720, 1280), _WAN_14B_CACHE, (_TEACACHE_14B, _MAGCACHE_14B)),
            )
        },
        # Wan 2.2's own configs (Wan-Video/Wan2.2 wan/configs): T2V-A14B samples 40 steps with shift
        # 12.0, boundary 0.875 and guidance (4.0 high-noise, 3.0 low-noise); TI2V-5B 50 steps with
        # shift 5.0 and guidance 5.0 at 704x1280, 121 frames. No published TeaCache or MagCache
        # constants exist for them: calibration measures each expert's tables.
        "wan2.2-t2v-a14b": a14b_preset(
            "wan2.2-t2v-a14b",
            "wan",
            _WAN22_A14B,
            guidance=(4.0, 3.0),
            boundary_ratio=0.875,
            shift=12.0,
            description="Wan-AI/Wan2.2-T2V-A14B-Diffusers (two experts: transformer/ and transformer_2/)",
        ),
        "wan2.2-ti2v-5b": ModelPreset(
            name="wan2.2-ti2v-5b",
            family="wan",
            config=_WAN22_TI2V_5B,
            frames=121,
            height=704,
            width=1280,
            guidance=5.0,
            steps=50,
            cache_defaults=_WAN_1_3B_CACHE,
            scheduler={"flow_shift": 5.0},
            description="Wan-AI/Wan2.2-TI2V-5B-Diffusers (text-to-video; the Wan 2.2 VAE)",
        ),
    }

    def transformer_class(self) -> type[ModelMixin]:
        from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

        return WanTransformer3DModel

    def latent_shape(self, preset: ModelPreset, shapes: Shapes) -> tuple[int, ...]:
        channels = preset.config["in_channels"]
        if preset.tiny:
            return (channels, shapes.frames, shapes.height, shapes.width)
        spatial = _VAE_SPATIAL.get(preset.name, 8)
        if (shapes.frames - 1) % 4 or shapes.height % (2 * spatial) or shapes.width % (2 * spatial):
            raise BadInput(f"{preset.name}: frames must be 4k+1 and height/width multiples of {2 * spatial}")
        return (channels, (shapes.frames - 1) // 4 + 1, shapes.height // spatial, shapes.width // spatial)

    def text_shape(self, preset: ModelPreset) -> tuple[int, int]:
        return (MAX_TOKENS if preset.tiny else 512, preset.config["text_dim"])

    def split(self, transformer: nn.Module, preset: ModelPreset, shapes: Shapes) -> dict[str, nn.Module]:
        _, f, h, w = self.latent_shape(preset, shapes)
        p_t, p_h, p_w = preset.config["patch_size"]
        if f % p_t or h % p_h or w % p_w:
            raise BadInput(f"{preset.name}: latent {f}x{h}x{w} is not divisible by the patch size {p_t}x{p_h}x{p_w}")
        grid = (f // p_t, h // p_h, w // p_w)
        return {"head": _Head(transformer), "blocks": _Blocks(transformer), "tail": _Tail(transformer, grid)}

    def shard_blocks(self, blocks: nn.Module, preset: ModelPreset, shapes: Shapes, shard: SequenceShard) -> None:
        shard.check_heads(preset.config["num_attention_heads"])
        _, f, h, w = self.latent_shape(preset, shapes)
        p_t, p_h, p_w = preset.config["patch_size"]
        shard.tokens((f // p_t) * (h // p_h) * (w // p_w))  # the head's rotary tables are cut with the tokens
        for block in blocks.blocks:  # type: ignore[union-attr]
            block.attn1.processor._parallel_config = shard.diffusers_config

    def scheduler_config(self, preset: ModelPreset) -> dict[str, Any]:
        shift = 5.0 if preset.height >= 720 else 3.0
        return {**_SCHEDULER, "flow_shift": shift, **preset.scheduler}

    def reference_scheduler(self, config: dict[str, Any], preset: ModelPreset) -> dict[str, Any]:
        """UniPC with flow shift 5.0: the authors' Wan scripts (vita-epfl/SenCache Wan2.1/sencache.py
        and sensitivity_calculation.py) sample T2V with `sample_shift` 5.0 at every size, where
        diffusers' Wan 2.1 configs use 3.0 at 480p. Only the shift changes: the unshifted grid stays
        diffusers' linspace(1, 1/1000), which the original Wan code (whose scheduler the authors
        call) spaces as linspace(0.999, 0), at most 0.001 apart, for every run of the engine."""
        if preset.name not in _AUTHORS_PRESETS:
            raise BadInput(
                f"sampling 'reference' is the SenCache authors' Wan 2.1 schedule; they publish none for "
                f"{preset.name}: use 'engine'",
                param="sampling",
            )
        if config.get("_class_name") != _SCHEDULER["_class_name"] or not config.get("use_flow_sigmas"):
            raise BadInput(
                f"sampling 'reference' shifts Wan's flow UniPC scheduler; this bundle's is {config.get('_class_name')}",
                param="sampling",
            )
        return {**config, "flow_shift": REFERENCE_SHIFT}

    def sampler(self, scheduler, steps: int, preset: ModelPreset, shapes: Shapes) -> Sampler:
        return UniPCSampler(scheduler, steps)

    def pipeline_class(self) -> type[Any]:
        from diffusers import WanPipeline

        return WanPipeline

    def decode_real(self, latents: torch.Tensor, pipeline, preset: ModelPreset, shapes: Shapes) -> torch.Tensor:
        vae = pipeline.vae
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(view)
        return vae.decode(latents / std + mean, return_dict=False)[0]
