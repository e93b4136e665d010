"""Memory a request needs, estimated from the bundle's shapes before anything is allocated."""

from __future__ import annotations

import math

import torch

from sencache.runtime.errors import BadInput
from sencache.runtime.manifest import BundleShapes


def request_bytes(shapes: BundleShapes, samples: int, branches: int) -> int:
    """An upper estimate of the loop's tensors for `samples` samples of `branches` CFG rows each:
    latents, anchors and solver state per sample; per row the head's streams, the blocks' output
    and the cached residual (float32)."""
    latent = math.prod(shapes.latent) * 4
    streams = sum(math.prod(s) for s in shapes.streams) * 4
    return samples * 8 * latent + samples * branches * (2 * latent + 4 * streams)


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
