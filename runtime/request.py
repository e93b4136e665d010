"""A generation request (one sample or a few), its state inside the step engine, its progress
and its undecoded result.

Every check of a request's own values is here, so a bad request is refused with one message
naming the parameter before it is queued, whichever surface (command line, Python API, server,
C ABI) made it."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sencache.runtime.cache.knobs import check_knobs
from sencache.runtime.errors import BadInput
from sencache.runtime.images import check_image
from sencache.runtime.limits import MAX_STEPS
from sencache.runtime.manifest import Defaults

if TYPE_CHECKING:
    import torch

    from sencache.runtime.cache import CachePolicy
    from sencache.runtime.families.base import Sampler

State = Literal["queued", "running", "done", "cancelled", "failed"]
"""Where a request stands; the API, the server and the C ABI all report this one set."""
STATES: tuple[State, ...] = ("queued", "running", "done", "cancelled", "failed")
ENDED: tuple[State, ...] = ("done", "cancelled", "failed")

SAMPLINGS = ("engine", "reference")
"""The values of a request's `sampling`: the bundle's scheduler as the family's diffusers pipeline
configures it, or the schedule the SenCache authors' code samples the family with (Wan T2V: shift 5.0)."""


@dataclass(frozen=True)
class GenerationParams:
    """What a generation asks for, with the bundle's defaults already filled in (`resolve`): every
    front end (Python API, command line, server, C ABI) builds one and nothing else."""

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
    sampling: str = "engine"
    """One of SAMPLINGS: "reference" runs the authors' sampling schedule where the family has one
    (the family adapter's `reference_scheduler`); the bundle's scheduler is never changed."""
    cache: str = "sencache"
    """The cache method (`sencache.runtime.cache.METHODS`) the engine makes the request's rule from,
    unless the caller gives a rule of its own."""
    knobs: Mapping[str, float | str] = field(default_factory=dict)
    """The method's knobs that were set, checked against the knob table (unset: the bundle's)."""
    image: np.ndarray | None = None
    """The image an image-to-video model starts from (RGB uint8 [H, W, 3], any size: the family's
    pipeline resizes it), the same for every sample; None for a text-to-video model."""
    guidance_2: float | None = None
    """A two-expert model's guidance scale for its second expert (WanPipeline's `guidance_scale_2`)."""

    @classmethod
    def resolve(
        cls,
        defaults: Defaults,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        cache: str = "sencache",
        knobs: Mapping[str, object] | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        dynamic_cfg: bool = False,
        sampling: str = "engine",
        image: np.ndarray | None = None,
        guidance_2: float | None = None,
    ) -> GenerationParams:
        """A request whose unset steps and guidance take the bundle's `defaults`; BadInput, naming
        the parameter, for any value the request cannot take. On a two-expert bundle an unset
        `guidance_2` is the bundle's when `guidance` is unset too, else `guidance` (as WanPipeline
        takes `guidance_scale` for both experts when `guidance_scale_2` is not given)."""
        if not isinstance(cache, str):
            raise BadInput(f"cache must be the name of a method, got {cache!r}", param="cache")
        if knobs is not None and not isinstance(knobs, Mapping):
            raise BadInput(
                f"knobs must be a mapping of knob names to values, got {type(knobs).__name__}", param="knobs"
            )
        if guidance_2 is None and defaults.guidance_2 is not None:
            guidance_2 = defaults.guidance_2 if guidance is None else guidance
        return cls(
            prompts,
            seeds,
            defaults.steps if steps is None else steps,
            defaults.guidance if guidance is None else guidance,
            prompt_embeds,
            negative_prompt_embeds,
            dynamic_cfg=dynamic_cfg,
            sampling=sampling,
            cache=cache,
            knobs=check_knobs(cache, knobs),
            image=image,
            guidance_2=guidance_2,
        )

    def __post_init__(self) -> None:
        if not self.prompts:
            raise BadInput("prompt is missing: give at least one", param="prompt")
        if not all(isinstance(p, str) for p in self.prompts):
            raise BadInput("prompt must be text", param="prompt")
        _check_embeds("prompt_embeds", self.prompt_embeds, len(self.prompts))
        _check_embeds("negative_prompt_embeds", self.negative_prompt_embeds, len(self.prompts))
        if self.image is not None:
            check_image(self.image)
        if self.sampling not in SAMPLINGS:
            raise BadInput(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}", param="sampling")
        if len(self.prompts) != len(self.seeds):
            raise BadInput(
                f"seed must pair up one to one with the prompts: {len(self.prompts)} prompts but "
                f"{len(self.seeds)} seeds",
                param="seed",
            )
        if not _integer_in(self.steps, 1, MAX_STEPS):
            raise BadInput(f"steps must be in [1, {MAX_STEPS}], got {self.steps!r}", param="steps")
        if (
            isinstance(self.guidance, bool)
            or not isinstance(self.guidance, (int, float))
            or not math.isfinite(self.guidance)
            or self.guidance < 0
        ):
            raise BadInput(f"guidance must be a finite number >= 0, got {self.guidance!r}", param="guidance")
        if self.guidance_2 is not None and (
            isinstance(self.guidance_2, bool)
            or not isinstance(self.guidance_2, (int, float))
            or not math.isfinite(self.guidance_2)
            or self.guidance_2 < 0
        ):
            raise BadInput(f"guidance_2 must be a finite number >= 0, got {self.guidance_2!r}", param="guidance_2")
        for seed in self.seeds:
            if not _integer_in(seed, 0, 2**63 - 1):
                raise BadInput(f"seed must be an integer in [0, 2^63), got {seed!r}", param="seed")

    @property
    def cfg(self) -> bool:
        """Whether the request runs an unconditional branch (classifier-free guidance)."""
        return self.guidance > 1.0


def _integer_in(value: object, low: int, high: int) -> bool:
    """Whether `value` is an integer (not a bool) in [low, high]."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and bool(low <= value <= high)


def _check_embeds(name: str, value: object, batch: int) -> None:
    """Embeddings given for `batch` prompts are a finite [batch, tokens, channels] array."""
    if value is None:
        return
    if not isinstance(value, np.ndarray) or value.ndim != 3 or len(value) != batch:
        shape = list(value.shape) if isinstance(value, np.ndarray) else type(value).__name__
        raise BadInput(f"{name} must be [{batch}, tokens, channels], got {shape}", param=name)
    if not np.all(np.isfinite(value)):
        raise BadInput(f"{name} holds NaN or infinite values", param=name)


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


@dataclass(frozen=True)
class Progress:
    """Where a request stands: its state, the steps it has taken of its steps, and the sample
    evaluations of the blocks (NFE, summed over its samples) so far."""

    state: State
    step: int
    steps: int
    nfe: int


@dataclass(eq=False)
class RequestState:
    """One request inside the step engine, with everything it carries from step to step."""

    id: int
    request: GenerationParams
    policy: CachePolicy
    sampler: Sampler | None
    """None once the request ended; then its generators are [] and its tensors empty (released)."""
    generators: list[torch.Generator]
    timesteps: list[float]
    scales: list[float]
    text: torch.Tensor
    """Text rows [cond x batch (, uncond x batch)] on the backend's device."""
    x: torch.Tensor
    anchor: torch.Tensor
    injected: torch.Tensor | None = None
    """Per sample, the noise the sampler injected since its anchor, when the rule scores the
    deterministic drift and the sampler injects noise (`Sampler.injected`); None otherwise."""
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    """The image's head inputs (the layout's `conditions`), rows as `text`; {} for text-to-video."""
    experts: list[int] = field(default_factory=list)
    """The expert of each step (runtime/experts.py; all 0 for a one-expert model)."""
    cache_expert: int = 0
    """The expert whose residuals `cache` holds: they are dropped when the request's expert changes."""
    state: State = "queued"
    step: int = 0
    nfe: int = 0
    cancel_requested: bool = False
    cache: dict[str, torch.Tensor] | None = None
    """Cached residuals of the request's rows on this rank (its tokens of them), per stream."""
    signal: torch.Tensor | None = None
    """This rank's part of the last step's modulated input (TeaCache's signal), float64."""
    observed: tuple[int, np.ndarray] | None = None
    """(step, this rank's part of the per-sample reuse error) measured in the last pass, for the
    next pass's collective."""
    decisions: list[list[str]] = field(default_factory=list)
    trace: list[list[dict[str, Any]]] = field(default_factory=list)
    trajectory: list[np.ndarray] | None = None
    decision_s: float = 0.0
    submitted: float = 0.0
    admitted: float = 0.0
    result: Result | None = None
    error: BaseException | None = None

    @property
    def batch(self) -> int:
        return len(self.request.prompts)

    @property
    def branches(self) -> int:
        return 2 if self.request.cfg else 1

    @property
    def rows(self) -> int:
        return self.batch * self.branches

    @property
    def row_sample(self) -> np.ndarray:
        """The sample of each of the request's rows."""
        return np.tile(np.arange(self.batch), self.branches)

    @property
    def expert(self) -> int:
        """The expert of the request's current step."""
        return self.experts[self.step] if self.step < len(self.experts) else 0

    @property
    def switched(self) -> bool:
        """Whether the current step is an expert's first after another expert's (nothing cached
        of it exists: the step runs every sample)."""
        return 0 < self.step < len(self.experts) and self.experts[self.step - 1] != self.experts[self.step]

    @property
    def finished(self) -> bool:
        """Whether a running request has taken its last step."""
        return self.state == "running" and self.step == self.request.steps

    def progress(self) -> Progress:
        return Progress(self.state, self.step, self.request.steps, self.nfe)

    def fork(self, policy: CachePolicy) -> RequestState:
        """A new, unqueued request that continues this running one from its current step under
        `policy`, with copies of everything it carries (latents, anchors, cached residuals,
        solver state, noise generators), so the two go on apart: calibration's runs that differ
        from a recorded run only from one step on."""
        import torch

        if self.state != "running" or self.sampler is None:
            raise RuntimeError(f"only a running request can be forked; request {self.id} is {self.state}")

        def cloned(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.clone()

        generators = []
        for g in self.generators:
            twin = torch.Generator(g.device)
            twin.set_state(g.get_state())
            generators.append(twin)
        return dataclasses.replace(
            self,
            id=0,
            policy=policy,
            sampler=copy.deepcopy(self.sampler),
            generators=generators,
            x=self.x.clone(),
            anchor=self.anchor.clone(),
            injected=cloned(self.injected),
            cache=None if self.cache is None else {k: v.clone() for k, v in self.cache.items()},
            signal=cloned(self.signal),
            observed=None if self.observed is None else (self.observed[0], self.observed[1].copy()),
            state="queued",
            cancel_requested=False,
            decisions=[list(d) for d in self.decisions],
            trace=[list(t) for t in self.trace],
            trajectory=None if self.trajectory is None else list(self.trajectory),
            decision_s=0.0,
            result=None,
            error=None,
        )

    def release(self) -> None:
        """Drop what an ended request holds on the device and its sampler (request.py imports no torch,
        so that front ends check a request before they load any model code)."""
        self.x, self.anchor, self.text = self.x.new_empty(0), self.anchor.new_empty(0), self.text.new_empty(0)
        self.cache, self.sampler, self.generators, self.conditions = None, None, [], {}
        self.signal = self.observed = self.injected = None
