"""Our denoising loop against diffusers' own pipeline (nobody here wrote it), same seeds and embeddings."""

import numpy as np
import pytest
import torch

from conftest import engine_for
from sencache.runtime.cache import NoCache
from sencache.runtime.families.parts import build_transformer, diffusers_pipeline
from sencache.runtime.preparation import sample_generators
from sencache.runtime.request import GenerationParams

PROMPTS = ["two small red circles moving left fast on texture", "one large cyan square static on gradient"]


def diffusers_latents(engine, prompts, seeds, steps, guidance):
    shapes = engine.bundle.shapes
    transformer = build_transformer(engine.adapter, engine.preset, engine.bundle.checked_folder("transformer"))
    pipe = diffusers_pipeline(engine.adapter, transformer, engine.scheduler())
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(
            prompt_embeds=torch.from_numpy(engine.encode(prompts)),
            negative_prompt_embeds=torch.from_numpy(engine.encode([""] * len(prompts))),
            latents=engine.initial_latents(sample_generators(seeds)),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=shapes.height,
            width=shapes.width,
            num_frames=shapes.frames,
            output_type="latent",
        )
    return out.frames.numpy()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_uncached_loop_matches_wan_pipeline(torch_bundle, batch, guidance):
    engine = engine_for(torch_bundle)
    prompts, seeds = PROMPTS[:batch], [5, 6][:batch]
    ours = engine.generate(GenerationParams(prompts, seeds, 6, guidance), NoCache(batch)).latents
    theirs = diffusers_latents(engine, prompts, seeds, 6, guidance)
    # With CFG we run cond and uncond as one batch of rows where the pipeline makes two calls: the
    # float rounding of CPU matmuls differs with the batch, and guidance 4 amplifies it 7-fold.
    np.testing.assert_allclose(ours, theirs, atol=2e-5 if guidance == 1.0 else 5e-4, rtol=0)
