"""Dummy weights: a real preset's transformer at its true shapes with deterministic random weights.

Like vLLM's `--load-format dummy`, for what does not depend on the weights: export, memory, bundle
size, load time and speed. The transformer is constructed with its parameters on the `meta` device
(no memory; buffers such as rotary tables are computed for real) and then materialised one
parameter at a time, so the process never holds more than the finished model plus one tensor.
Each value is a function of the seed and the parameter's name alone: the same seed gives the same
weights in every precision and whatever the number of blocks, so a fp32 reference of a fp16 build
is drawn again rather than copied.

The draw keeps activations bounded through every block: matrices and convolutions N(0, 1/fan_in),
norm and other 1-D scales 1, biases 0, other tables N(0, 1/last dimension).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from sencache.runtime.errors import BadInput
from sencache.runtime.families import FamilyAdapter, ModelPreset

LAYERS_KEY = "num_layers"
"""The config key of the number of transformer blocks (every registered family's diffusers class)."""


def dummy_config(preset: ModelPreset, layers: int | None) -> dict[str, Any]:
    """The preset's config, with `layers` blocks instead of its own when given (engineering checks
    at the true width); BadInput when the preset has no such key or `layers` is out of range."""
    config = dict(preset.config)
    if layers is None:
        return config
    if LAYERS_KEY not in config:
        raise BadInput(f"layers: {preset.name} has no {LAYERS_KEY} in its config", param="layers")
    if not 1 <= layers <= config[LAYERS_KEY]:
        raise BadInput(f"layers must be in [1, {config[LAYERS_KEY]}] for {preset.name}, got {layers}", param="layers")
    config[LAYERS_KEY] = layers
    return config


def dummy_transformer(
    adapter: FamilyAdapter,
    config: dict[str, Any],
    seed: int,
    dtype: torch.dtype = torch.float32,
    first_block: int = 0,
) -> nn.Module:
    """The family's transformer with `config` and random weights drawn from `seed`, in `dtype`
    except the modules diffusers keeps in fp32 (as `from_pretrained(torch_dtype=...)` loads them).
    With `first_block`, its blocks are the model's blocks from that one on (a streamed build's
    group: block j is drawn as block first_block + j)."""
    with init_empty_weights(include_buffers=False):
        transformer = adapter.transformer_class()(**config)
    keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or [])
    blocks = block_list_name(transformer, config[LAYERS_KEY])
    for name, module in transformer.named_modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{name}.{key}" if name else key
            kept = any(part in keep for part in full.split("."))
            value = draw(_shifted(full, blocks, first_block), tuple(param.shape), seed)
            module._parameters[key] = nn.Parameter(value.to(torch.float32 if kept else dtype), requires_grad=False)
    return transformer.eval()


def block_list_name(transformer: nn.Module, layers: int) -> str:
    """The name of the transformer's list of `layers` blocks (`blocks`, `transformer_blocks`)."""
    lists = [name for name, child in transformer.named_children() if isinstance(child, nn.ModuleList)]
    found = [name for name in lists if len(getattr(transformer, name)) == layers]
    if len(found) != 1:
        raise ValueError(f"{type(transformer).__name__}: no single list of {layers} blocks among {lists}")
    return found[0]


def _shifted(name: str, blocks: str, first_block: int) -> str:
    """`name` with its block index moved on by `first_block` (other names unchanged)."""
    head, _, rest = name.partition(".")
    if head != blocks or not first_block:
        return name
    index, _, leaf = rest.partition(".")
    return f"{blocks}.{int(index) + first_block}.{leaf}"


def draw(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fp32 value of parameter `name` of `shape` under `seed` (see the module's docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1:
        return torch.zeros(shape) if leaf == "bias" else torch.ones(shape)
    # torch's CPU generator (mt19937) keeps 32 bits of its seed: seed and name are hashed into them
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    fan_in = shape[-1] if leaf != "weight" else int(torch.tensor(shape[1:]).prod())
    return torch.randn(shape, generator=generator) / fan_in**0.5
