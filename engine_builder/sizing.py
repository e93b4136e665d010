"""What a real-size dummy build chooses for itself: precision, block grouping and resolution.

Decided from the model's parameter count (counted on the `meta` device, no memory) and the memory
this machine has available, so that `build --model cogvideox --load-format dummy` with no other
flag fits a 24 GB machine; every explicit flag overrides its part of the choice.

- Precision: fp32 when the model's fp32 weights take at most WEIGHTS_SHARE of the available memory
  (whatever runs the bundle holds every weight at once, so a bundle whose fp32 weights crowd the
  machine is built in fp16, half the bytes on disk and on a GPU); fp16 otherwise.
- Grouping: one ONNX graph when the build's estimated peak fits BUILD_SHARE of the available memory;
  otherwise the blocks are streamed in the fewest even groups whose estimate fits (engine_builder/
  streaming.py holds one group, with the head and the tail, at a time).
- Resolution: REDUCED unless frames, height or width is given: every stage is validated against
  PyTorch on the CPU, which at a model's own resolution would take hours.

The estimate is linear in the parameters held at once, BUILD_BASE + BUILD_BYTES_PER_PARAMETER per
parameter: the upper line of the peak RSS of the measured builds (`/usr/bin/time -v`), fp32 and fp16,
one graph and streamed: CogVideoX 1.5 at its true width with 2 blocks, 4.96 GB fp32 and 4.18 GB fp16
for 0.28 B parameters, 3.39 GB fp32 streamed one block at a time (0.15 B held); Wan 1.3B fp16 in one
graph, 17.1 GB for 1.42 B; LTX-Video, CogVideoX 1.5-5B and 4 blocks of Wan 14B fp16 streamed, 8.6,
12.3 and 12.1 GB for 0.51, 0.81 and 0.94 B held (benchmarks/results/real_size/report.md); the
README's command as chosen here (CogVideoX 1.5-5B fp16 in 7 groups of 6) peaked at 12.1 GB against
13.0 GB estimated. A build
holds the fp32 weights (and an fp16 copy), the exporter's copy and ONNX Runtime's session, which
widens fp16 weights to fp32: about the same bytes per parameter in both precisions.

An fp8 build also quantizes its blocks graphs with ModelOpt (engine_builder/fp8.py), one group at a
time after the export, each in a process of its own; that process's peak is its own line in the
blocks quantized at once, FP8_QUANTIZE_BASE + FP8_QUANTIZE_BYTES_PER_PARAMETER per parameter of the
group's blocks, held beside the build's own BUILD_BASE, and the group is the fewest even ones whose
larger peak, export or quantization, fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from accelerate import init_empty_weights

from sencache.engine_builder.dummy import LAYERS_KEY, block_list_name
from sencache.runtime.errors import BadInput
from sencache.runtime.families import FamilyAdapter

WEIGHTS_SHARE = 0.5
"""fp32 when the fp32 weights take at most this share of the available memory."""
BUILD_SHARE = 0.8
"""The share of the available memory a build's estimated peak may take."""
BUILD_BASE = 1.6e9
"""Bytes of a build's peak that do not grow with the weights (interpreter, torch, ONNX, activations at
the reduced resolution)."""
BUILD_BYTES_PER_PARAMETER = 14.0
"""Peak bytes of a build per parameter held at once, fp32 or fp16."""
FP8_QUANTIZE_BASE = 0.087e9
FP8_QUANTIZE_BYTES_PER_PARAMETER = 55.1
"""The FP8 quantizer's peak RSS: the line through its measured points (benchmarks/results/real_size/
fp8_memory.json, `python -m sencache.benchmarks.fp8_memory`: 1 and 3 blocks of Wan 2.1 1.3B, 2.65
and 7.76 GB, 2.56 GB per block of 46.4 M parameters), fp32 graphs at 5x64x64 calibrated on 50 rows;
the graph's fp32 weights are 4 of those bytes per parameter."""
STREAMABLE = ("fp32", "fp16", "fp8")
"""The precisions a streamed build takes (engine_builder/streaming.py; fp8 quantizes each group)."""
REDUCED = (9, 128, 128)
"""Frames, height and width of a dummy build when none is given (Wan: 3x16x16 latent, 192 tokens;
the text keeps its real length)."""


@dataclass(frozen=True)
class ModelSize:
    """A transformer's parameters: `blocks` blocks of `per_block` each, and `other` outside them."""

    blocks: int
    per_block: int
    other: int

    @property
    def total(self) -> int:
        return self.other + self.blocks * self.per_block

    def held(self, group: int | None) -> int:
        """Parameters in memory at once: the whole model, or a streamed group with the head and tail."""
        return self.total if group is None else self.other + group * self.per_block


def model_size(adapter: FamilyAdapter, config: dict[str, Any]) -> ModelSize:
    """The parameter counts of the family's transformer with `config`, counted on `meta`."""
    with init_empty_weights(include_buffers=False):
        transformer = adapter.transformer_class()(**config)
    blocks = getattr(transformer, block_list_name(transformer, config[LAYERS_KEY]))
    total = sum(p.numel() for p in transformer.parameters())
    per_block = sum(p.numel() for p in blocks[0].parameters())
    return ModelSize(len(blocks), per_block, total - len(blocks) * per_block)


def estimated_peak(parameters: int) -> int:
    """The build's estimated peak RSS in bytes with `parameters` held at once."""
    return int(BUILD_BASE + BUILD_BYTES_PER_PARAMETER * parameters)


def quantize_peak(blocks_parameters: int) -> int:
    """The FP8 quantizer's estimated peak RSS in bytes on a blocks graph of `blocks_parameters`."""
    return int(FP8_QUANTIZE_BASE + FP8_QUANTIZE_BYTES_PER_PARAMETER * blocks_parameters)


def build_peak(size: ModelSize, precision: str, group: int | None) -> int:
    """The estimated peak RSS of a build of `size` in `precision`, `group` blocks per graph (None:
    one graph): the export's, and for fp8 the quantizer's process beside the build's if larger."""
    peak = estimated_peak(size.held(group))
    if precision == "fp8":
        peak = max(peak, int(BUILD_BASE) + quantize_peak((size.blocks if group is None else group) * size.per_block))
    return peak


@dataclass(frozen=True)
class Sizing:
    """A build's precision and grouping, what they were chosen from and which of them was automatic."""

    precision: str
    group_blocks: int | None
    """Blocks per ONNX graph in a streamed build; None: one graph."""
    resolution: tuple[int, int, int]
    size: ModelSize
    available: int
    estimated_peak: int
    automatic: tuple[str, ...]
    """The choices made here ("precision", "group_blocks", "resolution"), not by a flag."""

    def line(self) -> str:
        """The choice in one line, as the build prints it."""
        groups = (
            "one graph"
            if self.group_blocks is None
            else f"streamed in {math.ceil(self.size.blocks / self.group_blocks)} groups of {self.group_blocks} blocks"
        )
        auto = ", ".join(self.automatic) or "nothing"
        frames, height, width = self.resolution
        return (
            f"real-size build: {self.size.total / 1e9:.2f} B parameters, {self.available / 2**30:.1f} GiB available "
            f"-> {self.precision}, {groups}, estimated peak {self.estimated_peak / 2**30:.1f} GiB; validated at "
            f"{frames}x{height}x{width} (frames x height x width); chosen automatically: {auto}"
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest's record of the choice."""
        return {
            "precision": self.precision,
            "group_blocks": self.group_blocks,
            "resolution": list(self.resolution),
            "parameters": self.size.total,
            "parameters_per_block": self.size.per_block,
            "available_bytes": self.available,
            "estimated_peak_bytes": self.estimated_peak,
            "automatic": list(self.automatic),
        }


def choose(
    size: ModelSize,
    available: int,
    precision: str | None,
    group_blocks: int | None,
    resolution: tuple[int, int, int] | None,
    streamable: bool = True,
) -> Sizing:
    """The build's sizing: `precision`, `group_blocks` (0: one graph) and `resolution` as given, the
    ones that are None chosen from `size` and `available` bytes (see the module's docstring).
    `streamable`: the build's target can stream groups. BadInput when even one block per group
    would not fit."""
    automatic = tuple(
        name
        for name, value in (("precision", precision), ("group_blocks", group_blocks), ("resolution", resolution))
        if value is None
    )
    if precision is None:
        precision = "fp32" if 4 * size.total <= WEIGHTS_SHARE * available else "fp16"
    budget = BUILD_SHARE * available
    group = None if group_blocks == 0 else group_blocks
    if group_blocks is None and streamable and precision in STREAMABLE:
        group = _group(size, precision, budget)
    return Sizing(
        precision,
        group,
        REDUCED if resolution is None else resolution,
        size,
        available,
        build_peak(size, precision, group),
        automatic,
    )


def _group(size: ModelSize, precision: str, budget: float) -> int | None:
    """None when the whole model fits `budget` as one graph, else the size of the fewest even groups
    that fit; BadInput when one block per group does not."""
    if build_peak(size, precision, None) <= budget:
        return None
    fitting = [g for g in range(1, size.blocks + 1) if build_peak(size, precision, g) <= budget]
    if not fitting:
        raise BadInput(
            f"even one block per group needs about {build_peak(size, precision, 1) / 2**30:.1f} GiB, over "
            f"{BUILD_SHARE:.0%} of the {budget / BUILD_SHARE / 2**30:.1f} GiB available: free memory or build on a "
            f"larger machine"
        )
    groups = math.ceil(size.blocks / max(fitting))
    return math.ceil(size.blocks / groups)
