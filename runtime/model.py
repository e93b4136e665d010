"""A loaded engine: a bundle, the backend that runs its head / blocks / tail stages, text
encoding, decoding and the scheduler of its family. The denoising loop over these stages is the
step engine's (runtime/stepping.py); `Model.generate` runs one request through it alone."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sencache.runtime.backends.base import StageBackend, open_backend
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import CachePolicy, make_policy
from sencache.runtime.drift_meter import CudaDriftMeter, HostDriftMeter, drift_meter
from sencache.runtime.dummy import blank_frames, dummy_conditions, dummy_embeddings
from sencache.runtime.errors import BadInput, Failed
from sencache.runtime.families.base import Sampler
from sencache.runtime.families.parts import decode, load_components, make_scheduler
from sencache.runtime.images import check_image_fits
from sencache.runtime.request import SAMPLINGS, GenerationParams, Result
from sencache.runtime.stepping import StepEngine
from sencache.runtime.tiny_text import TinyTextEncoder, load_tiny_text_encoder


class Model:
    """A loaded bundle and the backend that runs it."""

    def __init__(self, bundle: Bundle, backend: StageBackend) -> None:
        self.bundle = bundle
        self.backend = backend
        self.adapter = bundle.adapter
        self.preset = bundle.preset
        self.layout = self.adapter.layout
        self.latent_shape = self.adapter.latent_shape(self.preset, bundle.shapes)
        self.numel = int(np.prod(self.latent_shape))
        self.max_rows = bundle.manifest.shapes.max_rows
        self._text_encoder: TinyTextEncoder | None = None
        self._components = None
        self._meters: dict[int, HostDriftMeter | CudaDriftMeter] = {}
        self._cuda_stream: torch.cuda.Stream | None = None
        self._lazy = threading.Lock()
        """Guards what is made on first use (text encoder, components, CUDA stream) against threads."""

    @classmethod
    def open(
        cls, bundle: Bundle | Path | str, backend: str | None = "auto", device: str = "cpu", threads: int = 0
    ) -> Model:
        """The model of `bundle` (a loaded one, or the folder of one, checked on load) on `backend`
        ("auto" or None: the one it was built for; another is refused) with `threads` host threads
        (0: all cores) and, for torch bundles, its modules on `device`."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(Path(bundle))
        return cls(bundle, open_backend(bundle, None if backend == "auto" else backend, threads, device))

    def scheduler_config(self, sampling: str = "engine") -> dict[str, Any]:
        """The scheduler config of a run: the bundle's, or with `sampling="reference"` the family's
        preset of the authors' schedule (BadInput where the family has none)."""
        config = dict(self.bundle.manifest.scheduler)
        if sampling == "reference":
            return self.adapter.reference_scheduler(config, self.preset)
        if sampling != "engine":
            raise BadInput(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}", param="sampling")
        return config

    def scheduler(self, sampling: str = "engine"):
        """A fresh scheduler of the run's config (`scheduler_config`)."""
        return make_scheduler(self.adapter, self.preset, self.scheduler_config(sampling))

    def sampler(self, steps: int, sampling: str = "engine") -> Sampler:
        """A fresh scheduler driven the way the family's real pipeline drives it."""
        return self.adapter.sampler(self.scheduler(sampling), steps, self.preset, self.bundle.shapes)

    def encode(self, prompts: list[str]) -> np.ndarray:
        """Text embeddings [B, tokens, channels] of prompts (the empty prompt is unconditional)."""
        spec = self.bundle.manifest.text_encoder
        if spec.kind == "dummy":
            return dummy_embeddings(prompts, self.adapter.text_shape(self.preset))
        if spec.kind != "tiny":
            return self.adapter.encode_prompts(self.components(), prompts, self.preset)
        with self._lazy:
            if self._text_encoder is None:
                assert spec.file is not None and spec.dim is not None, "parse sets a tiny encoder's file, dim"
                self._text_encoder = load_tiny_text_encoder(self.bundle.read(spec.file), spec.dim, spec.file)
        with torch.no_grad():
            return self.adapter.tiny_format.encode_text(self._text_encoder, prompts)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Frames [B, T, H, W, 3] in [0, 1], decoded as the family's pipeline decodes (a dummy
        build has no VAE: blank frames)."""
        if self.bundle.manifest.dummy:
            s = self.bundle.shapes
            return blank_frames(len(latents), s.frames, s.height, s.width)
        pipeline = None if self.preset.tiny else self.components()
        return decode(self.adapter, latents, self.preset, self.bundle.shapes, pipeline)

    def components(self):
        """The real model's text encoder and VAE (diffusers' pipeline without its transformer),
        from the weights folder the bundle was built from; loaded once."""
        with self._lazy:
            if self._components is None:
                source = self.bundle.manifest.weights_source
                if not source or not Path(source).is_dir():
                    raise BadInput(
                        f"{self.preset.name}: text encoding and decoding load the text encoder and VAE from "
                        f"the weights folder the bundle was built from ({source}), which is not there"
                    )
                self._components = load_components(self.adapter, Path(source))
            return self._components

    def embeddings(self, given: np.ndarray | None, prompts: list[str], param: str) -> np.ndarray:
        """`given` embeddings (the request's parameter `param`) checked against the bundle's text
        shape, or those of `prompts`."""
        if given is None:
            return self.encode(prompts)
        expected = self.bundle.manifest.shapes.text
        if tuple(given.shape[1:]) != expected:
            raise BadInput(
                f"{param} has shape {list(given.shape[1:])} per prompt; the bundle takes {list(expected)}",
                param=param,
            )
        return given.astype(np.float32, copy=False)

    def conditions(self, image: np.ndarray | None, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """The head's image inputs of one sample per generator (the layout's `conditions`), as the
        family's pipeline encodes `image`; {} for a text-to-video model. BadInput naming `image`
        when the model and the request disagree on whether there is one."""
        check_image_fits(self.adapter.family, self.preset.name, image is not None)
        if image is None:
            return {}
        if self.bundle.manifest.dummy:
            shapes = self.adapter.condition_shapes(self.preset, self.bundle.shapes)
            return dummy_conditions(image, len(generators), shapes)
        pipeline = None if self.preset.tiny else self.components()  # a tiny model encodes without components
        return self.adapter.encode_image(image, generators, pipeline, self.preset, self.bundle.shapes)

    def start_latents(self, noise: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """The latents a run starts from: the starting noise, and the image where the family's
        pipeline puts it in the latent (`conditions` from `conditions`)."""
        return self.adapter.start_latents(noise, conditions, self.preset, self.bundle.shapes)

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        """The starting noise of each sample, drawn as the family's pipeline draws it."""
        return self.adapter.initial_latents(generators, self.preset, self.bundle.shapes)

    def policy(self, method: str, steps: int, batch: int, knobs: Mapping[str, float | str | None]) -> CachePolicy:
        """The cache rule `method` with the given knobs for one request; unset knobs take the
        bundle's defaults."""
        return make_policy(method, knobs, steps, batch, self.bundle, self.numel)

    def to_device(self, value: np.ndarray) -> torch.Tensor:
        """A host array as a tensor on the backend's device."""
        return torch.from_numpy(np.ascontiguousarray(value)).to(self.backend.device)

    def drift_meter(self, per_sample: int) -> HostDriftMeter | CudaDriftMeter:
        """The drift meter for this engine's device over `per_sample` elements of each sample
        (the whole latent, or a rank's part of it), sized for every row it can hold, made once."""
        with self._lazy:
            if per_sample not in self._meters:
                self._meters[per_sample] = drift_meter(self.backend.device, self.max_rows, per_sample)
            return self._meters[per_sample]

    def stream(self) -> contextlib.AbstractContextManager:
        """Make the engine's CUDA stream current (a GPU backend), or nothing (the host). On a GPU
        all work goes to this stream, never the default one, on which TensorRT synchronizes."""
        if self.backend.device.type != "cuda":
            return contextlib.nullcontext()
        with self._lazy:
            if self._cuda_stream is None:
                self._cuda_stream = torch.cuda.Stream(self.backend.device)
        return torch.cuda.stream(self._cuda_stream)

    def generate(
        self, request: GenerationParams, policy: CachePolicy | None = None, record: bool = False, progress: bool = False
    ) -> Result:
        """Denoise `request` under `policy` (None: its cache method's rule) through the step engine,
        alone; latents come back undecoded. `record` keeps the denoiser input of every step
        (calibration)."""
        engine = StepEngine(self)
        job = engine.prepare(request, policy, record=record)
        engine.enqueue(job)
        with tqdm(
            total=request.steps, desc=f"denoise ({job.policy.name})", unit="step", disable=not progress, leave=False
        ) as bar:
            while engine.busy:
                engine.step()
                bar.update(1)
        try:
            return engine.result(job.id)
        except Failed as e:  # the caller sees the error the request met, as before the step engine
            assert e.__cause__ is not None, "StepEngine.result raises Failed from the request's error"
            raise e.__cause__ from None
