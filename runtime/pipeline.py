"""The cached denoising loop over a bundle's head / blocks / tail stages (SPEC sections 2 and 3).

Per step: measure each sample's latent drift from its anchor, ask the policy which samples run,
run the head on every row, the blocks on the rows of running samples only (gathered into one
sub-batch), add the cached residual on the other rows, run the tail on every row, combine
classifier-free guidance, and take the scheduler step. Rows are (sample, CFG branch) pairs, run
as one batch whether the real pipeline makes one call or two; each row keeps its own residual and
a decision covers all rows of a sample. A running row uses the blocks' output as is, so a run that
never reuses is bit-identical to the uncached run.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sencache.runtime.backends.base import StageBackend
from sencache.runtime.baselines import (
    FixedPolicy,
    FixedSettings,
    MagCachePolicy,
    MagCacheSettings,
    TeaCachePolicy,
    TeaCacheSettings,
)
from sencache.runtime.bundle import Bundle
from sencache.runtime.drift_meter import CudaDriftMeter, HostDriftMeter, drift_meter
from sencache.runtime.errors import BadInput
from sencache.runtime.families.base import NOISE, Sampler
from sencache.runtime.manifest import MAX_STEPS
from sencache.runtime.memory import check_memory, request_bytes
from sencache.runtime.policy import CachePolicy, NoCache, SenCacheMaxPolicy, SenCachePolicy, SenCacheSettings
from sencache.runtime.tiny_text import TinyTextEncoder, load_tiny_text_encoder


@dataclass(frozen=True)
class Request:
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    prompt_embeds: np.ndarray | None = None
    """Text embeddings [B, tokens, channels] computed elsewhere (serving code that caches them);
    `prompts` then only label the samples."""
    negative_prompt_embeds: np.ndarray | None = None
    """The unconditional embeddings for guidance; the empty prompt's when not given."""
    dynamic_cfg: bool = False
    """CogVideoX's `use_dynamic_cfg`: the guidance scale follows the pipeline's cosine schedule."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise BadInput("give at least one --prompt")
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 3 or len(value) != len(self.prompts)):
                raise BadInput(f"{name} must be [{len(self.prompts)}, tokens, channels], got {list(value.shape)}")
            if value is not None and not np.all(np.isfinite(value)):
                raise BadInput(f"{name} holds NaN or infinite values")
        if len(self.prompts) != len(self.seeds):
            raise BadInput(f"{len(self.prompts)} prompts but {len(self.seeds)} seeds: they pair up one to one")
        if not 1 <= self.steps <= MAX_STEPS:
            raise BadInput(f"--steps must be in [1, {MAX_STEPS}], got {self.steps}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise BadInput(f"--guidance must be a finite number >= 0, got {self.guidance}")
        for seed in self.seeds:
            if not 0 <= seed < 2**63:
                raise BadInput(f"--seed must be in [0, 2^63), got {seed}")


@dataclass
class Result:
    latents: np.ndarray
    timesteps: list[float]
    decisions: list[list[str]]
    trace: list[list[dict[str, Any]]]
    timing: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    trajectory: list[np.ndarray] | None = None
    """The denoiser input latent of every step, when recorded (calibration)."""

    @property
    def nfe(self) -> list[int]:
        return [d.count("run") for d in self.decisions]


METHOD_KNOBS: dict[str, tuple[str, ...]] = {
    "none": (),
    "sencache": ("eps_start", "eps_main", "max_reuse"),
    "sencache-max": ("eps_start", "eps_main", "max_reuse"),
    "fixed": ("interval", "warmup"),
    "teacache": ("threshold",),
    "magcache": ("threshold", "max_reuse", "retention"),
}


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


class Engine:
    """A loaded bundle and the backend that runs it."""

    def __init__(self, bundle: Bundle, backend: StageBackend) -> None:
        self.bundle = bundle
        self.backend = backend
        self.adapter = bundle.adapter
        self.preset = bundle.preset
        self.layout = self.adapter.layout
        self.latent_shape = self.adapter.latent_shape(self.preset, bundle.shapes)
        self.numel = int(np.prod(self.latent_shape))
        self.max_rows = bundle.shapes.max_batch * 2
        self._text_encoder: TinyTextEncoder | None = None
        self._components = None
        self._meter: HostDriftMeter | CudaDriftMeter | None = None
        self._cuda_stream: torch.cuda.Stream | None = None

    def scheduler(self):
        return self.adapter.make_scheduler(self.preset, self.bundle.manifest["scheduler"])

    def sampler(self, steps: int) -> Sampler:
        """A fresh scheduler driven the way the family's real pipeline drives it."""
        return self.adapter.sampler(self.scheduler(), steps, self.preset, self.bundle.shapes)

    def encode(self, prompts: list[str]) -> np.ndarray:
        """Text embeddings [B, tokens, channels] of prompts (the empty prompt is unconditional)."""
        spec = self.bundle.manifest["text_encoder"]
        if spec["kind"] != "tiny":
            return self.adapter.encode_prompts(self.components(), prompts, self.preset)
        if self._text_encoder is None:
            self._text_encoder = load_tiny_text_encoder(self.bundle.read(spec["file"]), spec["dim"], spec["file"])
        return self.adapter.encode_tiny(self._text_encoder, prompts)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Frames [B, T, H, W, 3] in [0, 1], decoded as the family's pipeline decodes."""
        pipeline = None if self.preset.tiny else self.components()
        return self.adapter.decode(latents, self.preset, self.bundle.shapes, pipeline)

    def components(self):
        """The real model's text encoder and VAE (diffusers' pipeline without its transformer),
        from the weights folder the bundle was built from; loaded once."""
        if self._components is None:
            source = self.bundle.manifest.get("weights_source")
            if not source or not Path(source).is_dir():
                raise BadInput(f"{self.preset.name}: text encoding and decoding load the text encoder and VAE from "
                               f"the weights folder the bundle was built from ({source}), which is not there")
            self._components = self.adapter.load_components(Path(source))
        return self._components

    @staticmethod
    def generators(seeds: list[int]) -> list[torch.Generator]:
        """One generator per sample: its starting noise and any solver noise come from its own seed."""
        return [torch.Generator().manual_seed(s) for s in seeds]

    def _embeddings(self, given: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        if given is None:
            return self.encode(prompts)
        expected = tuple(self.bundle.manifest["shapes"]["text"])
        if tuple(given.shape[1:]) != expected:
            raise BadInput(f"text embeddings of shape {list(given.shape[1:])} per prompt; the bundle takes {list(expected)}")
        return given.astype(np.float32, copy=False)

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        """The starting noise of each sample, drawn as the family's pipeline draws it."""
        return self.adapter.initial_latents(generators, self.preset, self.bundle.shapes)

    def policy(self, method: str, steps: int, batch: int, knobs: dict[str, float | None]) -> CachePolicy:
        """The cache rule `method` with the given knobs; unset knobs take the bundle's defaults."""
        given = {k: v for k, v in knobs.items() if v is not None}
        allowed = METHOD_KNOBS.get(method)
        if allowed is None:
            raise BadInput(f"unknown cache method {method!r} (choose from {', '.join(METHOD_KNOBS)})")
        stray = sorted(set(given) - set(allowed))
        if stray:
            raise BadInput(f"--{stray[0].replace('_', '-')} does not apply to --cache {method}")
        defaults = self.bundle.manifest["defaults"]
        if method == "none":
            return NoCache(batch)
        if method in ("sencache", "sencache-max"):
            settings = SenCacheSettings(**{**defaults["sencache"], **given})
            rule = SenCachePolicy if method == "sencache" else SenCacheMaxPolicy
            return rule(settings, self.bundle.sensitivity(), steps, batch, self.numel)
        if method == "fixed":
            return FixedPolicy(FixedSettings(**{"interval": 2, **given}), steps, batch)
        tables = self.bundle.baselines()
        if method == "teacache":
            settings = TeaCacheSettings(**{**defaults["teacache"], **given}, coefficients=tables.teacache_coefficients)
            return TeaCachePolicy(settings, steps, batch)
        if tables.magcache_ratios is None:
            raise BadInput(f"no MagCache ratios are published for {self.preset.name}: run `sencache calibrate --engine "
                           f"DIR` to measure them")
        settings = MagCacheSettings(**{**defaults["magcache"], **given}, ratios=tables.magcache_ratios)
        return MagCachePolicy(settings, steps, batch)

    def predict(self, latents: np.ndarray, t: np.ndarray, text: np.ndarray, uncond: np.ndarray | None,
                guidance: float) -> Prediction:
        """The full, uncached denoiser with guidance, f(x, t, c), for a batch with per-row t,
        with the signals the baselines calibrate on."""
        with self._stream():
            return self._predict(latents, t, text, uncond, guidance)

    def _predict(self, latents: np.ndarray, t: np.ndarray, text: np.ndarray, uncond: np.ndarray | None,
                 guidance: float) -> Prediction:
        batch = len(latents)
        rows = self._rows(self._to_device(latents), self._to_device(text),
                          None if uncond is None else self._to_device(uncond))
        branches = len(rows["latent"]) // batch
        head = self._head(rows["latent"], self._to_device(np.concatenate([t] * branches).astype(np.float32)),
                          rows["text"])
        out = self.backend.run("blocks", {k: head[k] for k in self.layout.blocks_inputs})
        stream = self.layout.streams[0]
        residual = _host(out[stream + "_out"][:batch] - head[stream][:batch])
        tail_in = {s: out[s + "_out"] for s in self.layout.tail_stream_names}
        tail_in.update({k: head[k] for k in self.layout.tail_context})
        noise = self.backend.run("tail", tail_in)[NOISE].float()
        return Prediction(guided=_host(self._guide(noise, batch, uncond is not None, guidance)),
                          cond=_host(noise[:batch]), modulation=_host(head[self.adapter.modulation][:batch]),
                          residual_norms=np.linalg.norm(residual.astype(np.float64), axis=-1))

    def _to_device(self, value: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(value)).to(self.backend.device)

    def _index(self, rows: np.ndarray) -> torch.Tensor:
        """Row indices on the backend's device; on a GPU through pinned memory, so no host wait."""
        index = torch.from_numpy(rows.astype(np.int64))
        if self.backend.device.type == "cpu":
            return index
        return index.pin_memory().to(self.backend.device, non_blocking=True)

    def _head(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backend.run("head", {"latent": latent, "timestep": timestep, "text": text})

    def _finish(self, head: dict[str, torch.Tensor], run_rows: np.ndarray,
                cache: dict[str, torch.Tensor] | None) -> torch.Tensor:
        streams = self._blocks(head, run_rows, len(head[self.layout.streams[0]]), cache)
        tail_in = {s: streams[s] for s in self.layout.tail_stream_names}
        tail_in.update({k: head[k] for k in self.layout.tail_context})
        return self.backend.run("tail", tail_in)[NOISE].float()

    @staticmethod
    def _rows(latents: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Engine rows: the batch, then (with CFG) the same latents with the unconditional text."""
        if uncond is None:
            return {"latent": latents, "text": text}
        return {"latent": torch.cat([latents, latents]), "text": torch.cat([text, uncond])}

    @staticmethod
    def _guide(noise: torch.Tensor, batch: int, cfg: bool, guidance: float) -> torch.Tensor:
        if not cfg:
            return noise
        cond, uncond = noise[:batch], noise[batch:]
        return uncond + guidance * (cond - uncond)

    def generate(self, request: Request, policy: CachePolicy, record: bool = False, progress: bool = False) -> Result:
        """Denoise `request` as one batch under `policy`; latents come back undecoded.

        Latents, anchors, the cache and every stage's tensors stay on the backend's device, and on
        a GPU all work goes to the engine's own CUDA stream (never the default stream, on which
        TensorRT synchronizes). Per step the drift is queued first, then the head (which does not
        depend on the decision), and the host waits for the per-sample drift alone before it
        decides and queues the blocks on the running rows, the tail and the solver step.
        `timing["decision_s"]` is the host time spent measuring and deciding; on a GPU it includes
        waiting for the queued work the drift depends on (the previous step)."""
        with self._stream():
            return self._generate(request, policy, record, progress)

    def _stream(self) -> contextlib.AbstractContextManager:
        """Make the engine's CUDA stream current (a GPU backend), or nothing (the host)."""
        if self.backend.device.type != "cuda":
            return contextlib.nullcontext()
        if self._cuda_stream is None:
            self._cuda_stream = torch.cuda.Stream(self.backend.device)
        return torch.cuda.stream(self._cuda_stream)

    def _generate(self, request: Request, policy: CachePolicy, record: bool, progress: bool) -> Result:
        batch = len(request.prompts)
        cfg = request.guidance > 1.0
        branches = 2 if cfg else 1
        if batch * branches > self.max_rows:
            raise BadInput(f"{batch} samples need {batch * branches} rows; the bundle was built for at most "
                           f"{self.bundle.shapes.max_batch} samples (rebuild with --max-batch)")
        check_memory(request_bytes(self.bundle.manifest["shapes"], batch, branches), self.backend.device)
        text = self._embeddings(request.prompt_embeds, request.prompts)
        uncond = self._embeddings(request.negative_prompt_embeds, [""] * batch) if cfg else None
        text_rows = self._to_device(text if uncond is None else np.concatenate([text, uncond]))
        row_sample = np.tile(np.arange(batch), branches)

        sampler = self.sampler(request.steps)
        timesteps = [float(t) for t in sampler.timesteps]
        scales = ([self.adapter.dynamic_guidance(request.guidance, t, request.steps) for t in timesteps]
                  if request.dynamic_cfg else [request.guidance] * len(timesteps))
        generators = self.generators(request.seeds)
        device = self.backend.device
        x = self.initial_latents(generators).to(device)
        anchor = torch.zeros_like(x)
        meter = self._drift_meter() if policy.needs_drift else None
        cache: dict[str, torch.Tensor] | None = {} if policy.may_reuse else None
        decisions: list[list[str]] = [[] for _ in range(batch)]
        trace: list[list[dict[str, Any]]] = [[] for _ in range(batch)]
        trajectory: list[np.ndarray] | None = [] if record else None
        decision_s = 0.0
        start = time.perf_counter()
        steps = tqdm(sampler.timesteps, desc=f"denoise ({policy.name})", unit="step", disable=not progress, leave=False)
        for i, _ in enumerate(steps):
            t = timesteps[i]
            if trajectory is not None:
                trajectory.append(x.to("cpu", copy=True).numpy())
            measure = meter is not None and i > 0
            tick = time.perf_counter()
            if measure:
                meter.start(x, anchor)
            decision_s += time.perf_counter() - tick
            timestep = torch.full((batch * branches,), t, dtype=torch.float32, device=device)
            head = self._head(torch.cat([x] * branches), timestep, text_rows)
            tick = time.perf_counter()
            drift = meter.result() if measure else None
            modulation = _host(head[self.adapter.modulation][:batch]) if policy.needs_modulation else None
            decision = policy.decide(i, t, drift, modulation)
            decision_s += time.perf_counter() - tick

            noise = self._finish(head, np.flatnonzero(decision.run[row_sample]), cache)
            guided = self._guide(noise, batch, cfg, scales[i])

            if decision.run.all():
                anchor.copy_(x)
            elif decision.run.any():
                ran = self._index(np.flatnonzero(decision.run))
                anchor.index_copy_(0, ran, x.index_select(0, ran))
            for b in range(batch):
                verdict = "run" if decision.run[b] else "reuse"
                decisions[b].append(verdict)
                score = decision.score[b]
                trace[b].append({"step": i, "t": t, "score": None if math.isnan(score) else float(score),
                                 "eps": None if math.isnan(decision.threshold) else decision.threshold,
                                 "forced": decision.forced, "decision": verdict})
            x = sampler.step(i, guided, x, generators)
        latents = _host(x)
        denoise_s = time.perf_counter() - start
        warnings = []
        outside = getattr(policy, "outside_table", [])
        if outside:
            warnings.append(f"{len(outside)} sensitivity look-ups fell outside the table's timesteps "
                            f"(t={min(outside):.1f}..{max(outside):.1f}) and were clamped to its edge")
        return Result(latents=latents, timesteps=timesteps, decisions=decisions, trace=trace,
                      timing={"denoise_s": denoise_s, "decision_s": decision_s}, warnings=warnings,
                      trajectory=trajectory)

    def _drift_meter(self) -> HostDriftMeter | CudaDriftMeter:
        """The drift meter for this engine's device and largest batch, made once."""
        if self._meter is None:
            self._meter = drift_meter(self.backend.device, self.bundle.shapes.max_batch, self.numel)
        return self._meter

    def _blocks(self, head: dict[str, torch.Tensor], run_rows: np.ndarray, rows: int,
                cache: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Streams after the blocks: computed for `run_rows`, cached residual added elsewhere."""
        layout = self.layout
        if len(run_rows) == rows:
            out = self.backend.run("blocks", {k: head[k] for k in layout.blocks_inputs})
            new = {s: out[s + "_out"] for s in layout.streams}
            if cache is not None:
                for s in layout.streams:
                    cache[s] = new[s] - head[s]
            return new
        streams = {s: head[s] + cache[s] for s in layout.streams}
        if len(run_rows):
            index = self._index(run_rows)
            inputs = {k: head[k] if k in layout.shared else head[k].index_select(0, index) for k in layout.blocks_inputs}
            out = self.backend.run("blocks", inputs)
            for s in layout.streams:
                fresh = out[s + "_out"]
                streams[s].index_copy_(0, index, fresh)
                cache[s].index_copy_(0, index, fresh - head[s].index_select(0, index))
        return streams


def _host(value: torch.Tensor) -> np.ndarray:
    """A host NumPy view (or copy, from a GPU) of `value`."""
    return value.detach().cpu().numpy()
