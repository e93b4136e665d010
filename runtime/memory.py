"""Memory a request needs, and the peak of a process that runs a bundle, estimated from the
bundle's manifest before anything is allocated.

A process that runs a bundle holds: the interpreter with torch, ONNX Runtime and diffusers
(PROCESS_BYTES); the opened stages (`loaded_bytes`: ONNX Runtime's CPU provider holds an fp32
graph's weights once and an fp16 graph's with fp32 copies beside them, and each graph's session
keeps an arena of SESSION_BYTES once it has run); each request's loop tensors (`request_bytes`);
and the activations of the passes its rows run in (`pass_bytes`). The
guard of each request (`check_memory`) asks for its loop tensors and its rows' activations, since
the model is resident by then; `estimated_peak` is the whole, which the real-size report compares
with the measured peak RSS of `sencache generate` (benchmarks/results/real_size/memory.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sencache.runtime.errors import BadInput
from sencache.runtime.manifest import BundleShapes, Manifest

PROCESS_BYTES = 0.45e9
"""RSS of `sencache generate` before it opens a graph: the interpreter, torch, ONNX Runtime and
diffusers imported (0.35 GB measured) and ONNX Runtime's thread pools."""
SESSION_BYTES = 0.12e9
"""What each opened graph's session adds once it has run, beyond its weights (its arena): 0.23 and
0.37 GB measured for 3 and 4 graphs of Wan 1.3B's width at 9x128x128."""
LOADED_PER_BYTE = {"fp32": 1.05, "fp16": 3.0, "bf16": 3.0, "fp8": 1.05}
"""Host bytes of an opened ONNX Runtime CPU stage per byte of its files: fp32 weights once (1.05
measured: 0.39 GB for a 0.37 GB graph); fp16 (and bf16, which the CPU provider runs widened) with
an fp32 copy of each weight beside its own (1.66 GB RSS for a 0.43 GB fp16 bundle)."""
ACTIVATION_BYTES = 4
"""Bytes per activation value (the CPU provider computes in fp32)."""


def request_bytes(shapes: BundleShapes, samples: int, branches: int) -> int:
    """An upper estimate of the loop's tensors for `samples` samples of `branches` CFG rows each:
    latents, anchors, solver state and the noise injected since the anchor (sencache-online on a
    stochastic sampler) per sample; per row the head's streams, the blocks' output and the cached
    residual (float32)."""
    latent = math.prod(shapes.latent) * 4
    streams = sum(math.prod(s) for s in shapes.streams) * 4
    return samples * 9 * latent + samples * branches * (2 * latent + 4 * streams)


def pass_bytes(shapes: BundleShapes, config: dict[str, Any], rows: int) -> int:
    """Activations of `rows` rows in one pass through a block: the largest of its attention (the
    exported graphs materialise the scores and their softmax, heads x tokens x keys, for the
    video's own tokens and for the text) and its feed-forward (tokens x ffn width, twice), on top
    of the block's input, queries, keys, values and output (tokens x width, five times)."""
    tokens, width = shapes.streams[0][0], shapes.streams[0][-1]
    heads = int(config.get("num_attention_heads", 1))
    ffn = int(config.get("ffn_dim") or 4 * width)
    text = shapes.text[0]
    largest = max(2 * heads * tokens * tokens, 2 * heads * tokens * text, 2 * tokens * ffn)
    return rows * ACTIVATION_BYTES * (largest + 5 * tokens * width)


def loaded_bytes(manifest: Manifest) -> int:
    """Host bytes of the bundle's stages once opened and run: their files' bytes (graphs and
    external data) times what ONNX Runtime's CPU provider holds per byte in the bundle's precision,
    and each graph's session."""
    names = {file for stage in manifest.stages.values() for file in stage.files}
    stored = sum(e.bytes for n, e in manifest.files.items() if n in names or n.removesuffix(".data") in names)
    return int(stored * LOADED_PER_BYTE.get(manifest.precision, 1.0) + SESSION_BYTES * len(names))


def needed_bytes(manifest: Manifest, samples: int, branches: int) -> int:
    """What a request of `samples` samples and `branches` rows each needs beyond the loaded model."""
    shapes = manifest.shapes
    return request_bytes(shapes, samples, branches) + pass_bytes(shapes, manifest.config, samples * branches)


def estimated_peak(manifest: Manifest, samples: int, branches: int) -> int:
    """The peak RSS of a process that opens the bundle on ONNX Runtime's CPU provider and runs one
    such request."""
    return int(PROCESS_BYTES) + loaded_bytes(manifest) + needed_bytes(manifest, samples, branches)


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device` (MemAvailable on the host)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_memory(needed: int, device: torch.device) -> None:
    """BadInput before allocating when `device` cannot hold `needed` bytes."""
    free = available_bytes(device)
    if needed > free:
        raise BadInput(
            f"this request needs about {needed / 2**30:.1f} GiB on {device} and {free / 2**30:.1f} GiB "
            f"is free: use fewer samples"
        )
