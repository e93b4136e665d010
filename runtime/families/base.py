"""The contract between the engine and one model family (Wan, CogVideoX, LTX-Video).

An adapter owns everything that differs between families: the diffusers transformer class and
its configs, how the transformer splits into head / blocks / tail (SPEC section 2), the latent
layout, the timestep units, how classifier-free guidance is batched, the scheduler the real
pipeline uses, and how latents become frames. The runtime, the builder and calibration only talk
to this interface (and to the functions of `parts.py`, built on its hooks), so a new family is one
new module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import nn

from sencache.runtime.conventions import SenCacheConventions
from sencache.runtime.errors import BadInput
from sencache.runtime.images import IMAGE_FAMILIES

if TYPE_CHECKING:
    # Transformer classes are typed from their defining modules: through `diffusers` itself, mypy
    # reads the placeholders diffusers declares for installs without torch (utils/dummy_pt_objects.py).
    from diffusers.models.modeling_utils import ModelMixin

    from sencache.runtime.parallel.sequence import SequenceShard
    from sencache.runtime.tiny_text import TinyTextEncoder


@dataclass(frozen=True)
class StageLayout:
    """Names of the tensors that flow between the stages.

    head(latent, timestep, text) -> streams + block_context + tail_context (each name once)
    blocks(streams + block_context) -> streams      (the cache holds blocks(s) - s per stream)
    tail(tail_streams + tail_context) -> noise
    `shared` names carry no batch dimension (rotary tables), so they are never gathered.
    `tail_streams` defaults to every stream; CogVideoX's blocks also update the text stream,
    which is cached (SPEC section 2) but not read by the tail.
    """

    streams: tuple[str, ...]
    block_context: tuple[str, ...]
    tail_context: tuple[str, ...]
    shared: tuple[str, ...] = ()
    tail_streams: tuple[str, ...] | None = None
    signals: tuple[str, ...] = ()
    """Head outputs only cache rules read (LTX's block-0 modulated input for TeaCache)."""
    tokens: tuple[str, ...] = ()
    """Head outputs whose dimension 1 is the video token axis: sequence parallelism gives each
    rank its part of them (the others, text included, stay whole on every rank)."""
    conditions: tuple[str, ...] = ()
    """Head inputs after latent, timestep and text that the request's image gives (image-to-video:
    the first frame's latents, image-encoder states): one row per engine row, the same at every
    step of the run. Empty for a family whose head takes no image (text-to-video, or LTX-Video,
    whose image is in the latent itself)."""

    @property
    def head_inputs(self) -> tuple[str, ...]:
        return HEAD_INPUTS + self.conditions

    @property
    def head_outputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.streams + self.block_context + self.tail_context + self.signals))

    @property
    def blocks_inputs(self) -> tuple[str, ...]:
        return self.streams + self.block_context

    @property
    def tail_stream_names(self) -> tuple[str, ...]:
        return self.streams if self.tail_streams is None else self.tail_streams

    @property
    def tail_inputs(self) -> tuple[str, ...]:
        return self.tail_stream_names + self.tail_context

    @property
    def stage_io(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """(inputs, outputs) of each stage by name, as exported and as the runtime feeds them."""
        return {
            "head": (self.head_inputs, self.head_outputs),
            "blocks": (self.blocks_inputs, tuple(s + "_out" for s in self.streams)),
            "tail": (self.tail_inputs, (NOISE,)),
        }


HEAD_INPUTS = ("latent", "timestep", "text")
NOISE = "noise"


@dataclass(frozen=True)
class ModelPreset:
    """A named model: its transformer config and what a run of it needs by default."""

    name: str
    family: str
    config: dict[str, Any]
    frames: int
    height: int
    width: int
    tiny: bool = False
    trained: bool = True
    """False for a tiny model shipped untrained (random weights): export and parity checks only."""
    guidance: float = 5.0
    steps: int = 50
    cache_defaults: dict[str, dict[str, float]] = field(default_factory=dict)
    """Default knobs per cache method ("sencache", "teacache", "magcache")."""
    published_baselines: tuple[tuple[float, ...], tuple[float, ...] | None] | None = None
    """(TeaCache coefficients, MagCache cond-branch ratios or None) published for this model, if any."""
    scheduler: dict[str, Any] = field(default_factory=dict)
    """The published scheduler config, where the family does not derive it."""
    description: str = ""
    boundary_ratio: float | None = None
    """Two experts (Wan 2.2 A14B): the first denoises t >= boundary_ratio x the scheduler's
    num_train_timesteps, the second the rest (WanPipeline's `boundary_ratio`); None: one transformer."""
    guidance_2: float | None = None
    """The second expert's default guidance scale (WanPipeline's `guidance_scale_2`)."""

    @property
    def experts(self) -> int:
        """How many transformers denoise in turn (runtime/experts.py)."""
        return 1 if self.boundary_ratio is None else 2


TINY_CACHE: dict[str, dict[str, float]] = {
    "sencache": {"eps_start": 0.05, "eps_main": 0.3, "max_reuse": 3},
    "teacache": {"threshold": 0.1},
    "magcache": {"threshold": 0.12, "max_reuse": 4, "retention": 0.2},
}
"""The bundled tiny models' default cache knobs (RGB as latent, 30 steps): `tiny_preset`'s."""


def tiny_preset(name: str, family: str, config: dict[str, Any], description: str, **changes: Any) -> ModelPreset:
    """A bundled tiny model of `config`: RGB as latent, 8 x 32 x 32, 30 steps at guidance 4.0 with
    TINY_CACHE's knobs; `changes` are the ModelPreset fields it sets otherwise."""
    preset = ModelPreset(
        name=name,
        family=family,
        config=config,
        frames=8,
        height=32,
        width=32,
        tiny=True,
        guidance=4.0,
        steps=30,
        cache_defaults=TINY_CACHE,
        description=description,
    )
    return replace(preset, **changes)


@dataclass(frozen=True)
class Shapes:
    """The shapes a bundle is built for: pixel-space video size and the batch range."""

    frames: int
    height: int
    width: int
    max_batch: int


class Sampler:
    """How the real pipeline drives its scheduler: the timesteps of a run and one solver step.

    The default is what Wan's pipeline does: `set_timesteps(steps)` and a plain `step`.
    """

    def __init__(self, scheduler, steps: int) -> None:
        self.scheduler = scheduler
        self.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps

    def set_timesteps(self, steps: int) -> None:
        self.scheduler.set_timesteps(steps)

    def start_at(self, index: int) -> None:
        """Make the next step the first one of a fresh state at `index` (calibration)."""
        self.scheduler.set_begin_index(index)

    def step(
        self, index: int, noise: torch.Tensor, x: torch.Tensor, generators: list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """One solver step from `x` with the guided prediction `noise` at timestep `index`."""
        return self.scheduler.step(noise, self.timesteps[index], x, return_dict=False)[0]

    def injected(self) -> tuple[float, torch.Tensor] | None:
        """The noise the last `step` drew into its output and the factor that step applied to its
        input, so that noise added since an anchor evolves as n <- factor * n + added (a stochastic
        sampler's); None for a deterministic sampler (the default), whose drift is all signal."""
        return None

    def noised(self, index: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Clean latents `x0` noised with `noise` to timestep `index` of the run, as the model was
        trained (calibration on data): the flow interpolation (1 - sigma) x0 + sigma noise."""
        sigma = self.scheduler.sigmas[index]
        return (1 - sigma) * x0 + sigma * noise


class TinyFormat(ABC):
    """A tiny model's formats: its latents are its training clips' RGB in [-1, 1] (no VAE), and its
    text is the tiny text encoder's embeddings as the family's head takes them."""

    @abstractmethod
    def latents(self, clips: np.ndarray) -> np.ndarray:
        """Training clips [B, T, H, W, 3] in [0, 1] as a tiny model's latents (inverse of `frames`)."""

    @abstractmethod
    def frames(self, latents: np.ndarray, shapes: Shapes) -> np.ndarray:
        """A tiny model's latents as frames [B, T, H, W, 3] in [0, 1]."""

    def text_dim(self, text_shape: tuple[int, int]) -> int:
        """Width of the tiny text encoder's embeddings for a head taking text of `text_shape`."""
        return text_shape[1]

    def encode_text(self, encoder: TinyTextEncoder, prompts: list[str]) -> np.ndarray:
        """The tiny text encoder's embeddings, as this family's head takes text."""
        return encoder.encode(prompts).numpy()


@dataclass(frozen=True)
class TinyClipAxes(TinyFormat):
    """Latents that are the clip with its axes reordered."""

    axes: tuple[int, ...]
    """Where the latent [B, ...] takes its axes from a clip [B, T, H, W, 3]."""

    def latents(self, clips: np.ndarray) -> np.ndarray:
        return (clips.transpose(self.axes) * 2.0 - 1.0).astype(np.float32)

    def frames(self, latents: np.ndarray, shapes: Shapes) -> np.ndarray:
        frames = latents.transpose(np.argsort(self.axes))
        return np.clip((frames + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


class FamilyAdapter(ABC):
    """One model family. Subclasses are stateless; presets are class data."""

    family: str
    layout: StageLayout
    modulation: str
    """The head output whose change TeaCache watches (its "modulated input")."""
    presets: dict[str, ModelPreset]
    aliases: dict[str, str] = {}
    """Short names for a family's default variant (`cogvideox` -> the preset it means)."""
    sencache_reference: SenCacheConventions
    """SenCache as the authors' code runs this family (the `reference` conventions)."""
    tiny_format: TinyFormat
    """How this family's tiny models hold clips as latents and take the tiny encoder's text."""
    image_components: tuple[str, ...] = ()
    """The pipeline's components that encode an image besides the VAE (Wan I2V's CLIP encoder)."""

    @abstractmethod
    def transformer_class(self) -> type[ModelMixin]:
        """The diffusers transformer class of this family."""

    @abstractmethod
    def latent_shape(self, preset: ModelPreset, shapes: Shapes) -> tuple[int, ...]:
        """Shape of one sample's latent (no batch dimension) for a video of `shapes`."""

    @abstractmethod
    def text_shape(self, preset: ModelPreset) -> tuple[int, int]:
        """(tokens, channels) of one prompt's text embedding as the transformer takes it."""

    @abstractmethod
    def split(self, transformer: nn.Module, preset: ModelPreset, shapes: Shapes) -> dict[str, nn.Module]:
        """The head, blocks and tail stages of `transformer` as modules with tensor-only I/O."""

    def scheduler_config(self, preset: ModelPreset) -> dict[str, Any]:
        """The diffusers scheduler (`_class_name` plus config) that the real pipeline uses: the
        preset's published one unless the family derives it."""
        return dict(preset.scheduler)

    def shard_blocks(self, blocks: nn.Module, preset: ModelPreset, shapes: Shapes, shard: SequenceShard) -> None:
        """Make this family's blocks module run on one rank's video tokens (sequence parallelism):
        its self-attention exchanges heads for tokens and its per-token tables keep the rank's
        tokens. BadInput where the heads or tokens do not divide by sp."""
        raise BadInput(f"the {self.family} family has no sequence parallelism", param="parallel")

    def reference_scheduler(self, config: dict[str, Any], preset: ModelPreset) -> dict[str, Any]:
        """The scheduler `config` (a bundle's, with `_class_name`) as the SenCache authors' code
        samples this family (a request's `sampling="reference"`); a family whose authors' runs use
        the pipeline's own scheduler has no such preset."""
        raise BadInput(
            f"sampling 'reference' is a preset of Wan (the authors sample its T2V runs with shift 5.0); the "
            f"authors' {self.family} runs use the pipeline's own scheduler, which is the engine's: use 'engine'",
            param="sampling",
        )

    @abstractmethod
    def pipeline_class(self) -> type[Any]:
        """diffusers' own pipeline of this family (a DiffusionPipeline; each takes its own components)."""

    def encode_prompts(self, pipeline, prompts: list[str], preset: ModelPreset) -> np.ndarray:
        """Text embeddings [B, tokens, channels] by the pipeline's own encode_prompt."""
        return pipeline_encode_prompt(self, pipeline, prompts, preset)[0].float().numpy()

    @abstractmethod
    def decode_real(self, latents: torch.Tensor, pipeline, preset: ModelPreset, shapes: Shapes) -> torch.Tensor:
        """The pipeline's own latent-to-video steps, up to the VAE output [B, 3, T, H, W]."""

    def dynamic_guidance(self, guidance: float, t: float, steps: int) -> float:
        """The guidance scale at timestep `t` under the pipeline's dynamic-CFG option, if it has one."""
        raise BadInput(
            f"dynamic_cfg is an option of CogVideoX's pipeline; {self.family} has no such schedule", param="dynamic_cfg"
        )

    def sampler(self, scheduler, steps: int, preset: ModelPreset, shapes: Shapes) -> Sampler:
        """The real pipeline's use of `scheduler` for a run of `steps` at `shapes`."""
        return Sampler(scheduler, steps)

    def initial_latents(self, generators: list[torch.Generator], preset: ModelPreset, shapes: Shapes) -> torch.Tensor:
        """The starting noise, one draw per sample from its own generator as the pipelines do with a
        list of generators, so a sample never depends on its batch."""
        shape = self.latent_shape(preset, shapes)
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    @property
    def takes_image(self) -> bool:
        """Whether the family's models start from an image (image-to-video): a request must give one."""
        return self.family in IMAGE_FAMILIES

    def condition_shapes(self, preset: ModelPreset, shapes: Shapes) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each tensor `encode_image` gives (the layout's `conditions` among
        them); none for text-to-video."""
        return {}

    def encode_image(
        self, image: np.ndarray, generators: list[torch.Generator], pipeline, preset: ModelPreset, shapes: Shapes
    ) -> dict[str, torch.Tensor]:
        """The `conditions` [B, ...] of one sample per generator from `image` (RGB uint8 [H, W, 3]
        of any size), by the pipeline's own preprocessing (resized to the video's size, as the
        pipeline does) and components (its VAE, its image encoder), drawing from the generators as
        the pipeline does before the starting noise."""
        raise BadInput(f"image: {preset.name} is a text-to-video model and takes none", param="image")

    def image_pixels(self, image: np.ndarray, pipeline, preset: ModelPreset, shapes: Shapes) -> torch.Tensor:
        """`image` as the pipeline's video processor gives it to its VAE: resized to the video's
        size, [1, 3, height, width] in [-1, 1]; BadInput where the weights folder has no VAE."""
        from PIL import Image

        if pipeline.vae is None:
            raise BadInput(
                f"image: {preset.name} encodes it with the VAE; the weights folder has no vae/", param="image"
            )
        with torch.no_grad():
            picture = Image.fromarray(image)
            return pipeline.video_processor.preprocess(picture, height=shapes.height, width=shapes.width).float()

    def image_draws(
        self, image: np.ndarray, generators: list[torch.Generator], pipeline, preset: ModelPreset, shapes: Shapes
    ) -> torch.Tensor:
        """One draw of the VAE's posterior of `image` per generator, [B, channels, 1, h, w], as the
        pipelines that sample it do (`retrieve_latents` per generator); the encoder runs once, since
        the pipeline encodes the same image for every sample."""
        pixels = self.image_pixels(image, pipeline, preset, shapes)
        with torch.no_grad():
            posterior = pipeline.vae.encode(pixels.unsqueeze(2)).latent_dist
            return torch.cat([posterior.sample(g) for g in generators])

    def start_latents(
        self, noise: torch.Tensor, conditions: dict[str, torch.Tensor], preset: ModelPreset, shapes: Shapes
    ) -> torch.Tensor:
        """The latents a run starts from: the starting noise, with what the image puts there where
        the family's pipeline puts the image in the latent itself (LTX-Video's first frame)."""
        return noise

    def preset(self, name: str) -> ModelPreset:
        try:
            return self.presets[name]
        except KeyError:
            raise BadInput(f"unknown {self.family} model {name!r} (known: {', '.join(self.presets)})") from None


def pipeline_encode_prompt(adapter: FamilyAdapter, pipeline, prompts: list[str], preset: ModelPreset) -> tuple:
    """What the pipeline's encode_prompt returns for `prompts`, without guidance."""
    if pipeline.text_encoder is None or pipeline.tokenizer is None:
        raise BadInput(
            f"{preset.name}: the weights folder has no tokenizer/ or text_encoder/; add them or pass prompt embeddings"
        )
    with torch.no_grad():
        return pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=adapter.text_shape(preset)[0], device="cpu"
        )


ADAPTERS: dict[str, FamilyAdapter] = {}
"""The adapter of each registered family, by family name."""

Adapter = TypeVar("Adapter", bound=type[FamilyAdapter])


def register_family(cls: Adapter) -> Adapter:
    """Class decorator: register one instance of the adapter `cls` under its family name."""
    adapter = cls()
    if adapter.family in ADAPTERS:
        raise ValueError(f"model family {adapter.family!r} is registered twice")
    ADAPTERS[adapter.family] = adapter
    return cls
