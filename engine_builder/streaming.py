"""A streamed build: the blocks in groups, one ONNX graph per group, one group in memory at a time.

For models whose weights do not fit the build machine twice (CogVideoX 5B in fp32 is 22 GB, Wan
14B in fp16 is 28 GB): each group's transformer holds the head, the tail and only that group's
blocks (dummy weights are drawn by name, so a group's blocks are the model's), is exported,
validated against PyTorch on the head's outputs of fresh inputs, and freed before the next group
is drawn. The bundle's blocks stage lists the groups' graphs (`file` and `parts`), which ONNX
Runtime runs in turn (TensorRT: the engine compiled from each). The chain head -> blocks -> tail
against fp32 is not measured: it would need every group at once; each group is validated alone (an
fp8 build then quantizes the groups one at a time, engine_builder/fp8.py).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from sencache.console.output import progress, third_party_output
from sencache.engine_builder.dummy import LAYERS_KEY
from sencache.engine_builder.onnx_export import export_stage
from sencache.runtime.backends.base import part_name
from sencache.runtime.families import ModelPreset
from sencache.runtime.manifest import max_rows

if TYPE_CHECKING:
    from sencache.engine_builder.builder import BuildPlan, LoadedModel

Log = Callable[[str], None]
LoadGroup = Callable[[int, int], "LoadedModel"]
"""(first block, blocks) -> the transformer of that group, in fp32 and in the build's precision."""


def group_file(index: int, extension: str = "onnx") -> str:
    """The file of group `index` (the first is the blocks stage's own `blocks.onnx`); `extension`:
    `engine` for the TensorRT engine compiled from it."""
    return f"{part_name('blocks', index)}.{extension}"


def write_streamed(
    plan: BuildPlan, folder: Path, log: Log, load_group: LoadGroup
) -> tuple[ModelPreset, dict[str, Any], int]:
    """Export and validate head, every group of blocks and tail into `folder`; returns the preset
    with the transformer's config, the validation record and the number of groups."""
    layers, size = plan.preset.config[LAYERS_KEY], plan.options.group_blocks
    assert size is not None, "BuildOptions.check admits a streamed build only with group_blocks"
    groups = [(first, min(size, layers - first)) for first in range(0, layers, size)]
    log(
        f"drawing dummy weights for {plan.preset.name} ({layers} blocks in {len(groups)} groups of at most "
        f"{size}, seed {plan.options.seed}): RANDOM weights, for engineering and speed checks only"
    )
    rows = max_rows(plan.shapes.max_batch)
    validation: dict[str, Any] = {"blocks_groups": []}
    preset = plan.preset
    for index, (first, count) in enumerate(progress(groups, desc="stream groups", unit="group")):
        model = load_group(first, count)
        preset = model.preset
        example = model.stage_inputs(batch=2, seed=0)
        fresh = model.stage_inputs(batch=min(3, rows), seed=1)
        stages = [("head", "head.onnx")] if index == 0 else []
        stages.append(("blocks", group_file(index)))
        if index == len(groups) - 1:
            stages.append(("tail", "tail.onnx"))
        for name, file in stages:
            with third_party_output("the ONNX exporter"):
                export_stage(model.stages[name], model.specs[name], example, folder / file, rows)
            error = plan.precision.validate(model, name, model.specs[name], fresh, folder / file)
            if name == "blocks":
                validation["blocks_groups"].append({"blocks": [first, first + count], **error})
            else:
                validation[name] = error
            with tqdm.external_write_mode():
                log(f"  {file}: max abs {error['max_abs']:.2e}, relative L2 {error['rel_l2']:.2e}")
        del model, example, fresh
        gc.collect()
    groups_checked = validation["blocks_groups"]
    validation["blocks"] = {
        "max_abs": max(g["max_abs"] for g in groups_checked),
        "rel_l2": max(g["rel_l2"] for g in groups_checked),
        "checked": "the worst group, each on the head's outputs of fresh inputs",
    }
    validation["chain_vs_fp32"] = {"not_measured": "a streamed build holds one group at a time"}
    return preset, validation, len(groups)
