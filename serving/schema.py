"""The request and response bodies of the video API (Pydantic), shaped like OpenAI's Videos API.

The cache knobs are not listed here: their model is made from the runtime's one knob table
(`sencache.runtime.cache.KNOBS`), so a knob's name, type, range and help are the command line's.
Checks that need the bundle (embedding shapes, rows, calibration tables) are the engine's; it
refuses before queueing, and the server turns that into the same 422, naming the parameter at
fault as this body's JSON field (`json_field`)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from sencache.runtime.cache import KNOBS, METHODS, check_knobs
from sencache.runtime.errors import BadInput
from sencache.runtime.limits import MAX_STEPS
from sencache.runtime.request import SAMPLINGS

Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]


def json_field(param: str | None) -> str | None:
    """The field of the request body that sets the runtime's parameter `param` (a knob's is
    `cache.knobs.<name>`), or None when no field does."""
    if param in KNOBS:
        return f"cache.knobs.{param}"
    if param in ("cache", "knobs"):
        return {"cache": "cache.method", "knobs": "cache.knobs"}[param]
    return param if param in VideoRequest.model_fields else None


def _knob_field(name: str) -> tuple[Any, Any]:
    knob = KNOBS[name]
    description = f"{knob.help} (methods: {', '.join(knob.methods)})"
    if knob.type is str:
        return (Literal[knob.choices] | None, Field(None, description=description))  # type: ignore[valid-type]
    bounds: dict[str, float] = {"ge": knob.low}
    if math.isfinite(knob.high):
        bounds["le"] = knob.high
    return (
        knob.type | None,
        Field(None, description=description, allow_inf_nan=False, strict=knob.type is int, **bounds),
    )


CacheKnobs = create_model(
    "CacheKnobs", __config__=ConfigDict(extra="forbid"), **{name: _knob_field(name) for name in KNOBS}
)
"""Every knob of the runtime's table, each optional; unset knobs take the bundle's defaults."""

PRESETS: dict[str, str | None] = {"reference": None, "quality": "high", "balanced": "balanced", "fast": "fast"}
"""Named cache settings, each an NFE budget (so a preset means the same speed on every model and
step count) by its `speed`: `reference` runs every step; `quality`, `balanced` and `fast` hold the
bundle's budget rule (`budget_rule`: sencache-plan where the bundle has its reuse costs, every video
running exactly that share of the steps; else sencache-online at the eps of its measured curve, on
average) to the speeds high, balanced and fast (0.75, 0.6 and 0.45 of the steps run), which needs a
bundle calibrated with budget curves."""


class CacheSpec(BaseModel):
    """The cache of one request: a method with knobs, or a named preset."""

    model_config = ConfigDict(extra="forbid")

    method: Method | None = Field(None, description="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    knobs: CacheKnobs = Field(default_factory=CacheKnobs)  # type: ignore[valid-type]
    preset: Literal[tuple(PRESETS)] | None = Field(  # type: ignore[valid-type]
        None, description="instead of method and knobs: " + ", ".join(PRESETS)
    )

    @model_validator(mode="after")
    def _one_way(self) -> CacheSpec:
        given = self.knobs.model_dump(exclude_none=True)
        if self.preset is not None and (self.method is not None or given):
            raise ValueError("give cache.preset or cache.method with cache.knobs, not both")
        try:
            check_knobs(self.method or "sencache", given)
        except BadInput as e:
            raise ValueError(e.worded(json_field(e.param))) from None
        return self

    def resolve(self, budget_rule: str) -> tuple[str, dict[str, float | str]]:
        """(method, knobs) for the engine: the request's, or its preset's (its speed held by
        `budget_rule`, the served bundle's: `sencache.runtime.cache.budget.budget_rule`)."""
        if self.preset is None:
            return self.method or "sencache", self.knobs.model_dump(exclude_none=True)
        speed = PRESETS[self.preset]
        return ("none", {}) if speed is None else (budget_rule, {"speed": speed})


class VideoRequest(BaseModel):
    """POST /v1/videos: one video from a prompt (or its text embeddings) and a seed."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, max_length=10_000, description="the text; or give prompt_embeds")
    model: str | None = Field(None, description="the served bundle's model (the only one; default: it)")
    size: str | None = Field(None, description="'WIDTHxHEIGHT': the bundle's resolution (the only one; default: it)")
    seconds: str | float | None = Field(
        None, description="the clip's length: the bundle's frames at the MP4's frame rate (the only one; default: it)"
    )
    prompt_embeds: list[list[float]] | None = Field(
        None, description="text embeddings [tokens, channels] computed elsewhere, instead of prompt"
    )
    negative_prompt_embeds: list[list[float]] | None = Field(
        None, description="unconditional embeddings [tokens, channels] for guidance (default: the empty prompt's)"
    )
    seed: int = Field(0, ge=0, lt=2**63, strict=True, description="the starting noise (and any solver noise)")
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, strict=True, description="denoising steps (default: the bundle's)"
    )
    guidance: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="classifier-free guidance scale; <= 1 runs no unconditional branch (default: the bundle's)",
    )
    guidance_2: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="two-expert models (Wan 2.2 A14B): the low-noise expert's guidance scale "
        "(default: the bundle's, or guidance when given)",
    )
    dynamic_cfg: bool = Field(False, description="CogVideoX only: the pipeline's use_dynamic_cfg guidance schedule")
    sampling: Literal[SAMPLINGS] = Field(  # type: ignore[valid-type]
        "engine",
        description="the bundle's scheduler ('engine') or the SenCache authors' sampling preset ('reference'; "
        "Wan only: flow shift 5.0)",
    )
    cache: CacheSpec = Field(default_factory=CacheSpec)
    image: str | None = Field(
        None,
        description="image-to-video models (which require it): the first frame, an image file (PNG, JPEG, "
        "WebP; RGB) in base64 or as a data: URL; in a multipart body, a file part named image",
    )

    @model_validator(mode="after")
    def _text(self) -> VideoRequest:
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise ValueError("give exactly one of prompt and prompt_embeds")
        if self.negative_prompt_embeds is not None and self.prompt_embeds is None:
            raise ValueError("negative_prompt_embeds goes with prompt_embeds")
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            rows = getattr(self, name)
            if rows is not None and (not rows or len({len(r) for r in rows}) != 1 or not rows[0]):
                raise ValueError(f"{name} must be a non-empty [tokens, channels] array")
        return self


Status = Literal["queued", "in_progress", "completed", "failed"]


class VideoError(BaseModel):
    """Why a video failed: `code` is `cancelled` for a job cancelled before it completed,
    `replica_died` when its engine replica died, `generation_failed` when the engine failed it."""

    code: str
    message: str


class VideoJob(BaseModel):
    """A video job as the API reports it: OpenAI's video object, plus this engine's detail (the
    seed, the step and NFE counters, the cache method and the latencies)."""

    id: str
    object: Literal["video"] = "video"
    status: Status
    progress: int = Field(description="percent of the denoising steps taken")
    created_at: int = Field(description="Unix seconds")
    completed_at: int | None = Field(None, description="Unix seconds of the end (completed or failed)")
    expires_at: int | None = Field(None, description="never set: a replica keeps its last 64 ended jobs")
    model: str
    prompt: str | None = Field(None, description="the prompt (None for a job given prompt_embeds)")
    size: str = Field(description="'WIDTHxHEIGHT' of the frames (the MP4 is enlarged 8 times)")
    seconds: str = Field(description="the clip's length in seconds at the MP4's frame rate")
    error: VideoError | None = None
    step: int
    steps: int
    nfe: int = Field(description="denoiser block evaluations so far (a reused step costs none)")
    seed: int
    cache: str
    latency_s: float | None = Field(None, description="seconds from submission to the video (once completed)")
    queue_wait_s: float | None = Field(None, description="of which waiting for rows before the first step")


class VideoList(BaseModel):
    """GET /v1/videos: one page of jobs, OpenAI's cursor page (`after` the last id for the next)."""

    object: Literal["list"] = "list"
    data: list[VideoJob]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    """DELETE /v1/videos/{id}: the video is gone (a queued or running job was cancelled first)."""

    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ErrorDetail(BaseModel):
    """What went wrong (OpenAI's error object)."""

    message: str
    type: str = Field(description="invalid_request_error below 500 (rate_limit_error for 429), server_error from 500")
    param: str | None = Field(None, description="the JSON field of the request at fault, where one is")
    code: str | None = Field(None, description="a machine-readable reason")


class ErrorBody(BaseModel):
    """The body of every error answer (OpenAI's shape)."""

    error: ErrorDetail
