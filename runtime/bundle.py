"""An engine bundle on disk: stage files, `manifest.json`, and optionally `sensitivity.json`.

The manifest says what was built (model, family, config, shapes, precision, backend), from what
(tool versions), how well it matched PyTorch (validation errors), and the checksum of every file,
which are checked on load so a truncated or swapped file is caught before it runs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sencache.runtime.cache.baselines import BaselineTables
from sencache.runtime.errors import BadInput
from sencache.runtime.families import FamilyAdapter, ModelPreset, Shapes, adapter_for
from sencache.runtime.files import sha256, write_atomic
from sencache.runtime.sensitivity import SensitivityTable

FORMAT = "sencache-bundle/1"
MANIFEST = "manifest.json"
SENSITIVITY = "sensitivity.json"
BASELINES = "baselines.json"
REQUIRED = ("format", "model", "family", "config", "shapes", "precision", "backend", "stages", "files",
            "scheduler", "defaults", "text_encoder")


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: Path, verify: bool = True) -> Bundle:
        """Read and check a bundle; every problem is a BadInput naming the bundle and the fault."""
        path = Path(path)
        if not path.is_dir():
            raise BadInput(f"no engine bundle at {path}: build one with `sencache build --model tiny-wan --out {path}`")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise BadInput(f"{path} is not an engine bundle: {MANIFEST} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"corrupt {MANIFEST} in {path}: {e}") from None
        if not isinstance(manifest, dict):
            raise BadInput(f"corrupt {MANIFEST} in {path}: not a JSON object")
        missing = [k for k in REQUIRED if k not in manifest]
        if missing:
            raise BadInput(f"corrupt {MANIFEST} in {path}: missing {', '.join(missing)}")
        if manifest["format"] != FORMAT:
            raise BadInput(f"{path}: bundle format {manifest['format']!r} is not {FORMAT!r}; rebuild it")
        bundle = cls(path, manifest)
        bundle.adapter  # unknown family is a BadInput
        if verify:
            bundle.verify_files()
        return bundle

    def verify_files(self) -> None:
        for name, info in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise BadInput(f"bundle {self.path}: file {name} is missing")
            if file.stat().st_size != info["bytes"] or sha256(file) != info["sha256"]:
                raise BadInput(f"bundle {self.path}: file {name} does not match its checksum in {MANIFEST}")

    @property
    def adapter(self) -> FamilyAdapter:
        return adapter_for(self.manifest["family"])

    @property
    def shapes(self) -> Shapes:
        s = self.manifest["shapes"]
        return Shapes(s["frames"], s["height"], s["width"], s["max_batch"])

    @property
    def preset(self) -> ModelPreset:
        """The model as built: the named preset with the bundle's config and shapes."""
        base = self.adapter.preset(self.manifest["model"])
        shapes = self.shapes
        return dataclasses.replace(base, config=self.manifest["config"], frames=shapes.frames,
                                   height=shapes.height, width=shapes.width)

    @property
    def sensitivity_path(self) -> Path:
        return self.path / SENSITIVITY

    def sensitivity(self) -> SensitivityTable:
        return SensitivityTable.load(self.sensitivity_path)

    def write_sensitivity(self, table: SensitivityTable) -> None:
        table.save(self.sensitivity_path)

    @property
    def baselines_path(self) -> Path:
        return self.path / BASELINES

    def baselines(self) -> BaselineTables:
        return BaselineTables.load(self.baselines_path)

    def write_baselines(self, tables: BaselineTables) -> None:
        tables.save(self.baselines_path)

    def adopt_tables(self, source: Bundle) -> SensitivityTable:
        """Take the sensitivity table (and baseline tables, if any) of another bundle of the same
        model and scheduler: an fp8 bundle takes its fp32 bundle's, because finite differences on
        the quantized model measure quantization noise (2-4x larger Jx, Jt on tiny-wan) and the
        rule then never reuses."""
        for key in ("model", "config", "scheduler"):
            if source.manifest[key] != self.manifest[key]:
                raise BadInput(f"bundle {source.path} differs from {self.path} in its {key}; tables only carry over "
                               f"between builds of the same model and scheduler")
        table = source.sensitivity()
        table.meta = {**table.meta, "adopted_from": str(source.path), "adopted_precision": source.manifest["precision"]}
        self.write_sensitivity(table)
        if source.baselines_path.is_file():
            self.write_baselines(source.baselines())
        return table

    def file(self, name: str) -> Path:
        return self.path / name


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Checksum every build product in `folder` into the manifest and write it (atomically).

    The calibration tables are left out: calibrating a bundle rewrites them."""
    files = {}
    mutable = {MANIFEST, SENSITIVITY, BASELINES}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in mutable):
        files[file.relative_to(folder).as_posix()] = {"bytes": file.stat().st_size, "sha256": sha256(file)}
    manifest = {**manifest, "format": FORMAT, "files": files}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
