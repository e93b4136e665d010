"""The memory estimate of a request and of a process that runs a bundle (runtime/memory.py): what
it counts, how it grows, and the guard that refuses a request before anything is allocated. The
estimate against measured peaks: benchmarks/results/real_size/memory.md."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sencache.runtime.bundle import Bundle
from sencache.runtime.errors import BadInput
from sencache.runtime.manifest import FileEntry
from sencache.runtime.memory import (
    LOADED_PER_BYTE,
    PROCESS_BYTES,
    SESSION_BYTES,
    check_memory,
    estimated_peak,
    loaded_bytes,
    needed_bytes,
    pass_bytes,
    request_bytes,
)


def test_the_opened_stages_count_every_graph_and_its_external_data(ort_bundle):
    manifest = Bundle.load(ort_bundle).manifest
    graphs = [f for stage in manifest.stages.values() for f in stage.files]
    stored = sum(manifest.files[f].bytes for f in graphs)
    assert loaded_bytes(manifest) == int(stored * LOADED_PER_BYTE["fp32"] + SESSION_BYTES * len(graphs))
    files = dict(manifest.files, **{"blocks.onnx.data": FileEntry(10**9, ("0" * 64,) * 15)})
    half = dataclasses.replace(manifest, precision="fp16", files=files)
    assert loaded_bytes(half) == int((stored + 10**9) * LOADED_PER_BYTE["fp16"] + SESSION_BYTES * len(graphs))


def test_a_pass_grows_with_rows_and_with_the_square_of_the_tokens(ort_bundle):
    manifest = Bundle.load(ort_bundle).manifest
    shapes, config = manifest.shapes, {"num_attention_heads": 12, "ffn_dim": 8960}
    tokens, width = 4800, 1536
    wide = dataclasses.replace(shapes, streams=((tokens, width),), text=(512, 4096))
    twice = dataclasses.replace(wide, streams=((2 * tokens, width),))
    assert pass_bytes(wide, config, 2) == 2 * pass_bytes(wide, config, 1)
    assert pass_bytes(wide, config, 1) == 4 * (2 * 12 * tokens**2 + 5 * tokens * width)  # the scores dominate
    assert 3.8 < pass_bytes(twice, config, 1) / pass_bytes(wide, config, 1) < 4


def test_the_estimate_is_the_process_the_stages_and_the_request(ort_bundle):
    manifest = Bundle.load(ort_bundle).manifest
    needed = needed_bytes(manifest, 2, 2)
    assert needed == request_bytes(manifest.shapes, 2, 2) + pass_bytes(manifest.shapes, manifest.config, 4)
    assert estimated_peak(manifest, 2, 2) == int(PROCESS_BYTES) + loaded_bytes(manifest) + needed


def test_a_request_larger_than_the_free_memory_is_refused():
    with pytest.raises(BadInput, match=r"this request needs about .* GiB on cpu and .* GiB is free: use fewer samples"):
        check_memory(1 << 60, torch.device("cpu"))
    check_memory(1 << 20, torch.device("cpu"))
