"""External peers: diffusers' own pipeline and cache hooks, on the PyTorch path, same model and seeds.

The pipeline (WanPipeline for Wan) runs its own denoising loop over the transformer with
diffusers' MagCache or FirstBlockCache hook; it gets our text embeddings and initial noise and
returns latents. NFE counts the steps in which the conditional call ran the last block. diffusers
decides once per batch and cache context, not per sample; runs here go one sample at a time so
each sample gets the rule's own decisions.
"""

from __future__ import annotations

import ast
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.runtime.errors import BadInput
from sencache.runtime.families.parts import build_transformer, diffusers_pipeline
from sencache.runtime.model import Model
from sencache.runtime.preparation import sample_generators

PEERS = ("diffusers-magcache", "diffusers-fbc")


class _RatioCatcher(logging.Handler):
    """Keeps what diffusers' MagCache calibration mode reports (its log record of the ratios)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ratios: list[list[float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("MagCache Calibration Results:"):
            self.ratios.append([float(v) for v in ast.literal_eval(message.split(":", 1)[1].strip())])


class DiffusersPeers:
    def __init__(self, engine: Model) -> None:
        if engine.adapter.family != "wan":
            raise BadInput(
                f"the diffusers peers are wired for Wan's pipeline only (its block hooks and sizes); "
                f"bench {engine.preset.name} with --methods from: sencache sencache-max sencache-online fixed "
                f"fixed-warmup teacache magcache"
            )
        source = engine.bundle.manifest.weights_source
        if not source or not Path(source).is_dir():
            raise BadInput(
                "diffusers peers need the model's PyTorch weights; the bundle's weights source "
                f"{source!r} is not available here"
            )
        self.engine = engine
        self.transformer = build_transformer(engine.adapter, engine.preset, Path(source))
        self.pipeline = diffusers_pipeline(engine.adapter, self.transformer, engine.scheduler())
        self.pipeline.set_progress_bar_config(disable=True)
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        self.computed: list[bool] = []
        self.transformer.register_forward_pre_hook(lambda *_: self.computed.append(False))
        self.transformer.blocks[-1].ffn.register_forward_hook(lambda *_: self._mark())
        self._ratios: dict[int, list[float]] = {}

    def _mark(self) -> None:
        self.computed[-1] = True

    def _call(self, prompt: str, seed: int, steps: int, guidance: float) -> np.ndarray:
        embeds = torch.from_numpy(self.engine.encode([prompt]))
        negative = torch.from_numpy(self.engine.encode([""]))
        latents = self.engine.initial_latents(sample_generators([seed]))
        shapes = self.engine.bundle.shapes
        with torch.no_grad():
            out = self.pipeline(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative,
                latents=latents,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=shapes.height,
                width=shapes.width,
                num_frames=shapes.frames,
                output_type="latent",
            )
        return out.frames.numpy()

    def mag_ratios(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list[float]:
        """diffusers' MagCache calibration mode on the given prompts, cond context, averaged."""
        from diffusers.hooks import MagCacheConfig

        if steps not in self._ratios:
            catcher = _RatioCatcher()
            logger = logging.getLogger("diffusers.hooks.mag_cache")
            logger.addHandler(catcher)
            level = logger.level
            logger.setLevel(logging.INFO)
            try:
                self.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
                for prompt, seed in zip(prompts, seeds, strict=True):
                    self._call(prompt, seed, steps, guidance)
                self.transformer.disable_cache()
            finally:
                logger.removeHandler(catcher)
                logger.setLevel(level)
            cond = catcher.ratios[0::2] if guidance > 1.0 else catcher.ratios
            self._ratios[steps] = np.mean(np.asarray(cond), axis=0).tolist()
        return self._ratios[steps]

    def run(
        self,
        method: str,
        knobs: dict[str, float],
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance: float,
        calibration: tuple[list[str], list[int]],
    ) -> dict[str, Any]:
        """Latents, per-sample NFE and wall time of one diffusers-hook setting."""
        from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

        if method == "diffusers-none":
            config = None
        elif method == "diffusers-magcache":
            ratios = self.mag_ratios(*calibration, steps, guidance)
            config = MagCacheConfig(
                threshold=knobs["threshold"],
                max_skip_steps=int(knobs.get("max_reuse", 4)),
                retention_ratio=knobs.get("retention", 0.2),
                num_inference_steps=steps,
                mag_ratios=ratios,
            )
        elif method == "diffusers-fbc":
            config = FirstBlockCacheConfig(threshold=knobs["threshold"])
        else:
            raise BadInput(f"unknown diffusers peer {method!r} (choose from {', '.join(PEERS)})")
        latents, nfe, seconds = [], [], 0.0
        branches = 2 if guidance > 1.0 else 1
        if config is not None:
            self.transformer.enable_cache(config)
        try:
            for prompt, seed in zip(prompts, seeds, strict=True):
                self.computed.clear()
                start = time.perf_counter()
                latents.append(self._call(prompt, seed, steps, guidance)[0])
                seconds += time.perf_counter() - start
                nfe.append(int(sum(self.computed[0::branches])))
        finally:
            if config is not None:
                self.transformer.disable_cache()
        return {"latents": np.stack(latents), "nfe": nfe, "denoise_s": seconds}
