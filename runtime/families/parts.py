"""What every family builds the same way from its adapter's hooks: the diffusers transformer and
scheduler, diffusers' own pipeline and its components, example head inputs, and decoded frames.

Functions of the adapter rather than its methods: a family changes them only through its hooks
(`transformer_class`, `pipeline_class`, `scheduler_config`, `latent_shape`, `text_shape`,
`tiny_format`, `decode_real`), so the contract a new family fills in stays short.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sencache.runtime.errors import BadInput
from sencache.runtime.experts import weights_folder
from sencache.runtime.families.base import FamilyAdapter, ModelPreset, Shapes
from sencache.runtime.manifest import scheduler_class
from sencache.runtime.weights import transformer_folder


def check_weights(preset: ModelPreset, weights: Path | None) -> Path | None:
    """The transformer folder of `weights` for `preset` (None: none given, for a tiny model); BadInput
    about `weights` when a real model has none or the folder holds no diffusers transformer (of
    every expert). File names only: the builder calls it before it constructs anything."""
    if weights is not None:
        for expert in range(1, preset.experts):
            if not (Path(weights) / weights_folder(expert)).is_dir():
                raise BadInput(
                    f"weights {weights}: {preset.name} has {preset.experts} experts; no {weights_folder(expert)}/",
                    param="weights",
                )
            transformer_folder(weights, weights_folder(expert))
        return transformer_folder(weights)
    if not preset.tiny:
        source = preset.description.split(" ")[0]
        raise BadInput(
            f"weights must name a folder: {preset.name} needs a local copy of {source} in diffusers "
            f"format (transformer/config.json and transformer/*.safetensors to build; model_index.json, "
            f"tokenizer/, text_encoder/, vae/ and scheduler/ too to generate); nothing is downloaded",
            param="weights",
        )
    return None


def build_transformer(
    adapter: FamilyAdapter,
    preset: ModelPreset,
    weights: Path | None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    expert: int = 0,
) -> nn.Module:
    """Construct the family's diffusers transformer (of `expert`, in a model of several); load
    weights from a diffusers folder when given, in `dtype` (a lower one keeps the modules diffusers
    keeps in fp32, as its `from_pretrained` does).

    On `device="meta"` no memory is allocated (shape planning). A real model without
    weights is an error that says what to pass.
    """
    cls = adapter.transformer_class()
    if weights is None:
        if device != "meta":
            check_weights(preset, None)
        with torch.device(device):
            return cls(**preset.config).eval()
    folder = Path(weights)
    sub = transformer_folder(folder, weights_folder(expert))
    config = json.loads((sub / "config.json").read_text())
    if config.get("_class_name") not in (None, cls.__name__):
        raise BadInput(f"weights {folder}: holds a {config['_class_name']}, not a {cls.__name__}", param="weights")
    try:
        model = cls.from_pretrained(str(sub), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise BadInput(f"weights {folder}: cannot load {cls.__name__}: {e}".splitlines()[0], param="weights") from None
    return (model.float() if dtype == torch.float32 else model).eval()


def make_scheduler(adapter: FamilyAdapter, preset: ModelPreset, config: dict[str, Any] | None = None):
    """A fresh diffusers scheduler, from the bundle's stored config or the family's for `preset`."""
    config = dict(config or adapter.scheduler_config(preset))
    cls = scheduler_class(config)
    config.pop("_class_name")
    return cls.from_config(config)


def example_inputs(
    adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes, batch: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random head inputs of the right shapes and dtypes, for export and validation."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn((batch, *adapter.latent_shape(preset, shapes)), generator=g)
    timestep = torch.rand(batch, generator=g) * 1000.0
    text = torch.randn((batch, *adapter.text_shape(preset)), generator=g)
    condition_shapes = adapter.condition_shapes(preset, shapes)
    conditions = {k: torch.randn((batch, *condition_shapes[k]), generator=g) for k in adapter.layout.conditions}
    return {"latent": latent, "timestep": timestep, "text": text, **conditions}


def diffusers_pipeline(adapter: FamilyAdapter, transformer: nn.Module | None, scheduler, vae: nn.Module | None = None):
    """diffusers' own pipeline of the family around `transformer`, without text encoder (it takes
    prompt embeddings): the reference our loop must match, and with `vae` the reference decoder."""
    return adapter.pipeline_class()(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler
    )


def load_components(adapter: FamilyAdapter, folder: Path):
    """The real model's tokenizer, text encoder and VAE, loaded by diffusers' own pipeline class
    from a diffusers-format folder (no transformer: the denoising loop is ours). Nothing is
    downloaded; parts the folder lacks stay None and fail clearly when used."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise BadInput(
            f"weights {folder}: no model_index.json; text encoding and decoding need the whole "
            f"diffusers folder (model_index.json, tokenizer/, text_encoder/, vae/, scheduler/)",
            param="weights",
        )
    parts = ("tokenizer", "text_encoder", "vae", *adapter.image_components)
    absent = {part: None for part in parts if not (folder / part).is_dir()}
    if (folder / weights_folder(1)).is_dir():  # a second expert's transformer: ours too
        absent[weights_folder(1)] = None
    try:
        return adapter.pipeline_class().from_pretrained(
            str(folder), transformer=None, local_files_only=True, dtype=torch.float32, **absent
        )
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise BadInput(
            f"weights {folder}: diffusers cannot load the pipeline components: {str(e).splitlines()[0]}",
            param="weights",
        ) from None


def decode(
    adapter: FamilyAdapter, latents: np.ndarray, preset: ModelPreset, shapes: Shapes, pipeline=None
) -> np.ndarray:
    """Latents [B, ...] to frames [B, T, H, W, 3] float32 in [0, 1]: a tiny model's latents are
    its RGB clips; a real model's go through the pipeline's VAE as the pipeline decodes them."""
    if preset.tiny:
        return adapter.tiny_format.frames(latents, shapes)
    if pipeline is None or pipeline.vae is None:
        raise BadInput(f"{preset.name}: decoding needs the VAE: the weights folder has no vae/")
    with torch.no_grad():
        video = adapter.decode_real(torch.from_numpy(latents), pipeline, preset, shapes)
    return np.asarray(pipeline.video_processor.postprocess_video(video, output_type="np"), np.float32)
