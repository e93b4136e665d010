"""FLOPs of each stage for one sample, counted by torch's FlopCounterMode on the meta device.

No weights and no memory are needed, so the real models' configs can be counted on any machine:
this is how the report says what share head and tail (which run on every step, cached or not)
take at the real models' depth.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from sencache.runtime.families import resolve
from sencache.runtime.families.base import Shapes
from sencache.runtime.families.parts import build_transformer, example_inputs


def stage_flops(model: str) -> dict[str, float]:
    """FLOPs of head, blocks and tail for one sample of `model` at its preset size."""
    adapter, preset = resolve(model)
    shapes = Shapes(preset.frames, preset.height, preset.width, 1)
    counts: dict[str, float] = {}
    with torch.device("meta"):
        transformer = build_transformer(adapter, preset, None, device="meta")
        stages = adapter.split(transformer, preset, shapes)
        inputs = example_inputs(adapter, preset, shapes, 1)
        with FlopCounterMode(display=False) as counter:
            head = dict(zip(adapter.layout.head_outputs, stages["head"](**inputs), strict=True))
        counts["head"] = float(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            streams = stages["blocks"](**{k: head[k] for k in adapter.layout.blocks_inputs})
        counts["blocks"] = float(counter.get_total_flops())
        streams = streams if isinstance(streams, tuple) else (streams,)
        streams = dict(zip(adapter.layout.streams, streams, strict=True))
        tail_in = {k: streams[k] for k in adapter.layout.tail_stream_names}
        tail_in.update({k: head[k] for k in adapter.layout.tail_context})
        with FlopCounterMode(display=False) as counter:
            stages["tail"](**tail_in)
        counts["tail"] = float(counter.get_total_flops())
    counts["head_tail_share"] = (counts["head"] + counts["tail"]) / counts["blocks"]
    return counts
