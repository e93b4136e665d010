"""Models of several experts (Wan 2.2 A14B): which expert denoises which timestep, and the names
its stages, weights and calibration tables take in a bundle.

A two-expert model runs its first (high-noise) expert at timesteps t >= boundary and its second
(low-noise) expert below, as diffusers' WanPipeline picks `transformer` or `transformer_2`. Each
expert is a whole transformer: its own head, blocks and tail stages. The engine chooses the expert
per row by the row's timestep, so rows of both experts share a pass, each expert running its own
sub-batch (`run_routed`). A one-expert model is expert 0 everywhere and its names are the plain ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the manifest reads the names here before any model code is loaded
    import torch

Run = Callable[[str, "dict[str, torch.Tensor]"], "dict[str, torch.Tensor]"]


def stage_name(stage: str, expert: int) -> str:
    """The name of `stage` ("head", "blocks", "tail") of `expert` in a bundle: plain for the first,
    `blocks_2` for the second."""
    return stage if expert == 0 else f"{stage}_{expert + 1}"


def weights_folder(expert: int) -> str:
    """The diffusers folder of `expert`'s transformer, as WanPipeline saves it."""
    return "transformer" if expert == 0 else f"transformer_{expert + 1}"


def table_name(name: str, expert: int) -> str:
    """The file of `expert`'s calibration table `name` (`sensitivity.json` -> `sensitivity_2.json`)."""
    if expert == 0:
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}_{expert + 1}{dot}{suffix}"


def expert_of(t: float, boundary: float | None) -> int:
    """The expert that denoises timestep `t`: 0 at or above `boundary` (or with none), else 1."""
    return 0 if boundary is None or t >= boundary else 1


def experts_of(timesteps: Sequence[float] | np.ndarray, boundary: float | None) -> list[int]:
    """The expert of each timestep."""
    return [expert_of(float(t), boundary) for t in timesteps]


def segments(experts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, first step, end step) of each run of consecutive steps of one expert."""
    out: list[tuple[int, int, int]] = []
    for step, expert in enumerate(experts):
        if out and out[-1][0] == expert:
            out[-1] = (expert, out[-1][1], step + 1)
        else:
            out.append((expert, step, step + 1))
    return out


def run_routed(
    run: Run, stage: str, feeds: dict[str, torch.Tensor], experts: np.ndarray, shared: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """`stage` on the rows of `feeds`, each row by its expert (`experts`, one per row): one call when
    every row has the same expert, else one call per expert on its sub-batch, the outputs put back in
    row order. `shared` inputs and outputs carry no batch dimension (rotary tables): fed whole and
    taken from the first call."""
    import torch

    present = np.unique(experts)
    if len(present) <= 1:
        return run(stage_name(stage, int(present[0]) if len(present) else 0), feeds)
    device = next(v.device for v in feeds.values())
    merged: dict[str, torch.Tensor] = {}
    for expert in present:
        rows = np.flatnonzero(experts == expert)
        index = torch.from_numpy(rows.astype(np.int64)).to(device)
        part = {k: v if k in shared else v.index_select(0, index) for k, v in feeds.items()}
        out = run(stage_name(stage, int(expert)), part)
        for name, value in out.items():
            if name in shared:
                merged.setdefault(name, value)
                continue
            if name not in merged:
                merged[name] = value.new_empty((len(experts), *value.shape[1:]))
            merged[name].index_copy_(0, index, value)
    return merged
