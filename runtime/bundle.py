"""An engine bundle on disk: stage files, `manifest.json` and its digest, and calibration tables.

Integrity: the manifest's own SHA-256 is in `manifest.sha256`; the manifest lists every file the
runtime opens (stage files, weights, text encoder, calibration tables) with its size and the BLAKE3
digest of each 64 MiB chunk. On load, the digest is checked, the manifest is validated against its
schema and the family, and every listed name must be a plain name inside the bundle that is a
regular file there (no `..`, no absolute paths, no links). A file's bytes are checked against its
digests when the runtime reads them (`read`, `checked_file`, `checked_folder`), so every byte that
is loaded has been verified, once; large files are hashed streaming, chunks on every core at once
(`checked_file`), and then opened by their loader. A bundle written before BLAKE3 is checked by the
SHA-256 digests it lists (of each chunk where it lists chunks, else of the whole file).
The checksums catch corruption and edits; they are not a signature against someone who rewrites
the manifest and its digest together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sencache.runtime import manifest as schema
from sencache.runtime.cache.baselines import BaselineTables
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import stage_name, table_name
from sencache.runtime.families import FamilyAdapter, ModelPreset, Shapes, adapter_for
from sencache.runtime.families.parts import make_scheduler
from sencache.runtime.files import BUNDLE, OWNER, chunk_digests, digest_of, staged_folder, write_atomic
from sencache.runtime.manifest import BASELINES, DIGEST, MANIFEST, SENSITIVITY, FileEntry, Manifest
from sencache.runtime.sensitivity import SensitivityTable

FORMAT = schema.FORMAT
KIND = BUNDLE
_UNLISTED = {MANIFEST, DIGEST, OWNER}
EXTERNAL_DATA = ".data"
"""The suffix of an ONNX graph's external weights file, as the exporter names it (`blocks.onnx.data`)."""


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    digest: str
    """SHA-256 of the manifest as loaded (a rewrite of the bundle changes it)."""
    _tables: dict[str, SensitivityTable | BaselineTables] = field(default_factory=dict, init=False, repr=False)
    """The calibration tables as parsed and verified, once per loaded bundle, shared by every request."""
    _tables_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def load(cls, path: Path) -> Bundle:
        """Read and check a bundle; every problem is a BadInput naming the bundle and the fault."""
        path = Path(path)
        manifest, digest = schema.read_manifest(path)
        try:
            bundle = cls(path, manifest, digest)
            _check_family(bundle)
            _check_files(bundle)
        except BadInput as e:
            raise BadInput(f"bundle {path}: {e}") from None
        return bundle

    @classmethod
    def being_built(cls, folder: Path, manifest: Manifest) -> Bundle:
        """The bundle the builder is writing into `folder`, before its manifest is written: its
        files as they are now, checksummed here, so the builder's own runs (fp8 calibration) read
        them through the same checks as a loaded bundle."""
        return cls(Path(folder), manifest.replace(files=list_files(folder)), digest="")

    def _inside(self, name: str) -> Path:
        """The path of a listed name, refusing links and anything that resolves outside the bundle."""
        schema.plain_name(name, "file name")
        root = self.path.resolve()
        file = self.path / name
        for part in [file, *file.parents]:
            if part == self.path:
                break
            if part.is_symlink():
                raise BadInput(f"{name} is a symbolic link; bundles hold regular files only")
        if root not in file.resolve().parents:
            raise BadInput(f"{name} resolves outside the bundle")
        return file

    def read(self, name: str) -> bytes:
        """The bytes of listed file `name`, checked against its digests (read once)."""
        entry = self.manifest.files.get(name)
        if entry is None:
            raise BadInput(f"bundle {self.path}: {name} is not listed in {MANIFEST}'s files")
        data = self._inside(name).read_bytes()
        if len(data) != entry.bytes:
            self._refuse(name, "size differs")
        self._refuse(name, _differs(entry, digest_of(data, entry.algorithm, _chunk_bytes(entry))))
        return data

    def _refuse(self, name: str, why: str | None) -> None:
        """BadInput naming file `name` and `why` it differs, when it does (`why` not None)."""
        if why is not None:
            raise BadInput(f"bundle {self.path}: file {name} does not match its checksum in {MANIFEST}: {why}")

    def checked_file(self, name: str) -> Path:
        """The path of listed file `name` after its streamed check (and its external data's,
        `name.data`, when listed: an ONNX graph past 2 GB keeps its weights there), for loaders that
        open the file themselves; no file is held in memory."""
        for file in (name, f"{name}{EXTERNAL_DATA}"):
            entry = self.manifest.files.get(file)
            if entry is None:
                if file == name:
                    raise BadInput(f"bundle {self.path}: {name} is not listed in {MANIFEST}'s files")
                continue
            self._refuse(file, mismatch(self._inside(file), entry))
        return self._inside(name)

    def checked_folder(self, name: str) -> Path:
        """A listed folder, after checking every file in it (all listed, all matching): for
        loaders that open files themselves (diffusers' from_pretrained)."""
        folder = self._inside(name)
        listed = {n for n in self.manifest.files if n.startswith(name + "/")}
        present = {p.relative_to(self.path).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()}
        if not listed or present - listed:
            stray = sorted(present - listed)
            raise BadInput(f"bundle {self.path}: {stray[0] if stray else name} is not listed in {MANIFEST}'s files")
        for file in sorted(listed):
            self._refuse(file, mismatch(self._inside(file), self.manifest.files[file]))
        return folder

    def verify_files(self) -> None:
        """Hash every listed file now, streamed (a full check; loading checks each file as it is read)."""
        for name in self.manifest.files:
            self.checked_file(name)

    @property
    def adapter(self) -> FamilyAdapter:
        return adapter_for(self.manifest.family)

    @property
    def shapes(self) -> Shapes:
        s = self.manifest.shapes
        return Shapes(s.frames, s.height, s.width, s.max_batch)

    @property
    def preset(self) -> ModelPreset:
        """The model as built: the named preset with the bundle's config and shapes."""
        base = self.adapter.preset(self.manifest.model)
        shapes = self.shapes
        return dataclasses.replace(
            base, config=self.manifest.config, frames=shapes.frames, height=shapes.height, width=shapes.width
        )

    def timesteps(self, steps: int) -> list[float]:
        """The timesteps of a run of `steps` on the bundle's scheduler, as its family samples them."""
        sampler = self.adapter.sampler(
            make_scheduler(self.adapter, self.preset, self.manifest.scheduler), steps, self.preset, self.shapes
        )
        return [float(t) for t in sampler.timesteps]

    @property
    def sensitivity_path(self) -> Path:
        return self.path / SENSITIVITY

    def sensitivity(self, expert: int = 0) -> SensitivityTable:
        """The sensitivity table (of `expert`, in a bundle of several: each is calibrated on its own
        steps), read, verified and parsed on first use. Shared: callers do not change it."""
        name = table_name(SENSITIVITY, expert)
        if name not in self.manifest.files:
            raise BadInput(f"no sensitivity table {name} in {self.path}: calibrate it first (`sencache calibrate`)")
        table = _parsed(self, name, SensitivityTable.parse)
        assert isinstance(table, SensitivityTable)
        return table

    @property
    def baselines_path(self) -> Path:
        return self.path / BASELINES

    def baselines(self, expert: int = 0) -> BaselineTables:
        """The baseline tables (of `expert`), read, verified and parsed on first use. Shared:
        callers do not change them."""
        name = table_name(BASELINES, expert)
        if name not in self.manifest.files:
            raise BadInput(f"no baseline tables {name} in {self.path}: calibrate it first (`sencache calibrate`)")
        tables = _parsed(self, name, BaselineTables.parse)
        assert isinstance(tables, BaselineTables)
        return tables

    def write_tables(
        self,
        sensitivity: SensitivityTable | None = None,
        baselines: BaselineTables | None = None,
        expert: int = 0,
    ) -> None:
        """Replace the calibration tables given (of `expert`), together: the bundle is restaged
        (hard links, no copies), the tables and the manifest rewritten, and swapped in whole.
        Refused when the bundle was rebuilt since it was loaded (tables measured on another build)."""
        if not 0 <= expert < self.manifest.experts:
            raise BadInput(f"expert must be in [0, {self.manifest.experts}), got {expert}", param="expert")
        with staged_folder(self.path, KIND, seed=True) as folder:
            if (folder / DIGEST).read_text().split()[0] != self.digest:
                raise BadInput(f"bundle {self.path} changed since it was loaded; calibrate it again")
            if sensitivity is not None:
                write_atomic(folder / table_name(SENSITIVITY, expert), sensitivity.to_bytes())
            if baselines is not None:
                write_atomic(folder / table_name(BASELINES, expert), baselines.to_bytes())
            self.manifest, self.digest = write_manifest(folder, self.manifest)
        with self._tables_lock:
            self._tables.clear()

    def adopt_tables(self, source: Bundle) -> SensitivityTable:
        """Take the sensitivity table (and baseline tables, if any) of another bundle of the same
        model and scheduler: an fp8 bundle takes its fp32 bundle's, because finite differences on
        the quantized model measure quantization noise (2-4x larger Jx, Jt on tiny-wan) and the
        rule then never reuses."""
        for key in ("model", "config", "scheduler"):
            if getattr(source.manifest, key) != getattr(self.manifest, key):
                raise BadInput(
                    f"bundle {source.path} differs from {self.path} in its {key}; tables only carry over "
                    f"between builds of the same model and scheduler"
                )
        tables = []
        for expert in range(self.manifest.experts):  # each expert's tables (the first's returned)
            table = dataclasses.replace(source.sensitivity(expert))
            table.meta = {
                **table.meta,
                "adopted_from": str(source.path),
                "adopted_precision": source.manifest.precision,
            }
            has_baselines = table_name(BASELINES, expert) in source.manifest.files
            self.write_tables(table, source.baselines(expert) if has_baselines else None, expert)
            tables.append(table)
        return tables[0]


def list_files(folder: Path) -> dict[str, FileEntry]:
    """Size and BLAKE3 chunk digests of every file in `folder` the manifest lists (all but itself,
    its digest and the owner marker), each file read once."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in _UNLISTED)
    return {f.relative_to(folder).as_posix(): FileEntry(f.stat().st_size, tuple(chunk_digests(f))) for f in files}


def _chunk_bytes(entry: FileEntry) -> int:
    """The bytes each listed digest covers: a whole file when a bundle written before BLAKE3 lists
    only its SHA-256."""
    return entry.chunk_bytes if entry.chunks else max(entry.bytes, 1)


def mismatch(path: Path, entry: FileEntry) -> str | None:
    """What of the file at `path` differs from `entry` (its size, a chunk, its digest), or None when
    it matches; hashed streaming, chunks on every core."""
    if path.stat().st_size != entry.bytes:
        return "size differs"
    return _differs(entry, chunk_digests(path, entry.algorithm, _chunk_bytes(entry)))


def _differs(entry: FileEntry, digests: list[str]) -> str | None:
    """Which listed digest `digests` fail (the first chunk that differs), or None when they match."""
    listed = list(entry.chunks) if entry.chunks else [entry.sha256]
    if digests == listed:
        return None
    if len(listed) == 1:
        return f"its {entry.algorithm} digest differs"
    chunk = next(i for i, (a, b) in enumerate(zip(digests, listed, strict=True)) if a != b)
    start = chunk * entry.chunk_bytes
    return f"chunk {chunk} of {len(listed)} (bytes {start} to {min(start + entry.chunk_bytes, entry.bytes)}) differs"


def write_manifest(folder: Path, manifest: Manifest) -> tuple[Manifest, str]:
    """Checksum every file in `folder` into the manifest, write it and its digest (atomically);
    returns the manifest as written and its digest."""
    manifest = manifest.replace(files=list_files(folder))
    data = json.dumps(manifest.to_json(), indent=1).encode()
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(folder / MANIFEST, data)
    write_atomic(folder / DIGEST, f"{digest}  {MANIFEST}\n".encode())
    return manifest, digest


def _check_family(bundle: Bundle) -> None:
    """The manifest agrees with its family: known model, stage names, shapes, scheduler."""
    adapter = bundle.adapter
    preset = bundle.preset
    if bundle.manifest.experts != preset.experts:
        raise BadInput(f"experts: {preset.name} has {preset.experts}, the manifest {bundle.manifest.experts}")
    for expert in range(preset.experts):
        for stage, (inputs, outputs) in adapter.layout.stage_io.items():
            name = stage_name(stage, expert)
            spec = bundle.manifest.stages[name]
            if spec.inputs != inputs or spec.outputs != outputs:
                raise BadInput(
                    f"stages.{name} inputs/outputs {list(spec.inputs)} -> {list(spec.outputs)} are not the "
                    f"{adapter.family} stage's {list(inputs)} -> {list(outputs)}"
                )
    try:
        latent = adapter.latent_shape(preset, bundle.shapes)
        text = adapter.text_shape(preset)
        make_scheduler(adapter, preset, bundle.manifest.scheduler)
    except BadInput:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise BadInput(f"config or scheduler do not fit the {adapter.family} family: {e}") from None
    shapes = bundle.manifest.shapes
    if shapes.latent != tuple(latent):
        raise BadInput(
            f"shapes.latent {list(shapes.latent)} is not the {list(latent)} that frames, height and width give"
        )
    if shapes.text != tuple(text):
        raise BadInput(f"shapes.text {list(shapes.text)} is not the model's {list(text)}")


def _check_files(bundle: Bundle) -> None:
    """Every file the runtime will open is listed, a regular file inside the bundle, of its size."""
    files = bundle.manifest.files
    needed = [file for stage in bundle.manifest.stages.values() for file in stage.files]
    if bundle.manifest.text_encoder.kind == "tiny":
        assert bundle.manifest.text_encoder.file is not None, "Manifest.parse sets a tiny encoder's file"
        needed.append(bundle.manifest.text_encoder.file)
    tables = [table_name(t, e) for t in (SENSITIVITY, BASELINES) for e in range(bundle.manifest.experts)]
    for name in tables:
        if (bundle.path / name).exists() or (bundle.path / name).is_symlink():
            needed.append(name)
    for name in needed:
        if name not in files and not any(listed.startswith(name + "/") for listed in files):
            raise BadInput(f"{name} is not listed in {MANIFEST}'s files: it cannot be verified")
    for name, entry in files.items():
        file = bundle._inside(name)
        if not file.is_file():
            raise BadInput(f"file {name} is missing")
        if file.stat().st_size != entry.bytes:
            raise BadInput(f"file {name} does not match its checksum in {MANIFEST} (size differs)")


def _parsed(
    bundle: Bundle, name: str, parse: Callable[[bytes, str], SensitivityTable | BaselineTables]
) -> SensitivityTable | BaselineTables:
    """Table `name` of `bundle`, read, verified and parsed once per loaded bundle (under its lock)."""
    with bundle._tables_lock:
        if name not in bundle._tables:
            bundle._tables[name] = parse(bundle.read(name), f"{bundle.path / name}")
        return bundle._tables[name]
