"""A real-size dummy build's own choice of precision, block grouping and resolution: pure functions of
the model's parameter counts (real presets counted on `meta`) and the available memory, and the
options a build takes from them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sencache.engine_builder import builder
from sencache.engine_builder.builder import BuildOptions
from sencache.engine_builder.sizing import (
    BUILD_BASE,
    BUILD_SHARE,
    FP8_QUANTIZE_BASE,
    FP8_QUANTIZE_BYTES_PER_PARAMETER,
    REDUCED,
    ModelSize,
    choose,
    estimated_peak,
    model_size,
    quantize_peak,
)
from sencache.runtime.errors import BadInput
from sencache.runtime.families import resolve

FP8_MEMORY = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "real_size" / "fp8_memory.json"
GIB = 2**30
MACHINE = 22 * GIB
"""What a fresh 24 GB machine of this kind has available."""


def _size(model: str) -> ModelSize:
    adapter, preset = resolve(model)
    return model_size(adapter, preset.config)


def test_parameters_are_counted_by_block_on_meta():
    size = _size("cogvideox")
    assert size.blocks == 42 and abs(size.total - 5.57e9) / 5.57e9 < 0.01
    assert size.held(None) == size.total and size.held(6) == size.other + 6 * size.per_block
    assert 0 < size.other < size.per_block  # CogVideoX's head and tail are smaller than one block


def test_cogvideox_on_this_machine_is_fp16_streamed_within_the_budget():
    """The README's command: 5.6 B parameters (22 GB in fp32) do not fit twice in 22 GiB."""
    size = _size("cogvideox")
    chosen = choose(size, MACHINE, None, None, None)
    assert chosen.precision == "fp16" and chosen.group_blocks is not None
    assert chosen.estimated_peak <= BUILD_SHARE * MACHINE < estimated_peak(size.total)
    groups = math.ceil(size.blocks / chosen.group_blocks)
    assert estimated_peak(size.held(math.ceil(size.blocks / (groups - 1)))) > BUILD_SHARE * MACHINE  # fewest
    assert chosen.resolution == REDUCED and chosen.automatic == ("precision", "group_blocks", "resolution")
    assert "fp16" in chosen.line() and f"{groups} groups of {chosen.group_blocks}" in chosen.line()


def test_a_model_whose_fp32_weights_fit_is_fp32_in_one_graph():
    chosen = choose(_size("cogvideox-2b"), 64 * GIB, None, None, None)
    assert (chosen.precision, chosen.group_blocks) == ("fp32", None)
    wan14 = choose(_size("wan2.1-t2v-14b"), MACHINE, None, None, None)
    assert wan14.precision == "fp16" and wan14.estimated_peak <= BUILD_SHARE * MACHINE


def test_flags_override_their_part_of_the_choice():
    size = _size("cogvideox")
    chosen = choose(size, MACHINE, "fp32", None, (5, 64, 64))
    assert chosen.precision == "fp32" and chosen.group_blocks is not None and chosen.automatic == ("group_blocks",)
    assert choose(size, MACHINE, None, 0, None).group_blocks is None  # 0: one graph, as asked
    assert choose(size, MACHINE, None, 3, None).group_blocks == 3
    assert choose(size, MACHINE, "bf16", None, None, streamable=False).group_blocks is None


def test_a_machine_too_small_for_one_block_is_refused():
    with pytest.raises(BadInput, match="even one block per group needs about"):
        choose(_size("wan2.1-t2v-14b"), 4 * GIB, None, None, None)


def test_a_dummy_build_takes_the_choice_and_keeps_the_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "available_bytes", lambda device: MACHINE)
    plan = BuildOptions(model="cogvideox", out=tmp_path / "b", load_format="dummy").check()
    assert plan.sizing is not None and plan.options.precision == "fp16"
    assert plan.options.group_blocks == plan.sizing.group_blocks is not None
    assert (plan.shapes.frames, plan.shapes.height, plan.shapes.width) == REDUCED
    plan = BuildOptions(
        model="cogvideox", out=tmp_path / "b", load_format="dummy", precision="fp32", group_blocks=0, height=64
    ).check()
    assert (plan.options.precision, plan.options.group_blocks) == ("fp32", None)
    assert (plan.shapes.frames, plan.shapes.height, plan.shapes.width) == (REDUCED[0], 64, REDUCED[2])
    with pytest.raises(BadInput) as e:
        BuildOptions(
            model="cogvideox", out=tmp_path / "b", load_format="dummy", precision="bf16", group_blocks=2
        ).check()
    assert e.value.param == "group_blocks"


def test_a_build_of_real_weights_keeps_fp32_and_the_models_resolution(tmp_path):
    plan = BuildOptions(model="tiny-wan", out=tmp_path / "b").check()
    assert plan.sizing is None and plan.options.precision == "fp32"
    assert Path(plan.options.out) == tmp_path / "b"


def test_the_fp8_quantizer_line_is_the_measured_fit():
    memory = json.loads(FP8_MEMORY.read_text())
    fit, size = memory["fit"], _size(memory["model"])
    assert abs(FP8_QUANTIZE_BASE / (fit["gb_at_zero_blocks"] * 1e9) - 1) < 0.02
    assert abs(FP8_QUANTIZE_BYTES_PER_PARAMETER * size.per_block / (fit["gb_per_block"] * 1e9) - 1) < 0.02


def test_fp8_groups_keep_the_quantizer_within_the_budget():
    """Quantizing Wan 1.3B's 30 blocks at once does not fit; the chosen groups do, and are the fewest."""
    size, budget = _size("wan2.1-t2v-1.3b"), BUILD_SHARE * MACHINE
    assert quantize_peak(size.blocks * size.per_block) > budget
    chosen = choose(size, MACHINE, "fp8", None, None)
    group = chosen.group_blocks
    assert group is not None and chosen.estimated_peak <= budget
    assert chosen.estimated_peak > quantize_peak(group * size.per_block)  # the build's own memory beside it
    groups = math.ceil(size.blocks / group)
    assert quantize_peak(math.ceil(size.blocks / (groups - 1)) * size.per_block) > budget - BUILD_BASE  # fewest
    assert choose(size, MACHINE, "fp32", None, None).group_blocks != group  # export alone would group otherwise
    with pytest.raises(BadInput, match="even one block per group"):
        choose(size, int(quantize_peak(size.per_block) / BUILD_SHARE), "fp8", None, None)


def test_a_dummy_tensorrt_rtx_fp8_build_is_streamed_in_groups(tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")
    pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt not installed")
    monkeypatch.setattr(builder, "available_bytes", lambda device: MACHINE)
    options = BuildOptions(
        model="wan2.1-t2v-1.3b",
        out=tmp_path / "b",
        load_format="dummy",
        precision="fp8",
        backend="tensorrt-rtx",
        compute_capability="SM89",
    )
    plan = options.check()
    assert plan.options.group_blocks == plan.sizing.group_blocks is not None
    assert plan.target.group_file(1) == "blocks.1.engine"
