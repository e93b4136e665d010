"""Our runtime against diffusers' own pipelines built from tiny random components (nobody here
wrote them): the same latents and frames for the same seeds and prompt embeddings, with and
without guidance, batch 1 and 2; and the SenCache trace on those pipelines' timesteps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import engine_for
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.errors import BadInput
from sencache.runtime.families import resolve
from sencache.runtime.families.ltx import pack_text
from sencache.runtime.pipeline import Request
from sencache.runtime.policy import NoCache, SenCacheSettings
from sencache.runtime.sensitivity import SensitivityTable

STEPS = 5
WORDS = "a an the red green blue circle square moving left right fast slow on black two large small".split()


def _text_components(model: str, width: int):
    """A word-level tokenizer and a tiny random T5 (UMT5 for Wan) encoder, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    vocabulary = ["<pad>", "</s>", "<unk>", *WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    config = dict(vocab_size=len(vocabulary), d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    if model.startswith("wan"):
        return tokenizer, UMT5EncoderModel(UMT5Config(**config)).eval()
    return tokenizer, T5EncoderModel(T5Config(**config)).eval()


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
    return transformer, vae, scheduler, (7, 16), (9, 32, 48)


def _wan(variant: str):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return transformer, vae, scheduler, (512, 16), (9, 32, 48)


def _ltx(variant: str):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                             cross_attention_dim=32, num_layers=2, caption_channels=16)
    scaling = (True, True, True, False)  # with patch 4: the real 32x spatial and 8x temporal compression
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=scaling, decoder_spatio_temporal_scaling=scaling,
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, timestep_conditioning=variant == "ltx-video-0.9.1",
                                patch_size=4, patch_size_t=1)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    return transformer, vae, scheduler, (128, 17), (9, 64, 96)


FAMILIES = {"wan2.1-t2v-1.3b": _wan, "ltx-video-0.9.0": _ltx, "ltx-video-0.9.1": _ltx, "cogvideox-2b": _cogvideox, "cogvideox-5b": _cogvideox, "cogvideox1.5-5b": _cogvideox}


@pytest.fixture(scope="module", params=list(FAMILIES))
def real_like(request, tmp_path_factory):
    """A diffusers-format folder of a tiny random model of a real preset, and our bundle of it."""
    model = request.param
    torch.manual_seed(0)
    transformer, vae, scheduler, text, size = FAMILIES[model](model)
    root = tmp_path_factory.mktemp(model)
    reference = build_reference(model, transformer.eval(), vae.eval(), scheduler)
    width = text[1] - 1 if model.startswith("ltx") else text[1]
    reference.tokenizer, reference.text_encoder = _text_components(model, width)
    reference.register_modules(tokenizer=reference.tokenizer, text_encoder=reference.text_encoder)
    reference.save_pretrained(root / "weights")
    frames, height, width = size
    build(BuildOptions(model=model, out=root / "bundle", weights=root / "weights", backend="torch", frames=frames,
                       height=height, width=width, max_batch=2), log=lambda _: None)
    return Case(model, root, text, size)


@dataclass(frozen=True)
class Case:
    model: str
    root: Path
    text: tuple[int, int]
    size: tuple[int, int, int]


def build_reference(model: str, transformer, vae, scheduler):
    adapter, _ = resolve(model)
    pipe = adapter.diffusers_pipeline(transformer, scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(case: Case, batch: int, seed: int) -> np.ndarray:
    """Random prompt embeddings; for LTX with its attention mask (some padding) as the last channel."""
    g = torch.Generator().manual_seed(seed)
    if not case.model.startswith("ltx"):
        return torch.randn(batch, *case.text, generator=g).numpy()
    tokens, channels = case.text
    mask = (torch.arange(tokens)[None] < torch.randint(1, tokens, (batch, 1), generator=g)).numpy()
    return pack_text(torch.randn(batch, tokens, channels - 1, generator=g).numpy(), mask)


def _reference(case: Case, embeds, negative, seeds, guidance, output_type, **options):
    adapter, _ = resolve(case.model)
    pipe = adapter.pipeline_class().from_pretrained(str(case.root / "weights"), local_files_only=True, tokenizer=None,
                                                    text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    text = {"prompt_embeds": torch.from_numpy(embeds), "negative_prompt_embeds": torch.from_numpy(negative)}
    if case.model.startswith("ltx"):
        text = {"prompt_embeds": torch.from_numpy(embeds[..., :-1]), "prompt_attention_mask": torch.from_numpy(embeds[..., -1]),
                "negative_prompt_embeds": torch.from_numpy(negative[..., :-1]),
                "negative_prompt_attention_mask": torch.from_numpy(negative[..., -1])}
    frames, height, width = case.size
    with torch.no_grad():
        out = pipe(**text, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=STEPS,
                   guidance_scale=guidance, height=height, width=width, num_frames=frames, output_type=output_type,
                   **options)
    frames = out.frames
    return frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames, np.float32)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_uncached_latents_match_the_pipeline(real_like, batch, guidance):
    case = real_like
    engine = engine_for(case.root / "bundle")
    seeds = [3, 4][:batch]
    embeds, negative = _embeds(case, batch, 9), _embeds(case, batch, 10)
    ours = engine.generate(Request([f"p{i}" for i in range(batch)], seeds, STEPS, guidance, embeds, negative),
                           NoCache(batch)).latents
    theirs = _reference(case, embeds, negative, seeds, guidance, "latent")
    # Wan's pipeline makes separate cond and uncond calls where we run both rows as one batch: the
    # CPU matmul rounding differs with the batch and guidance amplifies it; batched families match
    # to the last bits.
    tolerance = 2e-5 if case.model.startswith("wan") and guidance > 1 else 2e-6
    np.testing.assert_allclose(ours, theirs, atol=tolerance, rtol=0)


def test_prompts_are_encoded_by_the_pipelines_own_text_encoder(real_like):
    """Prompts (not embeddings): our runtime encodes them through diffusers' components loaded
    from the weights folder, and the whole run matches `pipe(prompt=...)`."""
    case = real_like
    engine = engine_for(case.root / "bundle")
    prompts = ["a red circle moving left fast", "two large blue squares on black"]
    ours = engine.decode(engine.generate(Request(prompts, [3, 4], STEPS, 6.0), NoCache(2)).latents)
    adapter, _ = resolve(case.model)
    pipe = adapter.pipeline_class().from_pretrained(str(case.root / "weights"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    frames, height, width = case.size
    with torch.no_grad():
        theirs = pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                      num_inference_steps=STEPS, guidance_scale=6.0, height=height, width=width, num_frames=frames,
                      max_sequence_length=case.text[0], output_type="np").frames
    np.testing.assert_allclose(ours, np.asarray(theirs, np.float32), atol=1e-5, rtol=0)


def test_frames_match_the_pipeline(real_like):
    case = real_like
    engine = engine_for(case.root / "bundle")
    embeds, negative = _embeds(case, 2, 9), _embeds(case, 2, 10)
    result = engine.generate(Request(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative), NoCache(2))
    ours = engine.decode(result.latents)
    theirs = _reference(case, embeds, negative, [3, 4], 6.0, "np")
    assert ours.shape == theirs.shape == (2, *case.size, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_sencache_trace_applies_the_rule_on_the_pipeline_timesteps(real_like):
    """Recompute every step of the trace from SPEC sections 1-3 with the pipeline's own timesteps."""
    case = real_like
    engine = engine_for(case.root / "bundle")
    steps, batch = 12, 2
    timesteps = np.asarray(engine.sampler(steps).timesteps, np.float64)
    table = SensitivityTable(timesteps[::-1].copy(), np.linspace(0.5, 1.5, steps), np.linspace(2e-3, 1e-3, steps),
                             counts=np.ones(steps), meta={"source": "test"})
    engine.bundle.write_sensitivity(table)
    settings = SenCacheSettings(eps_start=0.02, eps_main=0.6, max_reuse=2)
    policy = engine.policy("sencache", steps, batch, {"eps_start": 0.02, "eps_main": 0.6, "max_reuse": 2})
    embeds, negative = _embeds(case, batch, 1), _embeds(case, batch, 2)
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
    case = real_like
    frames, height, width = case.size
    build(BuildOptions(model=case.model, out=case.root / "onnx", weights=case.root / "weights", backend="onnxruntime",
                       frames=frames, height=height, width=width, max_batch=2), log=lambda _: None)
    embeds, negative = _embeds(case, 2, 9), _embeds(case, 2, 10)
    request = Request(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative)
    ours = engine_for(case.root / "onnx").generate(request, NoCache(2)).latents
    reference = engine_for(case.root / "bundle").generate(request, NoCache(2)).latents
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-4


def test_a_sample_is_the_same_alone_or_in_a_batch(real_like):
    """SPEC section 3 on each family's real stepping (DPM draws solver noise per sample)."""
    case = real_like
    engine = engine_for(case.root / "bundle")
    steps = 10
    timesteps = np.asarray(engine.sampler(steps).timesteps, np.float64)
    engine.bundle.write_sensitivity(SensitivityTable(timesteps[::-1].copy(), np.full(steps, 1.0),
                                                     np.full(steps, 1e-3), meta={"source": "test"}))
    knobs = {"eps_start": 0.02, "eps_main": 0.8, "max_reuse": 2}
    embeds, negative = _embeds(case, 2, 5), _embeds(case, 2, 6)
    both = engine.generate(Request(["a", "b"], [21, 22], steps, 6.0, embeds, negative),
                           engine.policy("sencache", steps, 2, knobs))
    for b in range(2):
        alone = engine.generate(Request(["x"], [21 + b], steps, 6.0, embeds[b:b + 1], negative[b:b + 1]),
                                engine.policy("sencache", steps, 1, knobs))
        assert alone.decisions[0] == both.decisions[b]
        np.testing.assert_allclose(alone.latents[0], both.latents[b], atol=1e-5, rtol=0)
    assert any("reuse" in d for d in both.decisions)


def test_calibration_runs_on_the_real_pipeline_components(real_like, tmp_path):
    """Calibration of a real-format bundle: prompts through diffusers' text encoder, the family's
    own stepping (DPM and flow-matching included), finite tables for every step."""
    case = real_like
    engine = engine_for(case.root / "bundle")
    calibration = calibrate(engine, CalibrationPlan(samples=2, steps=4), show_progress=False)
    table = calibration.sensitivity
    assert len(table.timesteps) == 3 and np.all(table.jx > 0) and np.all(table.jt > 0)
    assert len(calibration.baselines.magcache_ratios) == 4


def test_dynamic_cfg_matches_cogvideox_pipeline(real_like):
    case = real_like
    engine = engine_for(case.root / "bundle")
    embeds, negative = _embeds(case, 2, 9), _embeds(case, 2, 10)
    request = Request(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative, dynamic_cfg=True)
    if not case.model.startswith("cogvideox"):
        with pytest.raises(BadInput, match="--dynamic-cfg"):
            engine.generate(request, NoCache(2))
        return
    ours = engine.generate(request, NoCache(2)).latents
    theirs = _reference(case, embeds, negative, [3, 4], 6.0, "latent", use_dynamic_cfg=True)
    np.testing.assert_allclose(ours, theirs, atol=2e-6, rtol=0)
    plain = engine.generate(Request(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative), NoCache(2)).latents
    assert np.abs(plain - ours).max() > 1e-3
