"""The bytes one pass of the engine moves between its ranks, by kind, as exact formulas of the
model's widths and sequence length (issue 22), and the communication share they project on a
GPU interconnect. Pure: no torch.distributed; benchmarks/parallel.py checks every formula against
the collectives a run on gloo ranks issues, then uses them to scale to real models.

Bytes are the payload each rank hands its collective (the input tensor: what torch.profiler's
record of the collective and the rank group's counters report). What leaves the rank on the wire
is that payload times `WIRE` for the collective's kind, with the algorithms NCCL and gloo use:
an all-to-all keeps 1/n of its input, an all-gather sends its input to the n - 1 others, a ring
all-reduce sends 2 (n - 1) / n of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sencache.runtime.families import resolve
from sencache.runtime.families.base import Shapes

KINDS = ("attention", "tokens", "branches", "decision", "boundary")
"""Attention all-to-all (and CogVideoX's text all-gather), the tail streams' token gather over
the sp ranks, the branch exchange over the cfg ranks, the decision all-reduce, the boundary."""


@dataclass(frozen=True)
class Widths:
    """What a pass's traffic depends on, for one model at one video size."""

    model: str
    tokens: int
    """Video tokens of one row (the sequence length sequence parallelism splits)."""
    text_tokens: int
    """Text tokens inside self-attention (CogVideoX's joint attention); 0 where it sees video alone."""
    heads: int
    head_dim: int
    blocks: int
    tail_width: int
    """Channels per token of the streams the tail reads (gathered over the sp ranks)."""
    latent: int
    """Elements of one sample's latent (the tail's output, exchanged between the branches)."""

    @property
    def width(self) -> int:
        """The attention's inner width, heads x head_dim."""
        return self.heads * self.head_dim


def widths(model: str, frames: int | None = None, height: int | None = None, width: int | None = None) -> Widths:
    """The widths of `model` (a preset name) at its preset video size unless one is given."""
    adapter, preset = resolve(model)
    shapes = Shapes(frames or preset.frames, height or preset.height, width or preset.width, 1)
    latent = adapter.latent_shape(preset, shapes)
    config = preset.config
    if adapter.family == "wan":
        _, f, h, w = latent
        p_t, p_h, p_w = config["patch_size"]
        tokens, text = (f // p_t) * (h // p_h) * (w // p_w), 0
    elif adapter.family == "cogvideox":
        f, _, h, w = latent
        p, p_t = config["patch_size"], config.get("patch_size_t") or 1
        tokens, text = (f // p_t) * (h // p) * (w // p), adapter.text_shape(preset)[0]
    else:
        raise ValueError(f"model: no traffic formula for the {adapter.family} family (wan and cogvideox have one)")
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    return Widths(model, tokens, text, heads, head_dim, config["num_layers"], heads * head_dim, math.prod(latent))


def attention_bytes(w: Widths, rows: int, sp: int, element: int) -> dict[str, int]:
    """One pass's attention payload on one rank that runs `rows` rows through the blocks, by
    collective: per block, Ulysses' four all-to-alls (queries, keys, values to the heads' rank, the
    output back), each of the rank's tokens at every head; with joint text (CogVideoX), the
    all-gather of the text's output at the rank's heads."""
    if sp == 1:
        return {"all_to_all": 0, "all_gather": 0}
    scale = w.blocks * rows * element
    return {
        "all_to_all": scale * 4 * (w.tokens // sp) * w.width,
        "all_gather": scale * w.text_tokens * (w.heads // sp) * w.head_dim,
    }


def token_bytes(w: Widths, rows: int, sp: int, element: int) -> int:
    """The tail streams' token gather on one rank that holds `rows` rows (its tokens of each)."""
    return 0 if sp == 1 else rows * (w.tokens // sp) * w.tail_width * element


def branch_bytes(w: Widths, rows: int, cfg: int) -> int:
    """The branch exchange on one rank: the tail's float32 output of the larger branch's `rows`."""
    return 0 if cfg == 1 else rows * w.latent * 4


def decision_bytes(values: int) -> int:
    """The decision all-reduce: one float64 per measured value (a sample's drift, and each more
    statistic its rule reads) of every request of the pass."""
    return 8 * values


WIRE = {
    "all_to_all": lambda n: (n - 1) / n,
    "all_gather": lambda n: float(n - 1),
    "all_reduce": lambda n: 2 * (n - 1) / n,
}
"""Bytes a rank sends over the wire per byte of its payload, by collective, for n ranks."""


@dataclass(frozen=True)
class Link:
    """A GPU interconnect as its vendor publishes it."""

    name: str
    bytes_per_s: float
    """One direction, per GPU."""
    source: str


NVLINK4 = Link(
    "NVLink 4 (H100/H200 SXM)",
    450e9,
    "NVIDIA H100 and H200 Tensor Core GPU datasheets: NVLink 900 GB/s per GPU (total, both directions; "
    "18 links x 50 GB/s), so 450 GB/s each way",
)


@dataclass(frozen=True)
class Accelerator:
    """A GPU's published dense peak and the share of it a pass is assumed to reach."""

    name: str
    peak_flops: float
    mfu: float
    source: str


H100_BF16 = Accelerator(
    "H100/H200 SXM, BF16 dense",
    989e12,
    0.4,
    "NVIDIA H100 datasheet: 1,979 TFLOPS BF16 with sparsity, 989 dense (H200: the same compute); "
    "MFU 0.4 is an assumption, not a measurement",
)


def wire_bytes(w: Widths, sp: int, cfg: int, samples: int, element: int) -> dict[str, float]:
    """Bytes one rank sends over the wire in one pass of `samples` guided samples (2 rows each)
    that all run the blocks, with activations of `element` bytes, on sp x cfg ranks."""
    rows = samples * 2 // cfg
    attention = attention_bytes(w, rows, sp, element)
    return {
        "attention": sum(v * WIRE[k](sp) for k, v in attention.items()),
        "tokens": token_bytes(w, rows, sp, element) * WIRE["all_gather"](sp),
        "branches": branch_bytes(w, rows, cfg) * WIRE["all_gather"](cfg),
        "decision": decision_bytes(samples) * WIRE["all_reduce"](sp * cfg),
    }


def projection(
    w: Widths, sp: int, cfg: int, samples: int, element: int, flops: dict[str, float], link: Link, gpu: Accelerator
) -> dict[str, float]:
    """The communication share of one pass on sp x cfg GPUs: each kind's wire bytes over the
    link's one-way bandwidth, against the pass's compute on one GPU at the accelerator's assumed
    MFU, from the FLOPs of one row's head, blocks and tail (benchmarks/flops.py): each GPU runs its
    rows' head and tail whole and 1/sp of their blocks. Collectives are taken as not overlapping
    compute (Ulysses' all-to-alls sit between the projections and attention)."""
    rows = samples * 2 // cfg
    sent = wire_bytes(w, sp, cfg, samples, element)
    comm_s = sum(sent.values()) / link.bytes_per_s
    compute_s = rows * (flops["head"] + flops["tail"] + flops["blocks"] / sp) / (gpu.peak_flops * gpu.mfu)
    return {
        **{f"{k}_bytes": v for k, v in sent.items()},
        "comm_s": comm_s,
        "compute_s": compute_s,
        "comm_share": comm_s / (comm_s + compute_s),
    }
