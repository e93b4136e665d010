"""A diffusers-format weights folder, checked on its file names alone.

`sencache build --weights DIR` reads the transformer from DIR; before any model code is imported
or any model constructed, the folder must exist and hold a transformer config and weight files, so
a wrong path stops at once with one line (the class named in the config is checked when the
family's transformer class is at hand, `families.parts.build_transformer`)."""

from __future__ import annotations

from pathlib import Path

from sencache.runtime.errors import BadInput


def transformer_folder(weights: Path, name: str = "transformer") -> Path:
    """The folder with the transformer's `config.json` and weight files in `weights` (its `name`
    subfolder, `transformer/` or a second expert's `transformer_2/`, or `weights` itself); BadInput
    about `weights` when there is none."""
    folder = Path(weights)
    if not folder.is_dir():
        raise BadInput(f"weights {folder}: no such folder", param="weights")
    sub = folder / name if (folder / name).is_dir() else folder
    if not (sub / "config.json").is_file():
        raise BadInput(f"weights {folder}: no {name}/config.json (expected a diffusers-format folder)", param="weights")
    if not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
        raise BadInput(f"weights {folder}: no weight files (*.safetensors) in {sub}", param="weights")
    return sub
