"""Dummy weights (`--load-format dummy`): the draw, the options that go with it, and a real
preset's true width built with one block at a tiny resolution, then run through `generate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sencache.cli import main
from sencache.engine_builder.builder import BuildOptions, build
from sencache.engine_builder.dummy import dummy_config, dummy_transformer
from sencache.engine_builder.sizing import model_size
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import NoCache
from sencache.runtime.errors import BadInput
from sencache.runtime.families import resolve
from sencache.runtime.manifest import DUMMY_NOTICE, Manifest
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams

WAN = "wan2.1-t2v-1.3b"
SMALL = {"layers": 2, "frames": 5, "height": 32, "width": 32, "max_batch": 1}


def _wan(layers: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    adapter, preset = resolve(WAN)
    return dummy_transformer(adapter, dummy_config(preset, layers), seed, dtype)


def test_the_draw_is_a_function_of_seed_and_name():
    one, two = _wan(1).state_dict(), _wan(2).state_dict()
    assert not any(t.is_meta for t in two.values())
    assert all(torch.equal(one[name], two[name]) for name in one)  # fewer blocks: the same first blocks
    assert set(two) - set(one) and all(name.startswith("blocks.1.") for name in set(two) - set(one))
    other = _wan(1, seed=1).state_dict()
    assert not torch.equal(one["blocks.0.ffn.net.0.proj.weight"], other["blocks.0.ffn.net.0.proj.weight"])
    weight = one["blocks.0.ffn.net.0.proj.weight"]  # 8960 x 1536: N(0, 1/1536)
    assert weight.shape == (8960, 1536) and abs(weight.std().item() * 1536**0.5 - 1) < 0.01


def test_a_lower_precision_draws_the_same_values_rounded():
    wide, half = _wan(1).state_dict(), _wan(1, dtype=torch.float16).state_dict()
    assert half["blocks.0.attn1.to_q.weight"].dtype == torch.float16
    assert half["blocks.0.scale_shift_table"].dtype == torch.float32  # kept in fp32, as diffusers loads it
    assert torch.equal(half["blocks.0.attn1.to_q.weight"], wide["blocks.0.attn1.to_q.weight"].half())


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"model": WAN, "load_format": "dummy", "weights": Path("/tmp")}, "weights"),
        ({"model": WAN, "layers": 2}, "layers"),
        ({"model": WAN, "group_blocks": 2}, "group_blocks"),
        ({"model": WAN, "load_format": "dummy", "group_blocks": 31}, "group_blocks"),
        ({"model": WAN, "load_format": "dummy", "group_blocks": 2, "precision": "bf16"}, "group_blocks"),
        ({"model": WAN, "load_format": "dummy", "layers": 31}, "layers"),
        ({"model": WAN, "load_format": "dummy", "seed": -1}, "seed"),
        ({"model": WAN, "load_format": "random"}, "load_format"),
        ({"model": "tiny-wan", "load_format": "dummy"}, "model"),
    ],
)
def test_options_that_do_not_go_with_dummy_weights(options, param, tmp_path):
    with pytest.raises(BadInput) as e:
        BuildOptions(out=tmp_path / "b", **options).check()
    assert e.value.param == param


def test_a_real_preset_needs_no_weights_folder_with_dummy_weights(tmp_path):
    plan = BuildOptions(model="cogvideox", out=tmp_path / "b", load_format="dummy", layers=1).check()
    assert plan.weights is None and plan.preset.config["num_layers"] == 1
    assert plan.preset.config["num_attention_heads"] == resolve("cogvideox")[1].config["num_attention_heads"]


@pytest.fixture(scope="module")
def dummy_bundle(tmp_path_factory) -> Path:
    """Wan 1.3B's true width (1536, 12 heads, text 512 x 4096) with two blocks at 5 x 32 x 32."""
    out = tmp_path_factory.mktemp("dummy") / "b"
    return build(BuildOptions(model=WAN, out=out, load_format="dummy", seed=3, **SMALL), log=lambda _: None)


@pytest.mark.slow
def test_a_dummy_build_is_built_loaded_and_run(dummy_bundle, tmp_path, capsys):
    manifest = json.loads((dummy_bundle / "manifest.json").read_text())
    assert manifest["dummy_weights"] == {"seed": 3} and manifest["text_encoder"]["kind"] == "dummy"
    assert manifest["weights_source"] is None and manifest["config"]["num_layers"] == 2
    sizing = manifest["sizing"]  # the build chose what no option gave, and recorded it
    assert sizing["automatic"] == ["precision", "group_blocks"] and sizing["precision"] == manifest["precision"]
    adapter, preset = resolve(WAN)
    assert sizing["resolution"] == [5, 32, 32]
    assert sizing["parameters"] == model_size(adapter, dummy_config(preset, 2)).total
    assert all(manifest["validation"][stage]["rel_l2"] < 1e-4 for stage in ("head", "blocks", "tail"))
    bundle = Bundle.load(dummy_bundle)
    assert bundle.manifest.dummy and Manifest.parse(bundle.manifest.to_json()).dummy_seed == 3
    assert bundle.manifest.shapes.text == (512, 4096)
    run = tmp_path / "run"
    args = ["generate", "--engine", dummy_bundle, "--prompt", "a fox", "--steps", "2", "--cache", "none", "--out", run]
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 0 and err.count(DUMMY_NOTICE) == 1
    assert json.loads((run / "stats.json").read_text())["samples"][0]["nfe"] == 2


@pytest.mark.slow
def test_a_streamed_build_runs_as_the_whole_graph(dummy_bundle, tmp_path):
    """One block per graph, one group in memory at a time: the same latents as the one-graph build."""
    streamed = build(
        BuildOptions(model=WAN, out=tmp_path / "s", load_format="dummy", seed=3, group_blocks=1, **SMALL),
        log=lambda _: None,
    )
    manifest = Bundle.load(streamed).manifest
    assert manifest.stages["blocks"].files == ("blocks.onnx", "blocks.1.onnx")
    assert [g["blocks"] for g in manifest.validation["blocks_groups"]] == [[0, 1], [1, 2]]
    latents = []
    for path in (dummy_bundle, streamed):
        engine = Model.open(path, threads=1)
        request = GenerationParams(["a fox"], [0], 2, 5.0)
        latents.append(engine.generate(request, engine.policy("none", 2, 1, {})).latents)
    assert np.array_equal(latents[0], latents[1])


@pytest.mark.slow
def test_external_data_is_verified_and_loaded(dummy_bundle, tmp_path):
    """A graph with its weights in `blocks.onnx.data` (as the exporter writes graphs past 2 GB)
    loads and runs as before; a changed byte of the data is refused, naming the file."""
    import onnx

    from conftest import relist, reseal

    moved = tmp_path / "external"
    shutil.copytree(dummy_bundle, moved)
    graph = onnx.load(str(moved / "blocks.onnx"))
    onnx.save(graph, str(moved / "blocks.onnx"), save_as_external_data=True, location="blocks.onnx.data")
    reseal(moved, lambda m: [relist(m, moved, name) for name in ("blocks.onnx", "blocks.onnx.data")])
    latents = []
    for path in (dummy_bundle, moved):
        engine = Model.open(path, threads=1)
        request = GenerationParams(["a fox"], [0], 1, 5.0)
        latents.append(engine.generate(request, engine.policy("none", 1, 1, {})).latents)
    assert np.array_equal(latents[0], latents[1])
    with open(moved / "blocks.onnx.data", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BadInput, match=r"blocks\.onnx\.data does not match its checksum"):
        Model.open(moved, threads=1)


def test_the_real_size_report_shows_engines_and_the_fp8_memory_verdict(tmp_path):
    """The report's TensorRT-RTX rows (engine sizes, not run without a GPU) and its FP8 memory
    paragraph, whose verdict follows the line through the measured points."""
    from sencache.benchmarks.real_size import FP8_MEMORY, write_report

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "real_size"
    shutil.copy(results / "wan2.1-t2v-1.3b-fp16-tensorrt-rtx.json", tmp_path)
    point = {"blocks": 1, "graph_gb": 0.19, "peak_rss_gb": 2.3, "seconds": 53.0, "calibration_rows": 50}
    memory = {"model": "wan2.1-t2v-1.3b", "resolution": "5x64x64", "points": [point]}
    (tmp_path / FP8_MEMORY).write_text(json.dumps(memory))
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| wan2.1-t2v-1.3b | tensorrt-rtx 1.7.1.116 (SM89) | fp16 | 9x128x128 | 30 (1) |" in report
    assert "| 2.99 |" in report and "tensorrt-rtx engines run only on a GPU" in report
    assert "One point only" in report
    fit = {"gb_per_block": 2.0, "gb_at_zero_blocks": 0.5, "rss_per_graph_byte": 11.0, "whole_model_blocks": 30}
    for whole, verdict in ((61.0, "does not fit the 20 GB limit"), (15.0, "within the 20 GB limit")):
        (tmp_path / FP8_MEMORY).write_text(json.dumps(dict(memory, fit=dict(fit, whole_model_peak_gb=whole))))
        write_report(tmp_path)
        assert verdict in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_an_image_to_video_dummy_build_takes_its_image(tmp_path, capsys):
    """LTX-Video I2V at its true width (one block, 9 x 64 x 64, PyTorch): with dummy weights there is no
    VAE, so the image's first latent frame is drawn from the image; the run keeps that frame as the
    pipeline keeps the image's, and a run without an image is refused naming --image."""
    from PIL import Image

    out = tmp_path / "b"
    options = {"layers": 1, "frames": 9, "height": 64, "width": 64, "max_batch": 1, "backend": "torch"}
    build(BuildOptions(model="ltx-video-i2v", out=out, load_format="dummy", **options), log=lambda _: None)
    picture = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(picture)
    base = ["generate", "--engine", str(out), "--prompt", "a fox", "--steps", "2", "--cache", "none"]
    assert main([*base, "--out", str(tmp_path / "none")]) == 2
    assert "--image is missing: ltx-video-0.9.1-i2v is an image-to-video model" in capsys.readouterr().err
    assert main([*base, "--image", str(picture), "--out", str(tmp_path / "run")]) == 0
    model = Model.open(out, threads=1)
    image = np.asarray(Image.open(picture))
    request = GenerationParams(["a fox"], [0], 2, 1.0, image=image)
    first = model.conditions(image, [torch.Generator().manual_seed(0)])["image_latent"][0, :4]
    latents = model.generate(request, NoCache(1)).latents[0]
    np.testing.assert_array_equal(latents[:4], first.numpy())  # frame 0: 2 x 2 tokens, held
    assert np.abs(latents[4:]).max() > 0


def test_streamed_parts_run_on_onnx_runtime_and_tensorrt_not_torch(ort_bundle):
    """A streamed build's groups of blocks: graphs for ONNX Runtime, one engine each for TensorRT
    (run in turn by its backend); the PyTorch backend loads one transformer and takes no parts."""
    data = json.loads((ort_bundle / "manifest.json").read_text())
    data["stages"]["blocks"]["parts"] = ["blocks.1.onnx"]
    assert Manifest.parse(data).stages["blocks"].files == ("blocks.onnx", "blocks.1.onnx")
    rtx = json.loads(json.dumps(data))
    rtx.update(
        backend="tensorrt-rtx", tensorrt={"module": "tensorrt_rtx", "version": "1.7", "compute_capability": "SM89"}
    )
    for stage in rtx["stages"].values():
        stage["file"] = stage["file"].replace(".onnx", ".engine")
    rtx["stages"]["blocks"]["parts"] = ["blocks.1.engine"]
    assert Manifest.parse(rtx).stages["blocks"].files == ("blocks.engine", "blocks.1.engine")
    with pytest.raises(BadInput, match="not torch"):
        Manifest.parse(dict(data, backend="torch", weights="transformer"))
