"""What libsencache (capi/src/engine.cpp) calls inside its embedded interpreter: the runtime's
step-level engine (sencache.runtime.stepping.StepEngine) with the C caller driving the steps.

Each method is one sc_engine_* call; it takes and returns plain values (ints, floats, strings,
tuples, NumPy arrays), so the C++ side converts nothing beyond them. `status(exc)` maps an
exception to the ABI's status code and message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sencache.runtime.bundle import Bundle
from sencache.runtime.cache.knobs import KNOBS
from sencache.runtime.errors import BadInput, MissingBundle
from sencache.runtime.images import check_image, check_image_fits
from sencache.runtime.model import Model
from sencache.runtime.request import STATES as request_states
from sencache.runtime.request import GenerationParams
from sencache.runtime.stepping import StepEngine

# sc_status values (capi/include/sencache.h)
OK, INVALID_ARGUMENT, BUFFER_SIZE, NOT_FOUND, CORRUPT, UNKNOWN_ID, STATE, PYTHON = 0, 1, 2, 3, 4, 5, 6, 7
STATES = {state: code for code, state in enumerate(request_states)}
"""sc_state values: the runtime's request states in their order (queued 0 ... failed 4)."""


class Refused(Exception):
    """A failure with its sc_status decided where it happened (the bundle: missing or corrupt)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class UnknownId(LookupError):
    """A request id the engine does not know (never submitted, or released)."""


class WrongState(RuntimeError):
    """The call does not apply to the request now (frames of a running request, ...)."""


def status(exc: BaseException) -> tuple[int, str]:
    """The sc_status and message for an exception raised by a Host method."""
    if isinstance(exc, Refused):
        return exc.code, str(exc)
    if isinstance(exc, UnknownId):
        return UNKNOWN_ID, str(exc)
    if isinstance(exc, WrongState):
        return STATE, str(exc)
    if isinstance(exc, BadInput):
        return INVALID_ARGUMENT, exc.worded(c_field(exc.param))
    return PYTHON, f"{type(exc).__name__}: {exc}"


_REQUEST_FIELDS = {
    "prompt": "prompt",
    "prompt_embeds": "prompt_embeds",
    "seed": "seed",
    "steps": "steps",
    "guidance": "guidance",
    "cache": "cache",
    "knobs": "knobs_json",
}
_EXTRA_FIELDS = {"guidance_2": "guidance_2"}
_OPTION_FIELDS = {"backend": "backend", "device": "device", "threads": "threads"}


def c_field(param: str | None) -> str | None:
    """How the C ABI names a parameter: the field of sc_request, sc_request_extra or
    sc_engine_options that holds it (a cache knob is a key of request->knobs_json)."""
    if param in _REQUEST_FIELDS:
        return f"request->{_REQUEST_FIELDS[param]}"
    if param in _EXTRA_FIELDS:
        return f"extra->{_EXTRA_FIELDS[param]}"
    if param in _OPTION_FIELDS:
        return f"options->{_OPTION_FIELDS[param]}"
    if param in KNOBS:
        return f"request->knobs_json {param}"
    return param


class Host:
    """One sc_engine: a loaded bundle and its step engine; the C caller calls `step`."""

    def __init__(self, bundle_dir: str, backend: str, device: str, threads: int) -> None:
        try:
            bundle = Bundle.load(Path(bundle_dir))
        except MissingBundle as e:
            raise Refused(NOT_FOUND, str(e)) from None
        except BadInput as e:
            raise Refused(CORRUPT, str(e)) from None
        self.model = Model.open(bundle, backend, device, threads)
        self.engine = StepEngine(self.model)
        self.known: set[int] = set()
        self.reported: set[int] = set()
        self.frames: dict[int, np.ndarray] = {}

    def submit(
        self,
        prompt: str,
        embeds: np.ndarray | None,
        seed: int,
        steps: int,
        guidance: float,
        cache: str,
        knobs_json: str | None,
        image: np.ndarray | None = None,
        guidance_2: float = -1.0,
    ) -> int:
        """Validate and queue one request (as sencache.Engine.submit does); its id. `image` is the
        sc_image's pixels, uint8 [height, width, 3]; `guidance_2` sc_request_extra's (< 0: unset)."""
        manifest = self.model.bundle.manifest
        check_image_fits(manifest.family, manifest.model, image is not None)
        pixels = None if image is None else check_image(image)
        try:
            knobs = json.loads(knobs_json) if knobs_json else {}
        except json.JSONDecodeError as e:
            raise BadInput(f"knobs_json is not JSON: {e}") from None
        if not isinstance(knobs, dict):
            raise BadInput(f"knobs_json must be a JSON object of knob names to numbers, got {knobs_json!r}")
        request = GenerationParams.resolve(
            self.model.bundle.manifest.defaults,
            [prompt],
            [seed],
            steps=None if steps == 0 else steps,
            guidance=None if guidance < 0 else guidance,
            guidance_2=None if guidance_2 < 0 else guidance_2,
            cache=cache,
            knobs=knobs,
            prompt_embeds=None if embeds is None else embeds[None],
            image=pixels,
        )
        job_id = self.engine.submit(request)
        self.known.add(job_id)
        return job_id

    def step(self) -> tuple[int, list[tuple[int, int, int, int, int]]]:
        """One pass; (requests queued or running afterwards, progress of those that took part or ended)."""
        self.engine.step()
        report = []
        for job_id in sorted(self.known - self.reported):
            p = self.engine.poll(job_id)
            report.append((job_id, STATES[p.state], p.step, p.steps, p.nfe))
            if p.state in ("done", "cancelled", "failed"):
                self.reported.add(job_id)
        stats = self.engine.stats()
        return int(stats["queue_depth"] + stats["active_requests"]), report

    def poll(self, job_id: int) -> tuple[int, int, int, int]:
        p = self.engine.poll(self._known(job_id))
        return STATES[p.state], p.step, p.steps, p.nfe

    def cancel(self, job_id: int) -> bool:
        return self.engine.cancel(self._known(job_id))

    def video(self, job_id: int) -> np.ndarray:
        """The decoded frames [T, H, W, 3] float32 of a done request (decoded once)."""
        self._known(job_id)
        if job_id not in self.frames:
            state = self.engine.poll(job_id).state
            if state != "done":
                raise WrongState(f"request {job_id} is {state}: frames exist once it is done")
            frames = self.model.decode(self.engine.result(job_id).latents)[0]
            self.frames[job_id] = np.ascontiguousarray(frames, dtype=np.float32)
        return self.frames[job_id]

    def release(self, job_id: int) -> None:
        state = self.engine.poll(self._known(job_id)).state
        if state not in ("done", "cancelled", "failed"):
            raise WrongState(f"request {job_id} is {state}: release it once it has ended (cancel it first)")
        self.engine.release(job_id)
        self.known.discard(job_id)
        self.reported.discard(job_id)
        self.frames.pop(job_id, None)

    def close(self) -> None:
        """End every queued and running request as cancelled."""
        self.engine.end_all("cancelled")

    def _known(self, job_id: int) -> int:
        if job_id not in self.known:
            raise UnknownId(f"unknown request id {job_id}")
        return job_id
