"""Model-family adapters: real configs on the meta device, the split, weight loading errors."""

import json

import pytest
import torch

from sencache.runtime.errors import BadInput
from sencache.runtime.families import resolve
from sencache.runtime.families.base import Shapes


@pytest.mark.parametrize("model,params", [("wan2.1-t2v-1.3b", 1.42e9), ("wan2.1-t2v-14b", 14.3e9)])
def test_real_configs_build_on_meta(model, params):
    adapter, preset = resolve(model)
    transformer = adapter.build_transformer(preset, None, device="meta")
    count = sum(p.numel() for p in transformer.parameters())
    assert abs(count - params) / params < 0.03
    assert all(p.device.type == "meta" for p in transformer.parameters())
    shapes = Shapes(preset.frames, preset.height, preset.width, 1)
    latent = adapter.latent_shape(preset, shapes)
    assert latent[:2] == (16, 21)
    stages = adapter.split(transformer, preset, shapes)
    with torch.device("meta"):
        inputs = adapter.example_inputs(preset, shapes, 1)
    head = stages["head"](**inputs)
    assert head[0].shape == (1, 21 * latent[2] // 2 * latent[3] // 2, transformer.config.num_attention_heads * 128)


def test_wan_1_3b_latent_matches_published_size():
    adapter, preset = resolve("wan2.1-t2v-1.3b")
    assert adapter.latent_shape(preset, Shapes(81, 480, 832, 1)) == (16, 21, 60, 104)


def test_tiny_split_equals_the_whole_transformer():
    adapter, preset = resolve("tiny-wan")
    torch.manual_seed(0)
    transformer = adapter.build_transformer(preset, None)
    shapes = Shapes(preset.frames, preset.height, preset.width, 2)
    stages = adapter.split(transformer, preset, shapes)
    inputs = adapter.example_inputs(preset, shapes, 2)
    with torch.no_grad():
        whole = transformer(inputs["latent"], inputs["timestep"], inputs["text"], return_dict=False)[0]
        head = dict(zip(adapter.layout.head_outputs, stages["head"](**inputs)))
        hidden = stages["blocks"](**{k: head[k] for k in adapter.layout.blocks_inputs})
        out = stages["tail"](hidden, head["temb"])
    assert torch.equal(whole, out)


def test_real_model_without_weights_says_what_to_pass():
    adapter, preset = resolve("wan2.1-t2v-1.3b")
    with pytest.raises(BadInput, match="--weights DIR"):
        adapter.build_transformer(preset, None)


def test_weight_folder_errors(tmp_path):
    adapter, preset = resolve("wan2.1-t2v-1.3b")
    with pytest.raises(BadInput, match="config.json"):
        adapter.build_transformer(preset, tmp_path)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(BadInput, match="no weight files"):
        adapter.build_transformer(preset, tmp_path)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel"}))
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(BadInput, match="not a WanTransformer3DModel"):
        adapter.build_transformer(preset, tmp_path)


def test_real_weights_load_from_a_diffusers_folder(tmp_path):
    adapter, preset = resolve("tiny-wan")
    torch.manual_seed(3)
    saved = adapter.build_transformer(preset, None)
    saved.save_pretrained(tmp_path / "transformer")
    loaded = adapter.build_transformer(preset, tmp_path)
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_model():
    with pytest.raises(BadInput, match="unknown model"):
        resolve("sora")
