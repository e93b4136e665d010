"""The bundle manifest's schema, checked on load before any field is used.

Every field the runtime reads is checked for its type and range here, so a wrong or hostile
manifest ends in one line naming the field (`shapes.frames must be an integer in [1, 1024], got
1000000000000`) instead of a traceback deep in the loop. What depends on the model family (the
latent and text shapes, the stage inputs and outputs) is checked against the family adapter; the
stage graphs' own inputs and outputs are checked by the backend that opens them.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any

from sencache.runtime.errors import BadInput

FORMAT = "sencache-bundle/2"
BACKENDS = ("onnxruntime", "torch", "tensorrt", "tensorrt-rtx")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
STAGES = ("head", "blocks", "tail")
MAX_FRAMES = 1024
MAX_PIXELS = 8192
MAX_BATCH = 64
MAX_STEPS = 1000
"""The most denoising steps a request may ask for (published schedules use 20-100)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


def plain_name(name: Any, field: str) -> str:
    """`name` if it is a plain relative path inside a bundle (no `..`, not absolute, no
    backslashes or empty parts), else BadInput naming `field`."""
    if not isinstance(name, str) or not name:
        raise BadInput(f"{field} must be a file name inside the bundle, got {name!r}")
    path = PurePosixPath(name)
    if (path.is_absolute() or "\\" in name or "\0" in name or any(part in ("", ".", "..") for part in name.split("/"))
            or path.as_posix() != name):
        raise BadInput(f"{field} must be a plain relative name inside the bundle, got {name!r}")
    return name


class _Fields:
    """Typed reads of one JSON object, each failure naming the field's dotted path."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise BadInput(f"{path or 'manifest'} must be a JSON object, got {type(value).__name__}")
        self.value, self.path = value, path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, optional: bool = False) -> Any:
        if key not in self.value:
            if optional:
                return None
            raise BadInput(f"{self.name(key)} is missing")
        return self.value[key]

    def obj(self, key: str, optional: bool = False) -> _Fields | None:
        value = self.get(key, optional)
        return None if value is None and optional else _Fields(value, self.name(key))

    def text(self, key: str, choices: tuple[str, ...] | None = None, optional: bool = False) -> str | None:
        value = self.get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise BadInput(f"{self.name(key)} must be a string, got {_show(value)}")
        if choices is not None and value not in choices:
            raise BadInput(f"{self.name(key)} must be one of {', '.join(choices)}, got {_show(value)}")
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadInput(f"{self.name(key)} must be an integer in [{low}, {high}], got {_show(value)}")
        return value

    def number(self, key: str, low: float, high: float = math.inf) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise BadInput(f"{self.name(key)} must be a finite number in [{low}, {high}], got {_show(value)}")
        return float(value)

    def flag(self, key: str) -> None:
        value = self.get(key, optional=True)
        if value is not None and not isinstance(value, bool):
            raise BadInput(f"{self.name(key)} must be true or false, got {_show(value)}")

    def names(self, key: str) -> list[str]:
        value = self.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadInput(f"{self.name(key)} must be a list of names, got {_show(value)}")
        return value

    def ints(self, key: str, length: int | None = None) -> list[int]:
        value = self.get(key)
        if (not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
                or (length is not None and len(value) != length)):
            raise BadInput(f"{self.name(key)} must be a list of positive integers, got {_show(value)}")
        return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(manifest: Any) -> None:
    """Check the types and ranges of every manifest field the runtime reads (BadInput names the
    first bad field). Family-dependent consistency is `check_against_family`'s."""
    m = _Fields(manifest, "")
    fmt = m.get("format")
    if fmt != FORMAT:
        raise BadInput(f"bundle format {_show(fmt)} is not {FORMAT!r}: rebuild it with this version "
                       f"(`sencache build`)")
    m.text("model")
    m.text("family")
    m.flag("tiny")
    m.flag("trained")
    m.obj("config")
    shapes = m.obj("shapes")
    shapes.integer("frames", 1, MAX_FRAMES)
    shapes.integer("height", 1, MAX_PIXELS)
    shapes.integer("width", 1, MAX_PIXELS)
    max_batch = shapes.integer("max_batch", 1, MAX_BATCH)
    if shapes.integer("max_rows", 1, 2 * MAX_BATCH) != 2 * max_batch:
        raise BadInput(f"shapes.max_rows must be 2 x shapes.max_batch = {2 * max_batch}")
    shapes.ints("latent")
    shapes.ints("text", 2)
    if not isinstance(shapes.get("streams"), list) or not shapes.value["streams"]:
        raise BadInput("shapes.streams must be a list of per-row stream shapes")
    for i in range(len(shapes.value["streams"])):
        _Fields({"shape": shapes.value["streams"][i]}, f"shapes.streams[{i}]").ints("shape")
    m.text("precision", PRECISIONS)
    backend = m.text("backend", BACKENDS)
    stages = m.obj("stages")
    for stage in STAGES:
        spec = stages.obj(stage)
        plain_name(spec.text("file"), spec.name("file"))
        spec.names("inputs")
        spec.names("outputs")
    if backend == "torch":
        plain_name(m.text("weights"), "weights")
    if backend in ("tensorrt", "tensorrt-rtx"):
        tensorrt = m.obj("tensorrt")
        tensorrt.text("module", ("tensorrt", "tensorrt_rtx"))
        tensorrt.text("version")
        tensorrt.text("compute_capability", optional=True)
    scheduler = m.obj("scheduler")
    scheduler.text("_class_name")
    defaults = m.obj("defaults")
    defaults.integer("steps", 1, MAX_STEPS)
    defaults.number("guidance", 0.0)
    sencache = defaults.obj("sencache")
    sencache.number("eps_start", 0.0)
    sencache.number("eps_main", 0.0)
    sencache.integer("max_reuse", 0, MAX_STEPS)
    teacache = defaults.obj("teacache", optional=True)
    if teacache is not None:
        teacache.number("threshold", 0.0)
    magcache = defaults.obj("magcache", optional=True)
    if magcache is not None:
        magcache.number("threshold", 0.0)
        magcache.integer("max_reuse", 0, MAX_STEPS)
        magcache.number("retention", 0.0, 1.0)
    text_encoder = m.obj("text_encoder")
    if text_encoder.text("kind", ("tiny", "diffusers")) == "tiny":
        plain_name(text_encoder.text("file"), "text_encoder.file")
        text_encoder.integer("dim", 1, 65536)
    else:
        text_encoder.text("source", optional=True)
    m.text("weights_source", optional=True)
    files = m.obj("files")
    for name in files.value:
        plain_name(name, "files")
        entry = files.obj(name)
        entry.integer("bytes", 0, 2**50)
        digest = entry.text("sha256")
        if not _SHA256.fullmatch(digest):
            raise BadInput(f"{entry.name('sha256')} must be 64 lowercase hex digits")


def scheduler_class(config: dict[str, Any]) -> type:
    """The diffusers scheduler class a config names; BadInput unless it is a real scheduler."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise BadInput(f"scheduler._class_name {_show(name)} is not a diffusers scheduler")
    return cls
