"""Build an engine bundle: load the model, split it, export and validate each stage, write it.

The bundle is assembled in a temporary folder beside `--out` and moved into place only when every
stage exported and matched PyTorch, so an interrupted or failed build never leaves a half bundle.
`build` is the recipe; the precision (engine_builder/precision.py) and the backend's build target
(engine_builder/targets.py) supply the steps that differ.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from sencache.data.prompts import check_prompts
from sencache.engine_builder.dummy import LAYERS_KEY, dummy_config, dummy_transformer
from sencache.engine_builder.memory import peak_rss
from sencache.engine_builder.onnx_export import StageSpec
from sencache.engine_builder.precision import Precision, precision
from sencache.engine_builder.sizing import BUILD_SHARE, REDUCED, STREAMABLE, Sizing, choose, model_size
from sencache.engine_builder.targets import OnnxTarget, target
from sencache.runtime.bundle import BASELINES, KIND, write_manifest
from sencache.runtime.cache.baselines import BaselineTables
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import stage_name, weights_folder
from sencache.runtime.families import FamilyAdapter, ModelPreset, Shapes, StageLayout, resolve
from sencache.runtime.families.parts import build_transformer, check_weights, example_inputs
from sencache.runtime.files import check_replaceable, staged_folder, write_atomic
from sencache.runtime.manifest import (
    MAX_BATCH,
    MAX_FRAMES,
    MAX_PIXELS,
    BundleShapes,
    Defaults,
    Manifest,
    Stage,
    TextEncoderSpec,
)
from sencache.runtime.memory import available_bytes
from sencache.runtime.tiny_text import TinyTextEncoder

TINY_MODELS = Path(__file__).resolve().parent / "tiny_models"
LOAD_FORMATS = ("weights", "dummy")
DUMMY_TEXT = TextEncoderSpec(
    "dummy",
    note="dummy weights: no text encoder or VAE (their real sizes would dominate the build); prompt "
    "embeddings are drawn from each prompt at the real text shape, frames are blank",
)
Log = Callable[[str], None]
STREAMING_BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx")
"""The backends whose builds stream block groups (`auto` builds for ONNX Runtime; TensorRT compiles
one engine per group)."""


@dataclass(frozen=True)
class BuildOptions:
    model: str
    out: Path
    weights: Path | None = None
    backend: str = "auto"
    precision: str = "auto"
    """fp32|fp16|bf16|fp8, or `auto`: a dummy build's chosen by engine_builder/sizing.py, else fp32."""
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    max_batch: int = 4
    compute_capability: str | None = None
    fp8_samples: int = 4
    """Uncached trajectories that calibrate the FP8 quantizer."""
    fp8_prompts: tuple[str, ...] | None = None
    """Their prompts, taken in turn (None: the model's default calibration prompts)."""
    load_format: str = "weights"
    """`weights`: read `weights` (or a tiny model's bundled ones); `dummy`: random weights from `seed`."""
    seed: int = 0
    """The dummy weights' seed."""
    layers: int | None = None
    """With dummy weights: this many transformer blocks instead of the preset's (None: all)."""
    group_blocks: int | None = None
    """With dummy weights: stream the build, this many blocks per ONNX graph, one group in memory at
    a time (0: the blocks in one graph; None: chosen by engine_builder/sizing.py)."""

    def check(self) -> BuildPlan:
        """Resolve and check every option before any work; BadInput names the first bad one. A
        dummy build's unset precision, grouping and resolution are chosen here (`BuildPlan.sizing`)."""
        adapter, preset = resolve(self.model)
        preset = self._dummy_preset(preset)
        sizing = self._sizing(adapter, preset) if self.dummy else None
        if sizing is not None:
            frames, height, width = sizing.resolution
            sized = dataclasses.replace(
                self,
                precision=sizing.precision,
                group_blocks=sizing.group_blocks,
                frames=frames,
                height=height,
                width=width,
            )
        else:
            sized = dataclasses.replace(self, precision="fp32" if self.precision == "auto" else self.precision)
        return sized._check(adapter, preset, sizing)

    def _sizing(self, adapter: FamilyAdapter, preset: ModelPreset) -> Sizing:
        """A dummy build's sizing: the options given, the rest chosen from the model's size and the
        memory available now."""
        given = (self.frames, self.height, self.width)
        resolution = None
        if given != (None, None, None):
            resolution = tuple(r if g is None else g for g, r in zip(given, REDUCED, strict=True))
        return choose(
            model_size(adapter, preset.config),
            available_bytes(torch.device("cpu")),
            None if self.precision == "auto" else self.precision,
            self.group_blocks,
            resolution,  # type: ignore[arg-type]  # three ints, zipped
            streamable=self.backend in STREAMING_BACKENDS and preset.experts == 1,
        )

    def _check(self, adapter: FamilyAdapter, preset: ModelPreset, sizing: Sizing | None) -> BuildPlan:
        """The rest of `check`, on options with their precision, grouping and resolution settled."""
        streams = self.backend in STREAMING_BACKENDS and self.precision in STREAMABLE
        if self.group_blocks is not None and not streams:
            raise BadInput(
                f"group_blocks streams {', '.join(STREAMABLE)} builds for {', '.join(STREAMING_BACKENDS)}; "
                f"not backend {self.backend} in {self.precision}",
                param="group_blocks",
            )
        backend = target(self.backend)
        backend.check(self)
        chosen = precision(self.precision)
        chosen.check(backend.name)
        shapes = Shapes(
            preset.frames if self.frames is None else self.frames,
            preset.height if self.height is None else self.height,
            preset.width if self.width is None else self.width,
            self.max_batch,
        )
        for name, value, high in (
            ("frames", shapes.frames, MAX_FRAMES),
            ("height", shapes.height, MAX_PIXELS),
            ("width", shapes.width, MAX_PIXELS),
            ("max_batch", shapes.max_batch, MAX_BATCH),
            ("fp8_samples", self.fp8_samples, 64),
        ):
            if not 1 <= value <= high:
                raise BadInput(f"{name} must be in [1, {high}], got {value}", param=name)
        if preset.tiny and (shapes.frames, shapes.height, shapes.width) != (preset.frames, preset.height, preset.width):
            raise BadInput(
                f"{preset.name} was trained on {preset.frames}x{preset.height}x{preset.width} clips; "
                f"other sizes are not supported"
            )
        adapter.latent_shape(preset, shapes)  # sizes the family cannot take are refused here, before any work
        if self.fp8_prompts is not None:
            check_prompts(self.fp8_prompts, preset.tiny, preset.name)
        if preset.experts > 1 and (self.group_blocks is not None or self.precision == "fp8"):
            param = "group_blocks" if self.group_blocks is not None else "precision"
            raise BadInput(
                f"{param}: {preset.name} has {preset.experts} experts; streamed (group_blocks) and fp8 builds "
                f"take one: build it unstreamed in fp32, fp16 or bf16",
                param=param,
            )
        if preset.experts > 1 and sizing is not None and sizing.estimated_peak > BUILD_SHARE * sizing.available:
            raise BadInput(
                f"layers: give fewer blocks to check {preset.name} at its true width here: one expert in one graph "
                f"needs about {sizing.estimated_peak / 2**30:.0f} GiB to build, over {BUILD_SHARE:.0%} of the "
                f"{sizing.available / 2**30:.1f} GiB available, and a model of {preset.experts} experts is not "
                "streamed",
                param="layers",
            )
        weights = None if self.dummy else _weights_folder(preset, self.weights)
        return BuildPlan(self, adapter, preset, backend, chosen, shapes, weights, sizing)

    @property
    def dummy(self) -> bool:
        return self.load_format == "dummy"

    def _dummy_preset(self, preset: ModelPreset) -> ModelPreset:
        """`preset` as the load format builds it (dummy: `layers` blocks); BadInput for options that
        do not go together."""
        if self.load_format not in LOAD_FORMATS:
            raise BadInput(
                f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}", param="load_format"
            )
        if not self.dummy:
            for name in ("layers", "group_blocks"):
                if getattr(self, name) is not None:
                    raise BadInput(f"{name} applies to load_format dummy", param=name)
            return preset
        if self.weights is not None:
            raise BadInput("weights and load_format dummy exclude each other: dummy weights are drawn", param="weights")
        if preset.tiny:
            raise BadInput(
                f"model {preset.name} ships its own weights; load_format dummy is for real presets", param="model"
            )
        if not 0 <= self.seed < 2**31:
            raise BadInput(f"seed must be in [0, 2**31), got {self.seed}", param="seed")
        preset = dataclasses.replace(preset, config=dummy_config(preset, self.layers))
        if self.group_blocks is not None:
            layers = preset.config[LAYERS_KEY]
            if not 0 <= self.group_blocks <= layers:
                raise BadInput(
                    f"group_blocks must be in [0, {layers}] (0: one graph), got {self.group_blocks}",
                    param="group_blocks",
                )
        return preset


@dataclass(frozen=True)
class BuildPlan:
    """Checked options: what to build, for which target, in which precision."""

    options: BuildOptions
    adapter: FamilyAdapter
    preset: ModelPreset
    target: OnnxTarget
    precision: Precision
    shapes: Shapes
    weights: Path | None
    sizing: Sizing | None = None
    """A dummy build's choice of precision, grouping and resolution (None: not a dummy build)."""


@dataclass
class LoadedModel:
    """The transformer as built: its config, its fp32 stages and its stages in the build's precision."""

    adapter: FamilyAdapter
    preset: ModelPreset
    """The preset with the weights' own config."""
    shapes: Shapes
    precision: Precision
    transformer: nn.Module
    """In the build's precision."""
    reference: dict[str, nn.Module]
    stages: dict[str, nn.Module]
    specs: dict[str, StageSpec]
    widened: dict[str, nn.Module] | None = None
    """The stages widened to fp32 with the same low-precision weights (bf16 validation), made on use."""
    expert: int = 0
    """Which expert's transformer this is (runtime/experts.py; 0 for a one-expert model)."""

    def stage_inputs(self, batch: int, seed: int) -> dict[str, torch.Tensor]:
        """Inputs for every stage: random head inputs (latent and text in the build's dtype,
        timestep fp32) and the head's real outputs."""
        inputs = example_inputs(self.adapter, self.preset, self.shapes, batch, seed)
        inputs = {k: v if k == "timestep" else v.to(self.precision.dtype) for k, v in inputs.items()}
        with torch.no_grad():
            outputs = self.stages["head"](**inputs)
        inputs.update(zip(self.adapter.layout.head_outputs, outputs, strict=True))
        return inputs


def stage_specs(layout: StageLayout) -> dict[str, StageSpec]:
    """Names of each stage's inputs and outputs, as exported and as the runtime feeds them."""
    return {
        stage: StageSpec(stage, inputs, outputs, layout.shared if stage == "blocks" else ())
        for stage, (inputs, outputs) in layout.stage_io.items()
    }


def build(options: BuildOptions, log: Log = print) -> Path:
    """Build the bundle described by `options` into `options.out`; returns its path."""
    check_replaceable(options.out, KIND)
    plan = options.check()
    if plan.sizing is not None:
        log(plan.sizing.line())
    started = time.perf_counter()
    with staged_folder(options.out, KIND) as folder:
        _build_into(folder, plan, log)
    log(f"bundle written to {options.out} in {time.perf_counter() - started:.1f} s")
    return Path(options.out)


def _build_into(folder: Path, plan: BuildPlan, log: Log) -> None:
    """Export, validate and write the bundle into the (partial) `folder`."""
    if plan.options.group_blocks is not None:
        from sencache.engine_builder.streaming import write_streamed

        streamed = write_streamed(plan, folder, log, lambda first, layers: _load_dummy(plan, log, first, layers))
        preset, validation, groups = streamed
        manifest = _manifest(plan, preset, stage_specs(plan.adapter.layout), folder, validation, groups)
    else:
        validation: dict[str, Any] = {}
        for expert in range(plan.preset.experts):  # one expert's transformer in memory at a time
            model = _load(plan, log, expert)
            if expert == 0:
                preset, specs = model.preset, model.specs
            elif model.preset.config != preset.config:
                raise BadInput(
                    f"weights {plan.weights}: {weights_folder(expert)}/ has another config than transformer/",
                    param="weights",
                )
            validation.update(plan.target.write_stages(model, folder, log))
            chain = plan.precision.chain_error(model, folder) if plan.target.exports_onnx else None
            if chain is not None:
                validation[stage_name("chain_vs_fp32", expert)] = chain
                log(
                    f"  head -> blocks -> tail in {plan.precision.name} vs fp32 PyTorch: "
                    f"relative L2 {chain['rel_l2']:.2e}"
                )
            del model  # the post-build steps read the graphs back: the weights must not be held twice
            gc.collect()
        manifest = _manifest(plan, preset, specs, folder, validation)
    log(f"stages exported and validated ({peak_rss()})")
    manifest = plan.precision.post_step(plan, manifest, folder, log)
    manifest = plan.target.post_build(plan, manifest, folder, log)
    _write_baselines(preset, folder)
    write_manifest(folder, manifest)
    _log_cache_memory(manifest.shapes, plan.precision, log)


def _load(plan: BuildPlan, log: Log, expert: int = 0) -> LoadedModel:
    """The transformer (of `expert`) with the weights' config, split in fp32 and in the build's precision."""
    preset = plan.preset
    if plan.options.dummy:
        return _load_dummy(plan, log, expert=expert)
    which = f" expert {expert + 1} of {preset.experts}" if preset.experts > 1 else ""
    log(f"loading {preset.name}{which} ({preset.description})")
    torch.manual_seed(expert)  # an untrained tiny model's random weights are the same on every build
    transformer = build_transformer(plan.adapter, preset, plan.weights, expert=expert)
    preset = dataclasses.replace(preset, config=dict(preset.config, **_jsonable(dict(transformer.config))))
    lowered = plan.precision.lower(transformer)
    return _loaded(plan, preset, transformer, lowered, expert)


def _load_dummy(
    plan: BuildPlan, log: Log, first_block: int = 0, layers: int | None = None, expert: int = 0
) -> LoadedModel:
    """The transformer with dummy weights: drawn once in fp32 (the reference) and, for a lower
    precision, drawn again straight in it (the same values rounded) instead of copied and cast; a
    target that validates no graph (torch) gets the second draw alone, as its own reference.
    With `layers`, only blocks `first_block` to `first_block + layers` (a streamed build's group);
    the preset keeps the whole model's config. A second expert draws from the next seed."""
    preset, seed = plan.preset, plan.options.seed + expert
    config = dict(preset.config) if layers is None else dict(preset.config, **{LAYERS_KEY: layers})
    if layers is None:
        log(
            f"drawing dummy weights for {preset.name} ({config.get(LAYERS_KEY)} blocks, seed {seed}): "
            f"RANDOM weights, for engineering and speed checks only"
        )
    dtype = plan.precision.dtype
    lowered = dummy_transformer(plan.adapter, config, seed, dtype, first_block=first_block)
    transformer = (
        lowered
        if dtype == torch.float32 or not plan.target.exports_onnx
        else dummy_transformer(plan.adapter, config, seed, first_block=first_block)
    )
    merged = dict(preset.config, **_jsonable(dict(transformer.config)))
    preset = dataclasses.replace(preset, config=dict(merged, **{LAYERS_KEY: preset.config[LAYERS_KEY]}))
    return _loaded(plan, preset, transformer, lowered, expert)


def _loaded(
    plan: BuildPlan, preset: ModelPreset, transformer: nn.Module, lowered: nn.Module, expert: int = 0
) -> LoadedModel:
    """The fp32 `transformer` and its `lowered` twin, split into stages."""
    return LoadedModel(
        plan.adapter,
        preset,
        plan.shapes,
        plan.precision,
        lowered,
        plan.adapter.split(transformer, preset, plan.shapes),
        plan.adapter.split(lowered, preset, plan.shapes),
        stage_specs(plan.adapter.layout),
        expert=expert,
    )


def _manifest(
    plan: BuildPlan,
    preset: ModelPreset,
    specs: dict[str, StageSpec],
    folder: Path,
    validation: dict[str, Any],
    groups: int = 1,
) -> Manifest:
    """The bundle's manifest, before post-build steps and the file listing; `groups`: the graphs of
    the blocks stage (more than one in a streamed build)."""
    adapter, shapes = plan.adapter, plan.shapes
    parts = tuple(plan.target.group_file(i) for i in range(1, groups))
    return Manifest(
        model=preset.name,
        family=adapter.family,
        tiny=preset.tiny,
        trained=preset.trained,
        config=preset.config,
        shapes=BundleShapes(
            shapes.frames,
            shapes.height,
            shapes.width,
            shapes.max_batch,
            tuple(adapter.latent_shape(preset, shapes)),
            tuple(adapter.text_shape(preset)),
            tuple(_stream_shapes(adapter, preset, shapes)),
        ),
        precision=plan.precision.name,
        backend=plan.target.name,
        stages={
            stage_name(name, expert): Stage(
                plan.target.stage_file(name, expert), spec.inputs, spec.outputs, parts if name == "blocks" else ()
            )
            for expert in range(preset.experts)
            for name, spec in specs.items()
        },
        scheduler=_scheduler_config(adapter, preset, plan.weights),
        defaults=Defaults.parse(
            {
                "steps": preset.steps,
                "guidance": preset.guidance,
                **({} if preset.guidance_2 is None else {"guidance_2": preset.guidance_2}),
                **preset.cache_defaults,
            }
        ),
        text_encoder=DUMMY_TEXT if plan.options.dummy else _copy_text_encoder(adapter, preset, plan.weights, folder),
        validation=validation,
        tools=_tools(),
        weights_source=str(plan.weights) if plan.weights else None,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        weights=plan.target.weights,
        dummy_seed=plan.options.seed if plan.options.dummy else None,
        sizing=None if plan.sizing is None else plan.sizing.to_json(),
        experts=preset.experts,
        boundary=None
        if preset.boundary_ratio is None
        else preset.boundary_ratio * _train_timesteps(adapter, preset, plan),
    )


def _train_timesteps(adapter: FamilyAdapter, preset: ModelPreset, plan: BuildPlan) -> float:
    """The scheduler's num_train_timesteps, which WanPipeline scales `boundary_ratio` by."""
    return float(_scheduler_config(adapter, preset, plan.weights).get("num_train_timesteps", 1000))


def _write_baselines(preset: ModelPreset, folder: Path) -> None:
    """The published TeaCache / MagCache constants of the model, if any."""
    if preset.published_baselines is None:
        return
    coefficients, ratios = preset.published_baselines
    source = (
        "published constants (TeaCache @7c10efc4, MagCache @df81cb18; MagCache has none for this model)"
        if ratios is None
        else "published constants (TeaCache @7c10efc4, MagCache @df81cb18)"
    )
    tables = BaselineTables(coefficients, ratios, {"model": preset.name, "source": source})
    write_atomic(folder / BASELINES, tables.to_bytes())


def _log_cache_memory(shapes: BundleShapes, chosen: Precision, log: Log) -> None:
    cache_bytes = chosen.itemsize * (
        shapes.max_rows * sum(int(np.prod(s)) for s in shapes.streams) + shapes.max_batch * int(np.prod(shapes.latent))
    )
    log(
        f"cache memory at max batch {shapes.max_batch}: {cache_bytes / 2**20:.1f} MiB "
        f"{str(chosen.dtype).split('.')[-1]} (residuals of {shapes.max_rows} rows and {shapes.max_batch} anchors)"
    )


def _weights_folder(preset: ModelPreset, weights: Path | None) -> Path | None:
    """The weights folder the build reads: the one given (checked to hold a diffusers transformer),
    the bundled weights of a trained tiny model, or None for an untrained one; a real model
    without weights is refused here, before anything is constructed."""
    check_weights(preset, weights)
    if weights is not None:
        return Path(weights)
    if preset.tiny and preset.trained:
        folder = TINY_MODELS / preset.name
        if not (folder / "transformer").is_dir():
            raise BadInput(
                f"{preset.name}: the bundled weights are missing from {folder}; train them with "
                f"`python -m sencache.engine_builder.tiny.train --model {preset.name}`"
            )
        return folder
    return None


def _tools() -> dict[str, str]:
    tools = {"python": platform.python_version()}
    for dist in ("sencache", "torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            tools[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            tools[dist] = "absent"
    return tools


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def _scheduler_config(adapter: FamilyAdapter, preset: ModelPreset, weights: Path | None) -> dict[str, Any]:
    """The scheduler a real weights folder ships (what its pipeline would load), else the preset's."""
    path = None if weights is None or preset.tiny else weights / "scheduler" / "scheduler_config.json"
    if path is None or not path.is_file():
        return adapter.scheduler_config(preset)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"weights {weights}: unreadable {path.name}: {e}", param="weights") from None
    import diffusers

    if not hasattr(diffusers, str(config.get("_class_name"))):
        raise BadInput(
            f"weights {weights}: scheduler {config.get('_class_name')!r} is not a diffusers scheduler", param="weights"
        )
    return {k: v for k, v in config.items() if k == "_class_name" or not k.startswith("_")}


def _stream_shapes(adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes) -> list[tuple[int, ...]]:
    """Per-row shapes of the cached streams, from the head on the meta device (no memory)."""
    with torch.device("meta"):
        transformer = build_transformer(adapter, preset, None, device="meta")
        stages = adapter.split(transformer, preset, shapes)
        outputs = dict(
            zip(adapter.layout.head_outputs, stages["head"](**example_inputs(adapter, preset, shapes, 1)), strict=True)
        )
    return [tuple(outputs[s].shape[1:]) for s in adapter.layout.streams]


def _copy_text_encoder(
    adapter: FamilyAdapter, preset: ModelPreset, weights: Path | None, folder: Path
) -> TextEncoderSpec:
    """A tiny model's text encoder, copied into the bundle (or made, untrained); a real model's
    loads from its weights folder."""
    if not preset.tiny:
        return TextEncoderSpec(
            "diffusers",
            source=str(weights) if weights else None,
            note="tokenizer, text encoder and VAE load from the weights folder through diffusers' pipeline",
        )
    spec = TextEncoderSpec(
        "tiny",
        file="text_encoder.safetensors",
        dim=adapter.tiny_format.text_dim(adapter.text_shape(preset)),
        untrained=not preset.trained,
    )
    if preset.trained:
        shutil.copyfile(weights / "text_encoder.safetensors", folder / spec.file)
        return spec
    torch.manual_seed(0)
    encoder = TinyTextEncoder(dim=spec.dim)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / spec.file))
    return spec
