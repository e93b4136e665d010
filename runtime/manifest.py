"""The bundle manifest: one typed, frozen object, parsed and checked on load before any field is used.

Every field the runtime reads is checked for its type and range by `Manifest.parse`, so a wrong
or hostile manifest ends in one line naming the field (`shapes.frames must be an integer in [1,
1024], got 1000000000000`) instead of a traceback deep in the loop. What depends on the model
family (the latent and text shapes, the stage inputs and outputs) is checked against the family
adapter by the bundle; the stage graphs' own inputs and outputs by the backend that opens them.
The builder constructs a `Manifest` and writes it with `to_json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, overload

from sencache.runtime.backends.registry import BACKENDS
from sencache.runtime.cache import KNOBS
from sencache.runtime.cache.registry import SECTIONS
from sencache.runtime.errors import BadInput, MissingBundle
from sencache.runtime.experts import stage_name
from sencache.runtime.files import BLAKE3, CHUNK_BYTES, SHA256
from sencache.runtime.limits import MAX_BATCH, MAX_FRAMES, MAX_PIXELS, MAX_STEPS

FORMAT = "sencache-bundle/4"
READABLE = (FORMAT, "sencache-bundle/3")
"""Formats this version loads: 4 lists BLAKE3 chunk digests, 3 (read as before) SHA-256 ones, so a
version that knows only 3 refuses a new bundle with its message to rebuild rather than a missing field."""
MANIFEST = "manifest.json"
DIGEST = "manifest.sha256"
SENSITIVITY = "sensitivity.json"
BASELINES = "baselines.json"
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
STAGES = ("head", "blocks", "tail")
MAX_EXPERTS = 2


def stage_names(experts: int = 1) -> tuple[str, ...]:
    """Every stage of a bundle of `experts` transformers (runtime/experts.py), expert by expert."""
    return tuple(stage_name(stage, e) for e in range(experts) for stage in STAGES)


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def max_rows(max_batch: int) -> int:
    """The most engine rows a stage call carries for `max_batch` samples: a cond and an uncond row each."""
    return 2 * max_batch


def plain_name(name: Any, field: str) -> str:
    """`name` if it is a plain relative path inside a bundle (no `..`, not absolute, no
    backslashes or empty parts), else BadInput naming `field`."""
    if not isinstance(name, str) or not name:
        raise BadInput(f"{field} must be a file name inside the bundle, got {name!r}")
    path = PurePosixPath(name)
    if (
        path.is_absolute()
        or "\\" in name
        or "\0" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
        or path.as_posix() != name
    ):
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

    @overload
    def obj(self, key: str, optional: Literal[False] = False) -> _Fields: ...
    @overload
    def obj(self, key: str, optional: bool) -> _Fields | None: ...
    def obj(self, key: str, optional: bool = False) -> _Fields | None:
        value = self.get(key, optional)
        return None if value is None and optional else _Fields(value, self.name(key))

    @overload
    def text(self, key: str, choices: tuple[str, ...] | None = None, optional: Literal[False] = False) -> str: ...
    @overload
    def text(self, key: str, choices: tuple[str, ...] | None = None, *, optional: bool) -> str | None: ...
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
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            raise BadInput(f"{self.name(key)} must be a finite number in [{low}, {high}], got {_show(value)}")
        return float(value)

    def flag(self, key: str) -> bool | None:
        value = self.get(key, optional=True)
        if value is not None and not isinstance(value, bool):
            raise BadInput(f"{self.name(key)} must be true or false, got {_show(value)}")
        return value

    def record(self, key: str) -> dict[str, Any]:
        """A free-form JSON object the runtime only reports (validation figures, tools); {} when absent."""
        value = self.obj(key, optional=True)
        return {} if value is None else value.value

    def names(self, key: str) -> list[str]:
        value = self.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadInput(f"{self.name(key)} must be a list of names, got {_show(value)}")
        return value

    def ints(self, key: str, length: int | None = None) -> list[int]:
        value = self.get(key)
        if (
            not isinstance(value, list)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            or (length is not None and len(value) != length)
        ):
            raise BadInput(f"{self.name(key)} must be a list of positive integers, got {_show(value)}")
        return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Stage:
    """One stage's file and the names of its inputs and outputs."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    parts: tuple[str, ...] = ()
    """Further graphs of the stage in a streamed build (groups of blocks), run after `file` in order,
    each taking the streams the one before returned (ONNX Runtime bundles only)."""

    @property
    def files(self) -> tuple[str, ...]:
        """Every graph of the stage, in the order they run."""
        return (self.file, *self.parts)

    def to_json(self) -> dict[str, Any]:
        parts = {"parts": list(self.parts)} if self.parts else {}
        return {"file": self.file, **parts, "inputs": list(self.inputs), "outputs": list(self.outputs)}


@dataclass(frozen=True)
class BundleShapes:
    """What a bundle is built for: pixel-space video size, batch range, and per-row tensor shapes."""

    frames: int
    height: int
    width: int
    max_batch: int
    latent: tuple[int, ...]
    text: tuple[int, ...]
    streams: tuple[tuple[int, ...], ...]
    """Per-row shapes of the cached streams."""

    @property
    def max_rows(self) -> int:
        return max_rows(self.max_batch)

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "height": self.height,
            "width": self.width,
            "max_batch": self.max_batch,
            "latent": list(self.latent),
            "text": list(self.text),
            "streams": [list(s) for s in self.streams],
            "dynamic": ["batch"],
        }


@dataclass(frozen=True)
class Defaults:
    """What a request takes when it does not say: steps, guidance, and each cache rule's knobs."""

    steps: int
    guidance: float
    cache: dict[str, Any]
    """Default knobs by section of the cache rules' registry ("sencache", "teacache", "magcache"),
    each an instance of the settings type its rule registered for it."""
    guidance_2: float | None = None
    """A two-expert model's guidance scale for its second expert (None: one expert)."""

    def knobs(self, section: str) -> dict[str, Any]:
        """The default knobs of `section` by name ({} where the bundle has none)."""
        settings = self.cache.get(section)
        return {} if settings is None else dataclasses.asdict(settings)

    def to_json(self) -> dict[str, Any]:
        second = {} if self.guidance_2 is None else {"guidance_2": self.guidance_2}
        return {"steps": self.steps, "guidance": self.guidance, **second, **{k: self.knobs(k) for k in self.cache}}

    @classmethod
    def parse(cls, data: Any, path: str = "defaults") -> Defaults:
        """Steps, guidance and each registered section's knobs, checked by the knob table and
        typed by the section's settings (BadInput names the field)."""
        return _defaults(_Fields(data, path))


@dataclass(frozen=True)
class TensorRTRecord:
    """What built a TensorRT bundle's engines, which must match what runs them."""

    module: str
    """The Python module of the engines: tensorrt or tensorrt_rtx."""
    version: str
    compute_capability: str | None
    """The GPU the engines target (SM89, or "build GPU"); None where the record has none."""
    details: dict[str, Any] = field(default_factory=dict)
    """The build's other notes (profiles, timing cache, validation), reported as written."""

    def to_json(self) -> dict[str, Any]:
        head = {"module": self.module, "version": self.version}
        if self.compute_capability is not None:
            head["compute_capability"] = self.compute_capability
        return {**head, **self.details}

    @classmethod
    def parse(cls, data: Any, path: str = "tensorrt") -> TensorRTRecord:
        record = _Fields(data, path)
        modules = tuple(b.engine_module for b in BACKENDS.values() if b.engine_module is not None)
        return cls(
            module=record.text("module", modules),
            version=record.text("version"),
            compute_capability=record.text("compute_capability", optional=True),
            details={k: v for k, v in record.value.items() if k not in ("module", "version", "compute_capability")},
        )


DUMMY_NOTICE = "the weights are RANDOM (a dummy build): engineering and speed checks only, its outputs mean nothing"
"""What generate, serve and bench print once on a dummy bundle."""

TEXT_ENCODERS = ("tiny", "diffusers", "dummy")
"""A tiny encoder in the bundle, diffusers' from the weights folder, or none (dummy builds: prompt
embeddings drawn from the prompt, latents as output; see runtime/dummy.py)."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """A tiny text encoder stored in the bundle (`file`, `dim`), diffusers' from the weights folder,
    or a dummy build's stand-in."""

    kind: str
    file: str | None = None
    dim: int | None = None
    untrained: bool = False
    source: str | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.kind == "tiny":
            return {
                "kind": self.kind,
                "file": self.file,
                "dim": self.dim,
                **({"untrained": True} if self.untrained else {}),
            }
        return {"kind": self.kind, "source": self.source, **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class FileEntry:
    """A listed file's size and the `algorithm` digest of each `chunk_bytes` chunk (one digest for a
    file no larger), which a check hashes on every core at once (runtime/files.py `chunk_digests`).
    Bundles written now list BLAKE3 digests; bundles written before list the whole file's SHA-256
    (`sha256`) and, past 64 MiB, each chunk's SHA-256, or no chunks (then checked by `sha256`)."""

    bytes: int
    chunks: tuple[str, ...]
    chunk_bytes: int = CHUNK_BYTES
    algorithm: str = BLAKE3
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        chunked = {"chunk_bytes": self.chunk_bytes, "chunks": list(self.chunks)}
        if self.algorithm == BLAKE3:
            return {"bytes": self.bytes, "algorithm": BLAKE3, **chunked}
        return {"bytes": self.bytes, "sha256": self.sha256, **(chunked if self.chunks else {})}


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest. `files` is filled in when the bundle is written."""

    model: str
    family: str
    tiny: bool
    trained: bool
    config: dict[str, Any]
    shapes: BundleShapes
    precision: str
    backend: str
    stages: dict[str, Stage]
    scheduler: dict[str, Any]
    defaults: Defaults
    text_encoder: TextEncoderSpec
    validation: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    weights_source: str | None = None
    created: str | None = None
    weights: str | None = None
    """The saved transformer's folder (torch bundles)."""
    quantization: dict[str, Any] | None = None
    tensorrt: TensorRTRecord | None = None
    dummy_seed: int | None = None
    """The seed of the transformer's random weights in a dummy build (random weights at the real
    shapes); None for real weights. Written as `dummy_weights: {"seed": ...}`."""
    sizing: dict[str, Any] | None = None
    """A dummy build's choice of precision, block grouping and resolution, what it was chosen from
    (parameters, available memory, estimated peak) and which parts were automatic."""
    files: dict[str, FileEntry] = field(default_factory=dict)
    experts: int = 1
    """Transformers that denoise in turn (Wan 2.2 A14B: 2), each with its own stages."""
    boundary: float | None = None
    """With two experts: the timestep from which down the second one denoises (runtime/experts.py)."""

    @property
    def dummy(self) -> bool:
        """The weights are random (a dummy build): engineering and speed checks only."""
        return self.dummy_seed is not None

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to manifest.json."""
        data: dict[str, Any] = {
            "format": FORMAT,
            "model": self.model,
            "family": self.family,
            "tiny": self.tiny,
            "trained": self.trained,
            "config": self.config,
            "shapes": self.shapes.to_json(),
            "precision": self.precision,
            "backend": self.backend,
            "stages": {name: stage.to_json() for name, stage in self.stages.items()},
            "scheduler": self.scheduler,
            "defaults": self.defaults.to_json(),
            "text_encoder": self.text_encoder.to_json(),
            "validation": self.validation,
            "tools": self.tools,
            "weights_source": self.weights_source,
            "created": self.created,
        }
        optional = {
            "weights": self.weights,
            "quantization": self.quantization,
            "tensorrt": None if self.tensorrt is None else self.tensorrt.to_json(),
            "dummy_weights": None if self.dummy_seed is None else {"seed": self.dummy_seed},
            "sizing": self.sizing,
            "experts": None if self.experts == 1 else {"count": self.experts, "boundary": self.boundary},
        }
        data.update({k: v for k, v in optional.items() if v is not None})
        data["files"] = {name: e.to_json() for name, e in self.files.items()}
        return data

    @classmethod
    def parse(cls, data: Any) -> Manifest:
        """Check the types and ranges of every field the runtime reads (BadInput names the first
        bad field) and return them typed. Family-dependent consistency is the bundle's to check."""
        m = _Fields(data, "")
        fmt = m.get("format")
        if fmt not in READABLE:
            raise BadInput(
                f"bundle format {_show(fmt)} is not {FORMAT!r}: rebuild it with this version (`sencache build`)"
            )
        model, family = m.text("model"), m.text("family")
        tiny, trained = m.flag("tiny"), m.flag("trained")
        config = m.obj("config").value
        shapes = _shapes(m.obj("shapes"))
        precision = m.text("precision", PRECISIONS)
        backend = m.text("backend", tuple(BACKENDS))
        experts, boundary = _experts(m.obj("experts", optional=True))
        stages = _stages(m.obj("stages"), experts)
        if backend == "torch" and any(stage.parts for stage in stages.values()):
            raise BadInput("stages with parts (a streamed build) run on onnxruntime or tensorrt, not torch")
        weights = plain_name(m.text("weights"), "weights") if backend == "torch" else None
        tensorrt = TensorRTRecord.parse(m.get("tensorrt")) if BACKENDS[backend].engine_module else None
        scheduler = m.obj("scheduler")
        scheduler.text("_class_name")
        defaults = _defaults(m.obj("defaults"))
        text_encoder = _text_encoder(m.obj("text_encoder"))
        weights_source = m.text("weights_source", optional=True)
        dummy = m.obj("dummy_weights", optional=True)
        files = _files(m.obj("files"))
        return cls(
            model=model,
            family=family,
            tiny=bool(tiny),
            trained=trained is not False,
            config=config,
            shapes=shapes,
            precision=precision,
            backend=backend,
            stages=stages,
            scheduler=scheduler.value,
            defaults=defaults,
            text_encoder=text_encoder,
            validation=m.record("validation"),
            tools=m.record("tools"),
            weights_source=weights_source,
            created=m.text("created", optional=True),
            weights=weights,
            quantization=m.record("quantization") or None,
            tensorrt=tensorrt,
            dummy_seed=None if dummy is None else dummy.integer("seed", 0, 2**31 - 1),
            sizing=m.record("sizing") or None,
            files=files,
            experts=experts,
            boundary=boundary,
        )


def _experts(section: _Fields | None) -> tuple[int, float | None]:
    """(count, boundary timestep) of a bundle's experts; (1, None) where the manifest has none."""
    if section is None:
        return 1, None
    count = section.integer("count", 2, MAX_EXPERTS)
    return count, section.number("boundary", 0.0)


def _stages(section: _Fields, experts: int) -> dict[str, Stage]:
    stages = {}
    for stage in stage_names(experts):
        spec = section.obj(stage)
        parts = spec.names("parts") if "parts" in spec.value else []
        stages[stage] = Stage(
            plain_name(spec.text("file"), spec.name("file")),
            tuple(spec.names("inputs")),
            tuple(spec.names("outputs")),
            tuple(plain_name(part, spec.name("parts")) for part in parts),
        )
    return stages


def _files(listing: _Fields) -> dict[str, FileEntry]:
    files = {}
    for name in listing.value:
        plain_name(name, "files")
        entry = listing.obj(name)
        size = entry.integer("bytes", 0, 2**50)
        if "algorithm" in entry.value:
            algorithm = entry.text("algorithm")
            if algorithm != BLAKE3:
                raise BadInput(f"{entry.name('algorithm')} must be {BLAKE3!r}, got {_show(algorithm)}")
            files[name] = FileEntry(size, *_chunks(entry, size, algorithm))
            continue
        digest = entry.text(SHA256)  # a bundle written before BLAKE3
        if not _HEX_DIGEST.fullmatch(digest):
            raise BadInput(f"{entry.name(SHA256)} must be 64 lowercase hex digits")
        chunks, chunk_bytes = _chunks(entry, size, SHA256) if "chunks" in entry.value else ((), 0)
        files[name] = FileEntry(size, chunks, chunk_bytes, SHA256, digest)
    return files


def _chunks(entry: _Fields, size: int, algorithm: str) -> tuple[tuple[str, ...], int]:
    """A file's chunk digests and chunk size: the 64-hex-digit digest of each chunk (one for an
    empty file)."""
    chunk_bytes = entry.integer("chunk_bytes", 1 << 20, 1 << 34)
    chunks = entry.names("chunks")
    count = max(-(-size // chunk_bytes), 1)
    if len(chunks) != count or not all(_HEX_DIGEST.fullmatch(c) for c in chunks):
        raise BadInput(
            f"{entry.name('chunks')} must be the 64-hex-digit {algorithm} digest of each of the file's "
            f"{count} chunks of {chunk_bytes} bytes"
        )
    return tuple(chunks), chunk_bytes


def _shapes(shapes: _Fields) -> BundleShapes:
    frames = shapes.integer("frames", 1, MAX_FRAMES)
    height = shapes.integer("height", 1, MAX_PIXELS)
    width = shapes.integer("width", 1, MAX_PIXELS)
    max_batch = shapes.integer("max_batch", 1, MAX_BATCH)
    latent = shapes.ints("latent")
    text = shapes.ints("text", 2)
    if not isinstance(shapes.get("streams"), list) or not shapes.value["streams"]:
        raise BadInput("shapes.streams must be a list of per-row stream shapes")
    streams = tuple(
        tuple(_Fields({"shape": s}, f"shapes.streams[{i}]").ints("shape"))
        for i, s in enumerate(shapes.value["streams"])
    )
    return BundleShapes(frames, height, width, max_batch, tuple(latent), tuple(text), streams)


def _defaults(defaults: _Fields) -> Defaults:
    steps = defaults.integer("steps", 1, MAX_STEPS)
    guidance = defaults.number("guidance", 0.0)
    guidance_2 = defaults.number("guidance_2", 0.0) if "guidance_2" in defaults.value else None
    cache = {}
    for name, section in SECTIONS.items():
        fields = defaults.obj(name, optional=not section.required)
        if fields is None:
            continue
        knobs: dict[str, float] = {}
        for knob in (KNOBS[f.name] for f in dataclasses.fields(section.settings)):
            if knob.type is int:
                knobs[knob.name] = fields.integer(knob.name, int(knob.low), int(knob.high))
            else:
                knobs[knob.name] = fields.number(knob.name, knob.low, knob.high)
        cache[name] = section.settings(**knobs)
    return Defaults(steps, guidance, cache, guidance_2)


def _text_encoder(spec: _Fields) -> TextEncoderSpec:
    kind = spec.text("kind", TEXT_ENCODERS)
    if kind == "tiny":
        file = plain_name(spec.text("file"), "text_encoder.file")
        return TextEncoderSpec(
            "tiny", file=file, dim=spec.integer("dim", 1, 65536), untrained=spec.flag("untrained") is True
        )
    return TextEncoderSpec(kind, source=spec.text("source", optional=True), note=spec.text("note", optional=True))


def scheduler_class(config: dict[str, Any]) -> type[Any]:
    """The diffusers scheduler class a config names; BadInput unless it is a real scheduler. Typed
    as any class: its `from_config` comes from ConfigMixin, which SchedulerMixin does not derive."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise BadInput(f"scheduler._class_name {_show(name)} is not a diffusers scheduler")
    return cls


def read_manifest(path: Path) -> tuple[Manifest, str]:
    """The manifest of the bundle folder `path` and its SHA-256, checked against the digest recorded
    beside it and against the schema; BadInput naming the bundle and the fault. It needs no model
    code, so a front end calls it before it loads anything heavy (the bundle's family and files are
    checked by `Bundle.load`)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingBundle(f"no engine bundle at {path}: build one there first (`sencache build`)")
    try:
        data = _read_regular(path, MANIFEST)
    except FileNotFoundError:
        raise MissingBundle(f"{path} is not an engine bundle: {MANIFEST} is missing") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        recorded = _read_regular(path, DIGEST).decode("ascii").split()[0]
    except (FileNotFoundError, UnicodeDecodeError, IndexError):
        raise BadInput(f"bundle {path}: {DIGEST} is missing or unreadable; rebuild the bundle") from None
    if recorded != digest:
        raise BadInput(f"bundle {path}: {MANIFEST} does not match its digest in {DIGEST} (edited or corrupt)")
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"corrupt {MANIFEST} in {path}: {e}") from None
    try:
        return Manifest.parse(document), digest
    except BadInput as e:
        raise BadInput(f"bundle {path}: {e}") from None


def _read_regular(folder: Path, name: str) -> bytes:
    file = folder / name
    if file.is_symlink():
        raise BadInput(f"bundle {folder}: {name} is a symbolic link; bundles hold regular files only")
    return file.read_bytes()
