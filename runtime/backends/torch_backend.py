"""PyTorch reference backend: the diffusers transformer itself, split by the family adapter."""

from __future__ import annotations

import numpy as np
import torch

from sencache.runtime.backends.base import STAGES, StageBackend
from sencache.runtime.bundle import Bundle


class TorchBackend(StageBackend):
    name = "torch"

    def __init__(self, bundle: Bundle, threads: int = 0, device: str = "cpu") -> None:
        if threads:
            torch.set_num_threads(threads)
        preset = bundle.preset
        transformer = bundle.adapter.build_transformer(preset, bundle.file(bundle.manifest["weights"]))
        self.device = torch.device(device)
        self.modules = {k: m.to(self.device) for k, m in bundle.adapter.split(transformer, preset, bundle.shapes).items()}
        self.specs = {stage: bundle.manifest["stages"][stage] for stage in STAGES}

    @torch.no_grad()
    def run(self, stage: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[stage]
        args = {name: torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device) for name in spec["inputs"]}
        out = self.modules[stage](**args)
        out = out if isinstance(out, tuple) else (out,)
        return {name: value.cpu().numpy() for name, value in zip(spec["outputs"], out)}

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "torch": torch.__version__, "device": str(self.device)}
