"""Model-family adapters: real configs on the meta device, the split, weight loading errors."""

import json

import pytest
import torch

from sencache.runtime.errors import BadInput
from sencache.runtime.families import resolve
from sencache.runtime.families.base import Shapes
from sencache.runtime.families.parts import build_transformer, example_inputs, load_components

# Parameter counts of the published checkpoints' configs (Wan 1.3B/14B, CogVideoX 2B/5B, LTX-Video 2B).
REAL = [
    ("wan2.1-t2v-1.3b", 1.42e9, (16, 21, 60, 104)),
    ("wan2.1-t2v-14b", 14.3e9, (16, 21, 90, 160)),
    ("cogvideox-2b", 1.69e9, (13, 16, 60, 90)),
    ("cogvideox-5b", 5.57e9, (13, 16, 60, 90)),
    ("cogvideox1.5-5b", 5.57e9, (22, 16, 96, 170)),
    ("ltx-video-0.9.0", 1.92e9, (21 * 16 * 22, 128)),
    ("ltx-video-0.9.1", 1.92e9, (21 * 16 * 22, 128)),
    # image-to-video: Wan's CLIP projection and added key/value projections (16.4 B, as the published
    # I2V-14B checkpoints), CogVideoX's doubled input channels, LTX-Video's own transformer
    ("wan2.1-i2v-14b-480p", 16.39e9, (16, 21, 60, 104)),
    ("wan2.1-i2v-14b-720p", 16.39e9, (16, 21, 90, 160)),
    ("cogvideox-5b-i2v", 5.57e9, (13, 16, 60, 90)),
    ("cogvideox1.5-5b-i2v", 5.57e9, (22, 16, 96, 170)),
    ("ltx-video-0.9.0-i2v", 1.92e9, (21 * 16 * 22, 128)),
    ("ltx-video-0.9.1-i2v", 1.92e9, (21 * 16 * 22, 128)),
]


@pytest.mark.parametrize("model,params,latent", REAL)
def test_every_real_config_builds_and_splits_on_meta(model, params, latent):
    adapter, preset = resolve(model)
    transformer = build_transformer(adapter, preset, None, device="meta")
    count = sum(p.numel() for p in transformer.parameters())
    assert abs(count - params) / params < 0.02
    shapes = Shapes(preset.frames, preset.height, preset.width, 1)
    assert adapter.latent_shape(preset, shapes) == latent
    stages = adapter.split(transformer, preset, shapes)
    with torch.device("meta"):
        head = dict(
            zip(adapter.layout.head_outputs, stages["head"](**example_inputs(adapter, preset, shapes, 1)), strict=True)
        )
        streams = stages["blocks"](**{k: head[k] for k in adapter.layout.blocks_inputs})
        streams = dict(zip(adapter.layout.streams, streams if isinstance(streams, tuple) else (streams,), strict=True))
        noise = stages["tail"](
            **{k: streams[k] for k in adapter.layout.tail_stream_names},
            **{k: head[k] for k in adapter.layout.tail_context},
        )
    assert tuple(noise.shape) == (1, *latent)


def test_short_names_mean_the_default_variants():
    assert resolve("cogvideox")[1].name == "cogvideox1.5-5b"
    assert resolve("ltx-video")[1].name == "ltx-video-0.9.1"
    assert resolve("ltx-video-i2v")[1].name == "ltx-video-0.9.1-i2v"


def test_image_families_are_the_adapters_that_take_an_image():
    """The manifest-only list front ends check against, and the adapters: a family whose head takes
    image inputs is in it, and every family in it encodes an image its own way."""
    from sencache.runtime.families import ADAPTERS
    from sencache.runtime.families.base import FamilyAdapter
    from sencache.runtime.images import IMAGE_FAMILIES

    assert set(ADAPTERS) >= IMAGE_FAMILIES
    for adapter in ADAPTERS.values():
        assert adapter.takes_image == (adapter.family in IMAGE_FAMILIES)
        if adapter.layout.conditions:
            assert adapter.takes_image
        assert (type(adapter).encode_image is not FamilyAdapter.encode_image) == adapter.takes_image


def test_cogvideox_1_5_pads_latent_frames_as_the_pipeline_does():
    adapter, preset = resolve("cogvideox1.5-5b")
    assert adapter.latent_shape(preset, Shapes(49, 480, 720, 1)) == (14, 16, 60, 90)  # 13 frames padded to 14
    assert adapter.padding_frames(preset, Shapes(49, 480, 720, 1)) == 1
    assert adapter.padding_frames(preset, Shapes(53, 480, 720, 1)) == 0


@pytest.mark.parametrize("model", ["cogvideox", "ltx-video", "wan2.1-t2v-1.3b"])
def test_real_model_without_weights_names_the_folder_to_pass(model):
    adapter, preset = resolve(model)
    with pytest.raises(BadInput, match="weights must name a folder: .* needs a local copy of .* in diffusers format"):
        build_transformer(adapter, preset, None)


def test_component_folder_errors(tmp_path):
    adapter, preset = resolve("cogvideox-5b")
    with pytest.raises(BadInput, match="no model_index.json"):
        load_components(adapter, tmp_path)
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "CogVideoXPipeline", "vae": ["diffusers", "AutoencoderKLCogVideoX"]})
    )
    with pytest.raises(BadInput, match="cannot load the pipeline components"):
        load_components(adapter, tmp_path)


def test_wan_1_3b_latent_matches_published_size():
    adapter, preset = resolve("wan2.1-t2v-1.3b")
    assert adapter.latent_shape(preset, Shapes(81, 480, 832, 1)) == (16, 21, 60, 104)


def test_tiny_split_equals_the_whole_transformer():
    adapter, preset = resolve("tiny-wan")
    torch.manual_seed(0)
    transformer = build_transformer(adapter, preset, None)
    shapes = Shapes(preset.frames, preset.height, preset.width, 2)
    stages = adapter.split(transformer, preset, shapes)
    inputs = example_inputs(adapter, preset, shapes, 2)
    with torch.no_grad():
        whole = transformer(inputs["latent"], inputs["timestep"], inputs["text"], return_dict=False)[0]
        head = dict(zip(adapter.layout.head_outputs, stages["head"](**inputs), strict=True))
        hidden = stages["blocks"](**{k: head[k] for k in adapter.layout.blocks_inputs})
        out = stages["tail"](hidden, head["temb"])
    assert torch.equal(whole, out)


def test_weight_folder_errors(tmp_path):
    adapter, preset = resolve("wan2.1-t2v-1.3b")
    with pytest.raises(BadInput, match="config.json"):
        build_transformer(adapter, preset, tmp_path)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(BadInput, match="no weight files"):
        build_transformer(adapter, preset, tmp_path)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel"}))
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(BadInput, match="not a WanTransformer3DModel"):
        build_transformer(adapter, preset, tmp_path)


def test_real_weights_load_from_a_diffusers_folder(tmp_path):
    adapter, preset = resolve("tiny-wan")
    torch.manual_seed(3)
    saved = build_transformer(adapter, preset, None)
    saved.save_pretrained(tmp_path / "transformer")
    loaded = build_transformer(adapter, preset, tmp_path)
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_unknown_model():
    with pytest.raises(BadInput, match="unknown model"):
        resolve("sora")


@pytest.mark.parametrize("model", ["ltx-video", "tiny-ltx"])
def test_one_ltx_step_goes_from_sigma_one_to_zero(model):
    """diffusers' stretch to shift_terminal divides 0 by 0 for one sigma (NaN timesteps, then an
    IndexError in step); one step is sigma 1 alone, which the shift and the stretch both keep."""
    from sencache.runtime.families.parts import make_scheduler

    adapter, preset = resolve(model)
    shapes = Shapes(preset.frames, preset.height, preset.width, 1)
    one = adapter.sampler(make_scheduler(adapter, preset), 1, preset, shapes)
    assert one.timesteps.tolist() == [1000.0] and one.scheduler.sigmas.tolist() == [1.0, 0.0]
    x, velocity = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    assert torch.allclose(one.step(0, velocity, x), x - velocity)
    two = adapter.sampler(make_scheduler(adapter, preset), 2, preset, shapes)
    assert two.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.1, 0.0])  # the terminal stretch still applies


def test_cogvideox_5b_i2v_takes_only_its_learned_size():
    """Its learned position embeddings are for 480 x 720 (diffusers' pipeline refuses other sizes):
    refused when the transformer (with its weights' config) is split, as one line."""
    adapter, preset = resolve("cogvideox-5b-i2v")
    transformer = build_transformer(adapter, preset, None, device="meta")
    assert set(adapter.split(transformer, preset, Shapes(49, 480, 720, 1))) == {"head", "blocks", "tail"}
    with pytest.raises(BadInput, match="learned position embeddings take 480x720"):
        adapter.split(transformer, preset, Shapes(9, 64, 64, 1))
