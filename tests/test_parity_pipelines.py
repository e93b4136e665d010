"""Our runtime against diffusers' own pipelines built from tiny random components (nobody here
wrote them): the same latents and frames for the same seeds and prompt embeddings, with and
without guidance, batch 1 and 2; and the SenCache trace on those pipelines' timesteps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import engine_for
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.pipeline import Request
from sencache.runtime.policy import NoCache, SenCacheSettings
from sencache.runtime.sensitivity import SensitivityTable

FRAMES, HEIGHT, WIDTH, STEPS = 9, 32, 48, 5


def _cogvideox(variant: str):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXTransformer3DModel,
    )

    config = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
                  text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                  temporal_compression_ratio=4, max_text_seq_length=7,
                  use_rotary_positional_embeddings=variant != "cogvideox-2b")
    if variant == "cogvideox1.5-5b":
        config.update(patch_size_t=2, patch_bias=False)  # 3 latent frames: the pipeline pads to 4
    transformer = CogVideoXTransformer3DModel(**config)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    scheduler_class = CogVideoXDPMScheduler if variant == "cogvideox1.5-5b" else CogVideoXDDIMScheduler
    scheduler = scheduler_class(beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                snr_shift_scale=1.0, timestep_spacing="trailing", clip_sample=False)
    return transformer, vae, scheduler, (7, 16)


def _wan(variant: str):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return transformer, vae, scheduler, (512, 16)


FAMILIES = {"wan2.1-t2v-1.3b": _wan, "cogvideox-2b": _cogvideox, "cogvideox-5b": _cogvideox, "cogvideox1.5-5b": _cogvideox}


@pytest.fixture(scope="module", params=list(FAMILIES))
def real_like(request, tmp_path_factory):
    """A diffusers-format folder of a tiny random model of a real preset, and our bundle of it."""
    model = request.param
    torch.manual_seed(0)
    transformer, vae, scheduler, text = FAMILIES[model](model)
    root = tmp_path_factory.mktemp(model)
    adapter_pipe = build_reference(model, transformer.eval(), vae.eval(), scheduler)
    adapter_pipe.save_pretrained(root / "weights")
    build(BuildOptions(model=model, out=root / "bundle", weights=root / "weights", backend="torch", frames=FRAMES,
                       height=HEIGHT, width=WIDTH, max_batch=2), log=lambda _: None)
    return model, root, text


def build_reference(model: str, transformer, vae, scheduler):
    from sencache.runtime.families import resolve

    adapter, _ = resolve(model)
    pipe = adapter.diffusers_pipeline(transformer, scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(batch: int, text: tuple[int, int], seed: int) -> np.ndarray:
    return torch.randn(batch, *text, generator=torch.Generator().manual_seed(seed)).numpy()


def _reference(root: Path, model: str, embeds, negative, seeds, guidance, output_type):
    from sencache.runtime.families import resolve

    adapter, _ = resolve(model)
    pipe = adapter.pipeline_class().from_pretrained(str(root / "weights"), local_files_only=True, tokenizer=None,
                                                    text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt_embeds=torch.from_numpy(embeds), negative_prompt_embeds=torch.from_numpy(negative),
                   generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=STEPS,
                   guidance_scale=guidance, height=HEIGHT, width=WIDTH, num_frames=FRAMES, output_type=output_type)
    frames = out.frames
    return frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames, np.float32)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_uncached_latents_match_the_pipeline(real_like, batch, guidance):
    model, root, text = real_like
    engine = engine_for(root / "bundle")
    seeds = [3, 4][:batch]
    embeds, negative = _embeds(batch, text, 9), _embeds(batch, text, 10)
    ours = engine.generate(Request([f"p{i}" for i in range(batch)], seeds, STEPS, guidance, embeds, negative),
                           NoCache(batch)).latents
    theirs = _reference(root, model, embeds, negative, seeds, guidance, "latent")
    # Wan's pipeline makes separate cond and uncond calls where we run both rows as one batch: the
    # CPU matmul rounding differs with the batch and guidance amplifies it; batched families match
    # to the last bits.
    tolerance = 2e-5 if model.startswith("wan") and guidance > 1 else 2e-6
    np.testing.assert_allclose(ours, theirs, atol=tolerance, rtol=0)


def test_frames_match_the_pipeline(real_like):
    model, root, text = real_like
    engine = engine_for(root / "bundle")
    embeds, negative = _embeds(2, text, 9), _embeds(2, text, 10)
    result = engine.generate(Request(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative), NoCache(2))
    ours = engine.decode(result.latents)
    theirs = _reference(root, model, embeds, negative, [3, 4], 6.0, "np")
    assert ours.shape == theirs.shape == (2, FRAMES, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_sencache_trace_applies_the_rule_on_the_pipeline_timesteps(real_like):
    """Recompute every step of the trace from SPEC sections 1-3 with the pipeline's own timesteps."""
    model, root, text = real_like
    engine = engine_for(root / "bundle")
    steps, batch = 12, 2
    scheduler = engine.scheduler()
    scheduler.set_timesteps(steps)
    timesteps = np.asarray(scheduler.timesteps, np.float64)
    table = SensitivityTable(timesteps[::-1].copy(), np.linspace(0.5, 1.5, steps), np.linspace(2e-3, 1e-3, steps),
                             counts=np.ones(steps), meta={"source": "test"})
    engine.bundle.write_sensitivity(table)
    settings = SenCacheSettings(eps_start=0.02, eps_main=0.6, max_reuse=2)
    policy = engine.policy("sencache", steps, batch, {"eps_start": 0.02, "eps_main": 0.6, "max_reuse": 2})
    embeds, negative = _embeds(batch, text, 1), _embeds(batch, text, 2)
    result = engine.generate(Request(["a", "b"], [7, 8], steps, 6.0, embeds, negative), policy, record=True)
    assert result.timesteps == [float(t) for t in timesteps]
    numel = engine.numel
    switch = round(0.2 * steps)
    for b in range(batch):
        anchor, reuses = None, 0
        for i, step in enumerate(result.trace[b]):
            x = result.trajectory[i][b].astype(np.float64)
            eps = settings.eps_start if i < switch else settings.eps_main
            forced = i in (0, steps - 1)
            if anchor is None or forced:
                expected = "run"
            else:
                ax, at = anchor
                jx, jt = np.interp(at, table.timesteps, table.jx), np.interp(at, table.timesteps, table.jt)
                score = (jx * np.linalg.norm(x - ax) + jt * abs(timesteps[i] - at)) / math.sqrt(numel)
                assert step["score"] == pytest.approx(score, rel=1e-5)
                assert step["eps"] == pytest.approx(eps)
                expected = "reuse" if score < eps and reuses < settings.max_reuse else "run"
            assert step["decision"] == expected, (b, i)
            if expected == "run":
                anchor, reuses = (x, timesteps[i]), 0
            else:
                reuses += 1
    assert any("reuse" in d for d in result.decisions)


def test_onnx_bundle_matches_the_pytorch_bundle(real_like):
    """The exported stages (dynamic batch) through ONNX Runtime against the same loop in PyTorch."""
    model, root, text = real_like
    build(BuildOptions(model=model, out=root / "onnx", weights=root / "weights", backend="onnxruntime", frames=FRAMES,
                       height=HEIGHT, width=WIDTH, max_batch=2), log=lambda _: None)
    embeds, negative = _embeds(2, text, 9), _embeds(2, text, 10)
    request = Request(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative)
    ours = engine_for(root / "onnx").generate(request, NoCache(2)).latents
    reference = engine_for(root / "bundle").generate(request, NoCache(2)).latents
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-4
