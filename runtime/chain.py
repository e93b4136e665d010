"""The one runner of the head -> blocks -> tail chain, over any way of running a stage.

`run(stage, feeds)` runs one stage on named tensors and returns its outputs by name: a backend's
`run`, ONNX Runtime sessions on exported files, or the PyTorch stage modules (`module_runner`).
The engine's rows carry classifier-free guidance as [cond x batch, uncond x batch] (`cfg_rows`).
The step engine runs the blocks on gathered sub-batches itself and uses the feeds built here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sencache.runtime.families.base import NOISE, StageLayout

Run = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class ChainOutputs:
    head: dict[str, torch.Tensor]
    """The head's outputs by name."""
    streams: dict[str, torch.Tensor]
    """Each stream after the blocks, by stream name."""
    noise: torch.Tensor
    """The tail's noise prediction."""


def cfg_rows(latents: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Engine rows: the batch, then (with CFG) the same latents with the unconditional text."""
    if uncond is None:
        return {"latent": latents, "text": text}
    return {"latent": torch.cat([latents, latents]), "text": torch.cat([text, uncond])}


def blocks_feeds(layout: StageLayout, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The blocks stage's inputs, from the head's outputs."""
    return {k: head[k] for k in layout.blocks_inputs}


def block_streams(layout: StageLayout, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The blocks stage's outputs by stream name."""
    return {s: out[s + "_out"] for s in layout.streams}


def tail_feeds(
    layout: StageLayout, streams: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tail stage's inputs: the streams it reads after the blocks and the head's context."""
    return {**{s: streams[s] for s in layout.tail_stream_names}, **{k: head[k] for k in layout.tail_context}}


def run_chain(run: Run, layout: StageLayout, inputs: dict[str, torch.Tensor]) -> ChainOutputs:
    """head(latent, timestep, text) -> blocks -> tail on every row of `inputs`."""
    head = run("head", inputs)
    streams = block_streams(layout, run("blocks", blocks_feeds(layout, head)))
    return ChainOutputs(head, streams, run("tail", tail_feeds(layout, streams, head))[NOISE])


def module_runner(stages: dict[str, nn.Module], layout: StageLayout) -> Run:
    """The PyTorch stage modules (from the family adapter's split) as a `run` callable."""
    io = layout.stage_io

    def run(stage: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = stages[stage](**feeds)
        return dict(zip(io[stage][1], out if isinstance(out, tuple) else (out,), strict=True))

    return run


def guide(noise: torch.Tensor, batch: int, cfg: bool, guidance: float) -> torch.Tensor:
    """Classifier-free guidance over rows [cond x batch, uncond x batch] (or the rows as they are)."""
    if not cfg:
        return noise
    cond, uncond = noise[:batch], noise[batch:]
    return uncond + guidance * (cond - uncond)
