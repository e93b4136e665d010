"""CogVideoX text-to-video: diffusers' CogVideoXTransformer3DModel split into head / blocks / tail.

Facts of the real pipeline (diffusers' CogVideoXPipeline): latents [F, C, H/8, W/8] with
F = (frames - 1) / 4 + 1, padded at the front to a multiple of patch_size_t (CogVideoX 1.5) and
the padding dropped before decoding; integer timesteps 0..999 from the CogVideoX DDIM or DPM
scheduler (v-prediction); cond and uncond batched in one call; text (T5, 226 tokens) and video
tokens share the blocks, which update both streams; rotary tables computed by the pipeline, not by
the transformer. The rotary tables depend only on the bundle's static grid, so they are baked into
the blocks stage as constants, computed with the pipeline's own functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sencache.runtime.conventions import SenCacheConventions
from sencache.runtime.errors import BadInput
from sencache.runtime.families.base import (
    TINY_CACHE,
    FamilyAdapter,
    ModelPreset,
    Sampler,
    Shapes,
    StageLayout,
    TinyClipAxes,
    register_family,
    tiny_preset,
)
from sencache.runtime.tiny_grammar import MAX_TOKENS

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

    from sencache.runtime.parallel.sequence import SequenceShard

_REAL_COMMON: dict[str, Any] = {
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": 512,
    "text_embed_dim": 4096,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_width": 90,
    "sample_height": 60,
    "sample_frames": 49,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "use_learned_positional_embeddings": False,
}

TINY_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 3,
    "out_channels": 3,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": 128,
    "text_embed_dim": 32,
    "num_layers": 6,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_width": 32,
    "sample_height": 32,
    "sample_frames": 8,
    "patch_size": 4,
    "patch_size_t": 2,
    "temporal_compression_ratio": 1,
    "max_text_seq_length": MAX_TOKENS,
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": True,
    "use_learned_positional_embeddings": False,
    "patch_bias": False,
}

_SCHEDULER_COMMON: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}

# TeaCache's published polynomials (shared/reference/baseline_constants.json, TeaCache @7c10efc4);
# MagCache publishes no CogVideoX ratios: `sencache calibrate` measures them.
_TEACACHE_2B = (-31.0658903, 25.4732368, -5.92380459, 1.75769064, -0.00361568434)
_TEACACHE_5B = (-1538.80483, 843.202495, -134.363087, 7.97131516, -0.0523162339)
_TEACACHE_1_5 = (250.210439, -165.061612, 35.7804877, -0.781551492, 0.0358559703)

# SPEC section 1 (authors' CogVideoX argparse defaults); TeaCache's slow setting.
_CACHE = {
    "sencache": {"eps_start": 0.005, "eps_main": 0.07, "max_reuse": 10},
    "teacache": {"threshold": 0.1},
    "magcache": {"threshold": 0.12, "max_reuse": 4, "retention": 0.2},
}


def thudm_preset(
    name: str,
    family: str,
    config: dict[str, Any],
    size: tuple[int, int, int],
    teacache: tuple[float, ...],
    description: str,
    snr_shift_scale: float = 1.0,
) -> ModelPreset:
    """A CogVideoX model sampled as THUDM publishes it (DDIM with `snr_shift_scale`, guidance 6.0,
    50 steps): `config` its transformer's settings over the common ones, `size` (frames, height,
    width) its default video, `teacache` TeaCache's published polynomial for it."""
    return ModelPreset(
        name=name,
        family=family,
        config={**_REAL_COMMON, **config},
        frames=size[0],
        height=size[1],
        width=size[2],
        guidance=6.0,
        steps=50,
        cache_defaults=_CACHE,
        scheduler={"_class_name": "CogVideoXDDIMScheduler", **_SCHEDULER_COMMON, "snr_shift_scale": snr_shift_scale},
        published_baselines=(teacache, None),
        description=description,
    )


# `t` is the diffusers transformer, typed Any: its submodules are set from its config and read through
# nn.Module.__getattr__, which mypy types as Tensor | Module.
class _Head(nn.Module):
    def __init__(self, t: Any) -> None:
        super().__init__()
        self.t = t

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor):
        t = self.t
        temb = t.time_embedding(t.time_proj(timestep).to(dtype=latent.dtype))
        tokens = t.patch_embed(text, latent)
        words = text.shape[1]
        return tokens[:, words:], tokens[:, :words], temb


class _Blocks(nn.Module):
    def __init__(self, t: Any, rope: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        super().__init__()
        self.blocks = t.transformer_blocks
        self.rotary = rope is not None
        if rope is not None:
            self.register_buffer("rope_cos", rope[0], persistent=False)
            self.register_buffer("rope_sin", rope[1], persistent=False)

    def forward(self, hidden: torch.Tensor, encoder: torch.Tensor, temb: torch.Tensor):
        rope = (self.rope_cos, self.rope_sin) if self.rotary else None
        for block in self.blocks:
            hidden, encoder = block(hidden, encoder, temb, rope)
        return hidden, encoder


class _Tail(nn.Module):
    def __init__(self, t: Any, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.t = t
        self.grid = grid

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        t = self.t
        hidden = t.proj_out(t.norm_out(t.norm_final(hidden), temb=temb))
        f, h, w = self.grid
        p, p_t = t.config.patch_size, t.config.patch_size_t
        if p_t is None:
            out = hidden.reshape(hidden.shape[0], f, h, w, -1, p, p)
            return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        out = hidden.reshape(hidden.shape[0], f, h, w, -1, p_t, p, p)
        return out.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)


def _bake_positions(transformer: Any, frames: int, height: int, width: int) -> None:
    """Sinusoidal models (CogVideoX-2b) compute their position table inside the patch embedding,
    on the fly when the grid differs from the config's sample size, by an in-place write the
    exporter cannot trace. Compute it once with diffusers' own function and install it as the table
    for this grid: the same values, now a constant. The transformer then serves this grid only,
    which is what a bundle is built for."""
    embed = transformer.patch_embed
    if not embed.use_positional_embeddings:
        return
    frames_before_compression = (frames - 1) * embed.temporal_compression_ratio + 1
    if (embed.sample_height, embed.sample_width, embed.sample_frames) == (height, width, frames_before_compression):
        return
    table = embed._get_positional_embeddings(height, width, frames_before_compression, device=transformer.device)
    embed.register_buffer("pos_embedding", table, persistent=False)
    embed.sample_height, embed.sample_width, embed.sample_frames = height, width, frames_before_compression


@dataclass(frozen=True)
class _DPMStep:
    """The scalars of one CogVideoX DPM-Solver++(2M) step, from the schedule alone."""

    root_alpha: torch.Tensor
    root_beta: torch.Tensor
    mult: tuple[torch.Tensor, ...]
    mult_noise: torch.Tensor
    final: bool
    """The last step (no earlier timestep to fall back to): first order, one noise draw."""


class CogVideoXSampler(Sampler):
    """The pipeline's stepping: the DPM scheduler carries the previous x0 prediction and the
    previous timestep; both schedulers take eta 0 and the per-sample generators.

    The DPM step is diffusers' arithmetic with its scalars computed once per step from the
    schedule (by the scheduler's own get_variables / get_mult), and its noise drawn from each
    sample's generator on the host, in diffusers' order (one draw on a first-order step, two on
    a second-order one), then copied through pinned memory: diffusers' step copies it from
    pageable memory, a host wait on a GPU. Equal to diffusers' step (tests/test_solvers.py)."""

    def __init__(self, scheduler, steps: int) -> None:
        from diffusers import CogVideoXDPMScheduler

        super().__init__(scheduler, steps)
        self._dpm = isinstance(scheduler, CogVideoXDPMScheduler)
        if self._dpm and scheduler.config.prediction_type != "v_prediction":
            raise BadInput(
                f"CogVideoX DPM with prediction type {scheduler.config.prediction_type!r}: the pipeline predicts v"
            )
        self._previous_x0: torch.Tensor | None = None
        self._injected: tuple[float, torch.Tensor] | None = None
        self._steps = [self._dpm_step(i) for i in range(len(self.timesteps))] if self._dpm else []

    def start_at(self, index: int) -> None:
        self._previous_x0 = None

    def _dpm_step(self, index: int) -> _DPMStep:
        scheduler = self.scheduler
        t = self.timesteps[index]
        back = self.timesteps[index - 1] if index > 0 else None
        previous = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alpha = scheduler.alphas_cumprod[t]
        alpha_prev = scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
        alpha_back = scheduler.alphas_cumprod[back] if back is not None else None
        h, r, _, _ = scheduler.get_variables(alpha, alpha_prev, alpha_back)
        mult = tuple(scheduler.get_mult(h, r, alpha, alpha_prev, alpha_back))
        mult_noise = (1 - alpha_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        return _DPMStep(alpha**0.5, (1 - alpha) ** 0.5, mult, mult_noise, bool(previous < 0))

    def step(
        self, index: int, noise: torch.Tensor, x: torch.Tensor, generators: list[torch.Generator] | None = None
    ) -> torch.Tensor:
        t = self.timesteps[index]
        if not self._dpm:
            return self.scheduler.step(noise, t, x, eta=0.0, generator=generators, return_dict=False)[0]
        if generators is None:
            raise ValueError("CogVideoX's DPM solver draws noise: pass each sample's generator")
        c = self._steps[index]
        x0 = c.root_alpha * x - c.root_beta * noise
        draw = _noise(generators, x)
        previous, self._previous_x0 = self._previous_x0, x0
        if previous is None or c.final:
            added = c.mult_noise * draw
            self._injected = (float(c.mult[0]), added)
            return c.mult[0] * x - c.mult[1] * x0 + added
        denoised = c.mult[2] * x0 - c.mult[3] * previous
        added = c.mult_noise * _noise(generators, x)
        self._injected = (float(c.mult[0]), added)
        return c.mult[0] * x - c.mult[1] * denoised + added

    def injected(self) -> tuple[float, torch.Tensor] | None:
        """The DPM step's noise term `mult_noise * draw` and its factor `mult[0]` on the input: the
        noise carried through the step's linear map with the prediction held apart (an ideal
        denoiser's prediction does not see fresh noise). None under DDIM (eta 0: no noise)."""
        return self._injected if self._dpm else None

    def noised(self, index: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`x0` noised to timestep `index` by the scheduler's own add_noise (sqrt(a) x0 + sqrt(1 - a)
        noise with its alphas_cumprod), the forward process CogVideoX is trained with."""
        return self.scheduler.add_noise(x0, noise, self.timesteps[index])


def _noise(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One standard normal draw per sample from its own generator (diffusers' randn_tensor with a
    list of host generators), on the device of `like` without a host wait."""
    draws = torch.cat([torch.randn((1, *like.shape[1:]), generator=g, dtype=like.dtype) for g in generators])
    if like.device.type == "cpu":
        return draws
    return draws.pin_memory().to(like.device, non_blocking=True)


@register_family
class CogVideoXAdapter(FamilyAdapter):
    family = "cogvideox"
    layout = StageLayout(
        streams=("hidden", "encoder"),
        block_context=("temb",),
        tail_context=("temb",),
        tail_streams=("hidden",),
        tokens=("hidden",),
    )
    modulation = "temb"
    tiny_format = TinyClipAxes((0, 1, 4, 2, 3))  # [B, F, C, H, W]
    # vita-epfl/SenCache CogVideoX/sencache.py: one call per step, switch at round(0.2 N), the
    # first and the last step always run, the nearest calibrated timestep, a fixed constant.
    sencache_reference = SenCacheConventions(
        switch_frac=0.2, retain_steps=1, nearest_lookup=True, score_constant=1099.8181667894016
    )
    aliases = {"cogvideox": "cogvideox1.5-5b"}
    presets = {
        "tiny-cogvideox": tiny_preset(
            "tiny-cogvideox",
            "cogvideox",
            TINY_CONFIG,
            "bundled tiny CogVideoX 1.5-style (rotary, 2x4x4 patches) trained on procedural clips, RGB used as latent",
            cache_defaults={  # eps_main from benchmarks/results/tiny-cogvideox (0.3 never reuses under DPM)
                **TINY_CACHE,
                "sencache": {"eps_start": 0.05, "eps_main": 0.6, "max_reuse": 3},
            },
            scheduler={"_class_name": "CogVideoXDPMScheduler", **_SCHEDULER_COMMON, "snr_shift_scale": 1.0},
        ),
        "cogvideox-2b": thudm_preset(
            "cogvideox-2b",
            "cogvideox",
            {"num_attention_heads": 30, "num_layers": 30, "use_rotary_positional_embeddings": False},
            (49, 480, 720),
            _TEACACHE_2B,
            "THUDM/CogVideoX-2b",
            snr_shift_scale=3.0,
        ),
        "cogvideox-5b": thudm_preset(
            "cogvideox-5b",
            "cogvideox",
            {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True},
            (49, 480, 720),
            _TEACACHE_5B,
            "THUDM/CogVideoX-5b",
        ),
        "cogvideox1.5-5b": thudm_preset(
            "cogvideox1.5-5b",
            "cogvideox",
            {
                "num_attention_heads": 48,
                "num_layers": 42,
                "sample_width": 170,
                "sample_height": 96,
                "sample_frames": 81,
                "patch_size_t": 2,
                "patch_bias": False,
                "use_rotary_positional_embeddings": True,
            },
            (81, 768, 1360),
            _TEACACHE_1_5,
            "THUDM/CogVideoX1.5-5B (81x768x1360: 21 latent frames padded to 22)",
        ),
    }

    def transformer_class(self) -> type[ModelMixin]:
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel

    def padding_frames(self, preset: ModelPreset, shapes: Shapes) -> int:
        """Latent frames the pipeline prepends so patch_size_t divides the frame count."""
        frames = self._latent_frames(preset, shapes)
        p_t = preset.config.get("patch_size_t")
        return 0 if p_t is None or frames % p_t == 0 else p_t - frames % p_t

    def _latent_frames(self, preset: ModelPreset, shapes: Shapes) -> int:
        if preset.tiny:
            return shapes.frames
        if (shapes.frames - 1) % 4:
            raise BadInput(f"{preset.name}: frames must be 4k+1 (the VAE compresses time 4x), got {shapes.frames}")
        return (shapes.frames - 1) // 4 + 1

    def latent_shape(self, preset: ModelPreset, shapes: Shapes) -> tuple[int, ...]:
        channels = preset.config["in_channels"]
        frames = self._latent_frames(preset, shapes) + self.padding_frames(preset, shapes)
        if preset.tiny:
            return (frames, channels, shapes.height, shapes.width)
        step = 8 * preset.config["patch_size"]
        if shapes.height % step or shapes.width % step:
            raise BadInput(f"{preset.name}: height and width must be multiples of {step}")
        return (frames, channels, shapes.height // 8, shapes.width // 8)

    def text_shape(self, preset: ModelPreset) -> tuple[int, int]:
        return (MAX_TOKENS if preset.tiny else preset.config["max_text_seq_length"], preset.config["text_embed_dim"])

    def rotary(self, preset: ModelPreset, shapes: Shapes) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pipeline's rotary tables for this grid (diffusers' own functions), or None when the
        model uses sinusoidal positions inside its patch embedding (CogVideoX-2b)."""
        if not preset.config.get("use_rotary_positional_embeddings"):
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        frames, _, height, width = self.latent_shape(preset, shapes)
        config = preset.config
        p, p_t = config["patch_size"], config.get("patch_size_t")
        grid = (height // p, width // p)
        base_width, base_height = config["sample_width"] // p, config["sample_height"] // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid(grid, base_width, base_height)
            table = get_3d_rotary_pos_embed(
                embed_dim=config["attention_head_dim"],
                crops_coords=crops,
                grid_size=grid,
                temporal_size=frames,
                device=torch.device("cpu"),
            )
        else:
            table = get_3d_rotary_pos_embed(
                embed_dim=config["attention_head_dim"],
                crops_coords=None,
                grid_size=grid,
                temporal_size=(frames + p_t - 1) // p_t,
                grid_type="slice",
                max_size=(base_height, base_width),
                device=torch.device("cpu"),
            )
        assert isinstance(table, tuple), "use_real (the default) gives the (cos, sin) pair"
        return table

    def split(self, transformer: nn.Module, preset: ModelPreset, shapes: Shapes) -> dict[str, nn.Module]:
        frames, _, height, width = self.latent_shape(preset, shapes)
        p, p_t = preset.config["patch_size"], preset.config.get("patch_size_t") or 1
        if height % p or width % p or frames % p_t:
            raise BadInput(f"{preset.name}: latent {frames}x{height}x{width} is not divisible by the patch size")
        _bake_positions(transformer, frames, height, width)
        rope = self.rotary(preset, shapes)
        if rope is not None and transformer.device.type == "meta":
            rope = (rope[0].to("meta"), rope[1].to("meta"))
        grid = (frames // p_t, height // p, width // p)
        return {"head": _Head(transformer), "blocks": _Blocks(transformer, rope), "tail": _Tail(transformer, grid)}

    def shard_blocks(self, blocks: nn.Module, preset: ModelPreset, shapes: Shapes, shard: SequenceShard) -> None:
        from sencache.runtime.parallel.sequence import JointUlyssesProcessor

        shard.check_heads(preset.config["num_attention_heads"])
        frames, _, height, width = self.latent_shape(preset, shapes)
        p, p_t = preset.config["patch_size"], preset.config.get("patch_size_t") or 1
        part = shard.tokens((frames // p_t) * (height // p) * (width // p))
        tables: Any = blocks  # its rotary tables are buffers, typed Tensor | Module through nn.Module
        if tables.rotary:
            tables.rope_cos = tables.rope_cos[part].contiguous()
            tables.rope_sin = tables.rope_sin[part].contiguous()
        for block in tables.blocks:
            block.attn1.set_processor(JointUlyssesProcessor(shard))

    def dynamic_guidance(self, guidance: float, t: float, steps: int) -> float:
        """CogVideoXPipeline's `use_dynamic_cfg` formula, as written there: it takes the timestep
        value (0..999), not the step index, against the number of steps."""
        return 1 + guidance * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)

    def sampler(self, scheduler, steps: int, preset: ModelPreset, shapes: Shapes) -> Sampler:
        return CogVideoXSampler(scheduler, steps)

    def pipeline_class(self) -> type[Any]:
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline

    def decode_real(self, latents: torch.Tensor, pipeline, preset: ModelPreset, shapes: Shapes) -> torch.Tensor:
        return pipeline.decode_latents(latents[:, self.padding_frames(preset, shapes) :])
