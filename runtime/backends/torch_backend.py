"""PyTorch reference backend: the diffusers transformer itself, split by the family adapter,
on the host or a GPU, in the bundle's precision; the loop's tensors stay on that device."""

from __future__ import annotations

import torch

from sencache.runtime.backends.base import StageBackend
from sencache.runtime.bundle import Bundle
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import stage_name
from sencache.runtime.families.parts import build_transformer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The weights' dtype of each precision a torch bundle is built in."""


class TorchBackend(StageBackend):
    name = "torch"

    def __init__(self, bundle: Bundle, threads: int = 0, device: str = "cpu") -> None:
        if threads:
            torch.set_num_threads(threads)
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise BadInput(f"device {device!r}: {e}", param="device") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"device {device}: this torch ({torch.__version__}) sees no CUDA GPU", param="device")
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise BadInput(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)", param="device")
        if self.device.type not in ("cpu", "cuda"):
            raise BadInput(f"device {device}: the torch backend runs on cpu or cuda", param="device")
        preset = bundle.preset
        assert bundle.manifest.weights is not None, "Manifest.parse sets the weights of a torch bundle"
        self.dtype = DTYPES[bundle.manifest.precision]
        self.modules = {}
        for expert in range(bundle.manifest.experts):  # each expert's transformer is its stages' file
            folder = bundle.manifest.stages[stage_name("blocks", expert)].file
            transformer = build_transformer(bundle.adapter, preset, bundle.checked_folder(folder), dtype=self.dtype)
            for stage, module in bundle.adapter.split(transformer, preset, bundle.shapes).items():
                self.modules[stage_name(stage, expert)] = module.to(self.device)
        self.specs = dict(bundle.manifest.stages)

    @torch.no_grad()
    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec = self.specs[stage]
        out = self.modules[stage](**{name: self._fed(stage, name, inputs[name]) for name in spec.inputs})
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(spec.outputs, out, strict=True))

    def _fed(self, stage: str, name: str, value: torch.Tensor) -> torch.Tensor:
        """The loop's latent and text go into the head in the weights' dtype, as diffusers' pipelines
        feed their transformer (the timestep stays fp32); the other stages take what the head made."""
        if stage == "head" and name != "timestep" and value.is_floating_point():
            return value.to(self.dtype)
        return value

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "torch": torch.__version__,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
