"""A request made ready to queue: its rows checked against the bundle, its text embeddings,
sampler and guidance schedule, its starting noise on the device. Done on the caller's thread
before the request reaches the scheduler, because text encoding can be slow."""

from __future__ import annotations

import numpy as np
import torch

from sencache.runtime.cache import CachePolicy
from sencache.runtime.denoiser import Denoiser
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import experts_of
from sencache.runtime.memory import check_memory, needed_bytes
from sencache.runtime.request import GenerationParams, RequestState


def prepare(
    model: Denoiser, request: GenerationParams, policy: CachePolicy | None = None, record: bool = False
) -> RequestState:
    """The state `request` starts from under `policy` (None: the rule of the request's cache method
    and knobs); `record` keeps the denoiser input latent of every step in its result (calibration).
    BadInput when the bundle cannot take it."""
    boundary = model.bundle.manifest.boundary
    if request.guidance_2 is not None and boundary is None:
        raise BadInput(
            f"guidance_2 is the second expert's guidance; {model.bundle.manifest.model} has one expert",
            param="guidance_2",
        )
    if policy is None:
        policy = model.policy(request.cache, request.steps, len(request.prompts), request.knobs)
    job_rows = len(request.prompts) * (2 if request.cfg else 1)
    if job_rows > model.max_rows:
        raise BadInput(
            f"prompt gives {len(request.prompts)} samples, which need {job_rows} rows; the bundle was built for "
            f"at most {model.bundle.shapes.max_batch} samples (build it with a larger max_batch)",
            param="prompt",
        )
    needed = needed_bytes(model.bundle.manifest, len(request.prompts), 2 if request.cfg else 1)
    check_memory(needed, model.backend.device)
    generators = sample_generators(request.seeds)
    conditions = model.conditions(request.image, generators)  # drawn before the noise, as the pipelines do
    text = model.embeddings(request.prompt_embeds, request.prompts, "prompt_embeds")
    if request.cfg:
        negative = model.embeddings(
            request.negative_prompt_embeds, [""] * len(request.prompts), "negative_prompt_embeds"
        )
        text = np.concatenate([text, negative])
    sampler = model.sampler(request.steps, request.sampling)
    timesteps = [float(t) for t in sampler.timesteps]
    experts = experts_of(timesteps, boundary)
    guidance = [request.guidance, request.guidance if request.guidance_2 is None else request.guidance_2]
    scales = (
        [model.adapter.dynamic_guidance(request.guidance, t, request.steps) for t in timesteps]
        if request.dynamic_cfg
        else [guidance[e] for e in experts]
    )
    with model.stream():  # the loop's tensors belong to the engine's stream (on a GPU)
        x = model.start_latents(model.initial_latents(generators), conditions).to(model.backend.device)
        text_rows, anchor = model.to_device(text), torch.zeros_like(x)
        condition_rows = {
            k: (torch.cat([v, v]) if request.cfg else v).to(model.backend.device, torch.float32).contiguous()
            for k, v in conditions.items()
            if k in model.layout.conditions
        }
    return RequestState(
        id=0,
        request=request,
        policy=policy,
        sampler=sampler,
        generators=generators,
        timesteps=timesteps,
        scales=scales,
        text=text_rows,
        x=x,
        anchor=anchor,
        conditions=condition_rows,
        experts=experts,
        decisions=[[] for _ in request.prompts],
        trace=[[] for _ in request.prompts],
        trajectory=[] if record else None,
    )


def sample_generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per sample: its starting noise and any solver noise come from its own seed."""
    return [torch.Generator().manual_seed(s) for s in seeds]
