"""The full, uncached denoiser with guidance on host arrays, with the signals the baselines
calibrate on (TeaCache's modulated input, MagCache's residual norms): what calibration and the
parity checks call, outside the step engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sencache.runtime.chain import cfg_rows, guide, run_chain
from sencache.runtime.experts import experts_of, run_routed
from sencache.runtime.model import Model


@dataclass
class Prediction:
    guided: np.ndarray
    """The guided noise prediction the solver uses, [B, ...]."""
    cond: np.ndarray
    """The conditional branch's raw output, [B, ...]."""
    modulation: np.ndarray
    """The head's modulated input (TeaCache's signal), [B, ...]."""
    residual_norms: np.ndarray
    """Per-token L2 norm of the blocks' residual of the first stream (MagCache's signal), [B, tokens]."""


def predict(
    model: Model,
    latents: np.ndarray,
    t: np.ndarray,
    text: np.ndarray,
    uncond: np.ndarray | None,
    guidance: float,
    conditions: dict[str, torch.Tensor] | None = None,
    experts: np.ndarray | None = None,
) -> Prediction:
    """f(x, t, c) of `model` for a batch with per-row timesteps `t`, guided by `guidance` when
    `uncond` embeddings are given; an image-to-video model's head also takes the image's
    `conditions` of each sample (`Model.conditions`), the same for both guidance rows; each sample
    runs by its expert (`experts`; None: the expert of its timestep, as inference picks it)."""
    with model.stream():
        batch = len(latents)
        rows = cfg_rows(
            model.to_device(latents), model.to_device(text), None if uncond is None else model.to_device(uncond)
        )
        branches = len(rows["latent"]) // batch
        rows["timestep"] = model.to_device(np.concatenate([t] * branches).astype(np.float32))
        for name in model.layout.conditions:
            assert conditions is not None, "an image-to-video head takes the image's conditions"
            rows[name] = torch.cat([conditions[name]] * branches).to(model.backend.device, torch.float32)
        if experts is None:
            experts = np.asarray(experts_of(t, model.bundle.manifest.boundary))
        row_experts = np.concatenate([experts] * branches)

        def run(stage: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return run_routed(model.backend.run, stage, feeds, row_experts, model.layout.shared)

        chain = run_chain(run, model.layout, rows)
        stream = model.layout.streams[0]
        residual = _host(chain.streams[stream][:batch] - chain.head[stream][:batch])
        noise = chain.noise.float()
        return Prediction(
            guided=_host(guide(noise, batch, uncond is not None, guidance)),
            cond=_host(noise[:batch]),
            modulation=_host(chain.head[model.adapter.modulation][:batch]),
            residual_norms=np.linalg.norm(residual.astype(np.float64), axis=-1),
        )


def _host(value: torch.Tensor) -> np.ndarray:
    """A host NumPy view (or copy, from a GPU) of `value`; bf16, which NumPy lacks, widened to fp32."""
    value = value.detach()
    return (value.float() if value.dtype == torch.bfloat16 else value).cpu().numpy()
