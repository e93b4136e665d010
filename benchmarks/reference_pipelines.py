"""diffusers' own pipelines from tiny random components, built offline: the reference our runtime
must reproduce.

For each real preset (Wan 2.1, Wan 2.2 T2V-A14B and TI2V-5B, CogVideoX 2b / 5b / 1.5, LTX-Video
0.9.0 / 0.9.1, and the image-to-video ones with their image encoder where the pipeline has one) a
tiny random transformer of that family and config style (two for Wan 2.2's A14B ones: `transformer` and
`transformer_2` with the pipeline's `boundary_ratio`), a tiny VAE with the real compression factors
(Wan 2.2's residual 16x VAE for TI2V-5B, whose pipeline `expand_timesteps`), the real scheduler
class, a word-level tokenizer and a tiny T5 (UMT5 for Wan) text encoder are saved as a
diffusers-format folder. `sencache build --model <preset> --weights <folder>` makes a bundle of
it like of the real checkpoint, and `run_reference` runs the diffusers pipeline on the same inputs.

    python -m sencache.benchmarks.reference_pipelines --out runs/parity

prints and saves (parity.json) the largest differences between our runtime and each pipeline;
with `--save MODEL` it saves that model's tiny pipeline and our bundle of it instead.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.families import resolve
from sencache.runtime.families.base import FamilyAdapter
from sencache.runtime.families.ltx import LTXAdapter, pack_text
from sencache.runtime.families.parts import diffusers_pipeline
from sencache.runtime.families.wan import WanAdapter
from sencache.runtime.files import write_atomic

WORDS = [
    "a",
    "an",
    "the",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "moving",
    "left",
    "right",
    "fast",
    "slow",
    "on",
    "black",
    "two",
    "large",
    "small",
]


@dataclass(frozen=True)
class ReferenceCase:
    """A saved tiny pipeline of `model`: its folder, text input shape and video size."""

    model: str
    folder: Path
    text: tuple[int, int]
    size: tuple[int, int, int]
    """(frames, height, width) in pixels."""

    @property
    def packs_mask(self) -> bool:
        return isinstance(resolve(self.model)[0], LTXAdapter)

    @property
    def takes_image(self) -> bool:
        return resolve(self.model)[0].takes_image


def reference_image(seed: int = 0, height: int = 40, width: int = 56) -> np.ndarray:
    """A random RGB picture (uint8 [H, W, 3]) of another size than the video, so the pipeline's
    resizing is part of what is compared."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _text_components(adapter: FamilyAdapter, width: int):
    """A word-level tokenizer and a tiny random T5 (UMT5 for Wan) encoder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    vocabulary = ["<pad>", "</s>", "<unk>", *WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = dict(vocab_size=len(vocabulary), d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    if isinstance(adapter, WanAdapter):
        return tokenizer, UMT5EncoderModel(UMT5Config(**config)).eval()
    return tokenizer, T5EncoderModel(T5Config(**config)).eval()


def _wan_transformer(channels: int, **image: Any):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=image.pop("in_channels", channels),
        out_channels=channels,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **image,
    )


def _wan(model: str):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return _wan_transformer(16), vae, scheduler, (512, 16), (9, 32, 48), {}


def _wan22(model: str):
    """Wan 2.2: A14B's two experts switching at its boundary ratio (5 steps of the tests' shift-3
    schedule: 2 high-noise, 3 low-noise), or TI2V-5B's one transformer on the 48-channel latents of
    the residual VAE with 2x2 patches (16x spatial), whose pipeline expands timesteps per token."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    if model == "wan2.2-t2v-a14b":
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        experts = {"transformer_2": _wan_transformer(16), "boundary_ratio": 0.875}
        return _wan_transformer(16), vae, scheduler, (512, 16), (9, 32, 48), experts
    vae = AutoencoderKLWan(
        base_dim=4,
        decoder_base_dim=4,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=np.linspace(-0.5, 0.5, 48).tolist(),
        latents_std=np.linspace(0.8, 1.2, 48).tolist(),
    )
    return _wan_transformer(48), vae, scheduler, (512, 16), (9, 32, 64), {"expand_timesteps": True}


def _wan_i2v(model: str):
    """Wan 2.1 I2V: 36 input channels (mask and first-frame latents after the noise), a tiny CLIP
    vision encoder at 32 x 32 with 2 x 2 patches (257 hidden states, as ViT-H/14 at 224) and its
    processor; 512 text tokens, which Wan's attention processor assumes before the image tokens."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    _, vae, scheduler, text, size, _ = _wan(model)
    transformer = _wan_transformer(16, in_channels=36, image_dim=16, added_kv_proj_dim=24)
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=2,
        )
    ).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformer, vae, scheduler, text, size, {"image_encoder": encoder, "image_processor": processor}


def _wan22_i2v(model: str):
    """Wan 2.2 I2V-A14B: two experts of 36 input channels (mask and first-frame latents after the
    noise) switching at the preset's boundary ratio (2 high-noise, 3 low-noise steps of the tests'
    5), and no image encoder, as the pipeline's image_encoder is None in the real folder."""
    _, vae, scheduler, text, size, _ = _wan(model)
    experts = {
        "transformer_2": _wan_transformer(16, in_channels=36),
        "boundary_ratio": resolve(model)[1].boundary_ratio,
    }
    return _wan_transformer(16, in_channels=36), vae, scheduler, text, size, experts


def _cogvideox(model: str, **image: Any):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXTransformer3DModel,
    )

    config = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=16,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=7,
        use_rotary_positional_embeddings=model != "cogvideox-2b",
    )
    if model.startswith("cogvideox1.5-5b"):
        config.update(patch_size_t=2, patch_bias=False)  # 3 latent frames: the pipeline pads to 4
    transformer = CogVideoXTransformer3DModel(**{**config, **image})
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    # DPM (stochastic, two-step memory) where the 5B models' users switch to it; DDIM elsewhere.
    scheduler_class = CogVideoXDPMScheduler if model.startswith("cogvideox1.5-5b") else CogVideoXDDIMScheduler
    scheduler = scheduler_class(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
        clip_sample=False,
    )
    return transformer, vae, scheduler, (7, 16), (9, 32, 48), {}


def _cogvideox_i2v(model: str):
    """CogVideoX I2V: twice the VAE's channels in; CogVideoX-5B-I2V's learned position embeddings
    (its sample size is the video's, which they require), CogVideoX 1.5-I2V's ofs embedding."""
    if model == "cogvideox-5b-i2v":
        image = dict(in_channels=8, use_learned_positional_embeddings=True, sample_height=4, sample_width=6)
    else:
        image = dict(in_channels=8, ofs_embed_dim=32)  # the size of the timestep embedding it is added to
    return _cogvideox(model, **image)


def _ltx(model: str):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=16,
    )
    scaling = (True, True, True, False)  # with patch 4: the real 32x spatial and 8x temporal compression
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=scaling,
        decoder_spatio_temporal_scaling=scaling,
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=model.startswith("ltx-video-0.9.1"),
        patch_size=4,
        patch_size_t=1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return transformer, vae, scheduler, (128, 17), (9, 64, 96), {}


FACTORIES = {
    "wan2.1-t2v-1.3b": _wan,
    "wan2.2-t2v-a14b": _wan22,
    "wan2.2-ti2v-5b": _wan22,
    "cogvideox-2b": _cogvideox,
    "cogvideox-5b": _cogvideox,
    "cogvideox1.5-5b": _cogvideox,
    "ltx-video-0.9.0": _ltx,
    "ltx-video-0.9.1": _ltx,
}
"""Real text-to-video presets with a tiny reference pipeline: each factory gives the transformer,
VAE, scheduler, text shape, video size, and the pipeline's further modules and config (a second
expert, an image encoder)."""

IMAGE_FACTORIES = {
    "wan2.1-i2v-14b-480p": _wan_i2v,
    "wan2.2-i2v-a14b": _wan22_i2v,
    "cogvideox-5b-i2v": _cogvideox_i2v,
    "cogvideox1.5-5b-i2v": _cogvideox_i2v,
    "ltx-video-0.9.0-i2v": _ltx,  # 0.9.1: diffusers 0.42 cannot decode its frames with a list of generators
}
"""Real image-to-video presets with a tiny reference pipeline (factories as above)."""


def save_reference(model: str, folder: Path, seed: int = 0) -> ReferenceCase:
    """Construct the tiny pipeline of `model` (random weights from `seed`) and save it to `folder`."""
    adapter, _ = resolve(model)
    torch.manual_seed(seed)
    transformer, vae, scheduler, text, size, extras = {**FACTORIES, **IMAGE_FACTORIES}[model](model)
    pipe = diffusers_pipeline(adapter, transformer.eval(), scheduler, vae=vae.eval())
    modules = {  # models and processors are the pipeline's modules; the rest is its config
        k: v.eval() if isinstance(v, torch.nn.Module) else v for k, v in extras.items() if hasattr(v, "save_pretrained")
    }
    pipe.register_modules(**modules)
    pipe.register_to_config(**{k: v for k, v in extras.items() if k not in modules})
    tokenizer, text_encoder = _text_components(adapter, text[1] - 1 if isinstance(adapter, LTXAdapter) else text[1])
    pipe.register_modules(tokenizer=tokenizer, text_encoder=text_encoder)
    pipe.save_pretrained(folder)
    return ReferenceCase(model, Path(folder), text, size)


def embeddings(case: ReferenceCase, batch: int, seed: int) -> np.ndarray:
    """Random prompt embeddings as our runtime takes them (LTX: the attention mask, with some
    padding, as the last channel)."""
    g = torch.Generator().manual_seed(seed)
    if not case.packs_mask:
        return torch.randn(batch, *case.text, generator=g).numpy()
    tokens, channels = case.text
    mask = (torch.arange(tokens)[None] < torch.randint(1, tokens, (batch, 1), generator=g)).numpy()
    return pack_text(torch.randn(batch, tokens, channels - 1, generator=g).numpy(), mask)


def run_reference(
    case: ReferenceCase,
    seeds: list[int],
    steps: int,
    guidance: float,
    output_type: str,
    embeds: np.ndarray | None = None,
    negative: np.ndarray | None = None,
    prompts: list[str] | None = None,
    image: np.ndarray | None = None,
    **options: Any,
) -> np.ndarray:
    """diffusers' pipeline on prompt embeddings (or prompts, through its own text encoder), one
    generator per sample, and for an image-to-video model `image` (a PIL picture for each
    sample where the pipeline takes one per sample); latents or frames [B, T, H, W, 3] as a
    NumPy array."""
    adapter, _ = resolve(case.model)
    text_parts = {} if prompts is not None else {"tokenizer": None, "text_encoder": None}
    pipe = adapter.pipeline_class().from_pretrained(str(case.folder), local_files_only=True, **text_parts)
    pipe.set_progress_bar_config(disable=True)
    if prompts is not None:
        text: dict[str, Any] = {"prompt": prompts, "max_sequence_length": case.text[0]}
    elif case.packs_mask:
        text = {
            "prompt_embeds": torch.from_numpy(embeds[..., :-1]),
            "prompt_attention_mask": torch.from_numpy(embeds[..., -1]),
            "negative_prompt_embeds": torch.from_numpy(negative[..., :-1]),
            "negative_prompt_attention_mask": torch.from_numpy(negative[..., -1]),
        }
    else:
        text = {"prompt_embeds": torch.from_numpy(embeds), "negative_prompt_embeds": torch.from_numpy(negative)}
    if image is not None:
        from PIL import Image

        picture = Image.fromarray(image)
        # CogVideoX's and LTX's prepare_latents encode image[i] for sample i; Wan's the one image once
        options["image"] = picture if isinstance(adapter, WanAdapter) else [picture] * len(seeds)
    frames, height, width = case.size
    with torch.no_grad():
        out = pipe(
            **text,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            num_frames=frames,
            output_type=output_type,
            **options,
        )
    result = out.frames
    return result.numpy() if isinstance(result, torch.Tensor) else np.asarray(result, np.float32)


def build_bundle(case: ReferenceCase, out: Path, backend: str = "torch", max_batch: int = 2) -> Path:
    """Our bundle of the saved pipeline, built as for the real checkpoint."""
    frames, height, width = case.size
    return build(
        BuildOptions(
            model=case.model,
            out=out,
            weights=case.folder,
            backend=backend,
            frames=frames,
            height=height,
            width=width,
            max_batch=max_batch,
        ),
        log=lambda _: None,
    )


def measure(model: str, root: Path, steps: int = 5) -> dict[str, float]:
    """Largest absolute differences between our runtime (ONNX Runtime and PyTorch backends) and
    the pipeline, uncached, over batch 1 and 2, with and without guidance, latents and frames."""
    from sencache.runtime.cache import NoCache
    from sencache.runtime.model import Model
    from sencache.runtime.request import GenerationParams

    case = save_reference(model, root / "weights")
    image = reference_image() if case.takes_image else None
    errors: dict[str, float] = {}
    for backend in ("torch", "onnxruntime"):
        engine = Model.open(build_bundle(case, root / backend, backend), threads=1)
        for batch in (1, 2):
            for guidance in (1.0, 6.0):
                seeds = [3, 4][:batch]
                embeds, negative = embeddings(case, batch, 9), embeddings(case, batch, 10)
                request = GenerationParams(
                    [f"p{i}" for i in range(batch)], seeds, steps, guidance, embeds, negative, image=image
                )
                ours = engine.generate(request, NoCache(batch))
                theirs = run_reference(case, seeds, steps, guidance, "latent", embeds, negative, image=image)
                key = f"{backend} latents batch {batch} cfg {guidance:g}"
                errors[key] = float(np.abs(ours.latents - theirs).max())
                if batch == 2 and guidance > 1:
                    frames = run_reference(case, seeds, steps, guidance, "np", embeds, negative, image=image)
                    errors[f"{backend} frames batch 2 cfg 6"] = float(
                        np.abs(engine.decode(ours.latents) - frames).max()
                    )
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="parity of our runtime with diffusers' pipelines")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="*", default=[*FACTORIES, *IMAGE_FACTORIES])
    parser.add_argument(
        "--save",
        metavar="MODEL",
        help="instead: save MODEL's tiny pipeline to OUT/weights and build our PyTorch bundle of it in OUT/bundle",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.save:
        bundle = build_bundle(save_reference(args.save, args.out / "weights"), args.out / "bundle")
        print(f"bundle ready: {bundle}")
        return
    report = {}
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            report[model] = measure(model, Path(tmp))
        worst = {k: max(v for n, v in report[model].items() if n.startswith(k)) for k in ("torch", "onnxruntime")}
        print(
            f"{model:18s} max abs vs pipeline: PyTorch backend {worst['torch']:.1e}, "
            f"ONNX Runtime backend {worst['onnxruntime']:.1e}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "parity.json", json.dumps(report, indent=1).encode())
    print(f"wrote {args.out / 'parity.json'}")


if __name__ == "__main__":
    main()
