"""The build command: its arguments and its run, owned by the builder.

`python engine_builder/build_engine.py --model NAME ...` runs it on its own; `sencache build --model
NAME ...` is the same command inside the `sencache` command line (which adds these arguments and
runs `run_build`). Both take the same arguments and answer with the same help and errors, and
this module does not import the command line. Nothing heavy loads before the arguments are checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sencache.console.command import OURS, VERBOSE_HELP, CommandParser, run
from sencache.runtime.backends.registry import BACKENDS
from sencache.runtime.errors import BadInput
from sencache.runtime.files import BUNDLE, check_output

HELP = "export a model's stages into an engine bundle"
NAME = "sencache build"
MODELS = {
    "tiny-wan": "",
    "tiny-cogvideox": "",
    "tiny-ltx": "untrained",
    "wan2.1-t2v-1.3b": "",
    "wan2.1-t2v-14b": "",
    "tiny-wan2.2": "two experts",
    "wan2.2-t2v-a14b": "two experts",
    "wan2.2-ti2v-5b": "",
    "cogvideox": "= cogvideox1.5-5b",
    "cogvideox1.5-5b": "",
    "cogvideox-2b": "",
    "cogvideox-5b": "",
    "ltx-video": "= ltx-video-0.9.1",
    "ltx-video-0.9.1": "",
    "ltx-video-0.9.0": "",
    "wan2.1-i2v-14b-480p": "image-to-video",
    "wan2.1-i2v-14b-720p": "image-to-video",
    "wan2.2-i2v-a14b": "two experts, image-to-video",
    "cogvideox-5b-i2v": "image-to-video",
    "cogvideox1.5-5b-i2v": "image-to-video",
    "ltx-video-i2v": "= ltx-video-0.9.1-i2v",
    "ltx-video-0.9.1-i2v": "image-to-video",
    "ltx-video-0.9.0-i2v": "image-to-video",
    "tiny-wan-i2v": "image-to-video",
}
"""Every name `--model` takes (the family registry's presets and aliases, which import torch), with
what the help says of it: here so an unknown name is refused before anything heavy is imported."""
REDUCED_HELP = "with --load-format dummy, 9x128x128 unless one of the three is given"
"""What the help says of a dummy build's reduced resolution (engine_builder/sizing.py's REDUCED)."""


def add_build_arguments(b: argparse.ArgumentParser) -> None:
    """The build command's options, on `b`."""
    b.add_argument(
        "--model",
        required=True,
        help=", ".join(f"{name} ({note})" if note else name for name, note in MODELS.items()),
    )
    b.add_argument(
        "--weights",
        type=Path,
        help="diffusers-format folder with the real weights (needed by real models; tiny models use the bundled ones)",
    )
    b.add_argument(
        "--load-format",
        default="weights",
        help="weights (read --weights; tiny models: their bundled ones) | dummy (a real preset at its true "
        "shapes with random weights from --seed, no --weights: engineering and speed checks only)",
    )
    b.add_argument("--seed", type=int, default=0, help="with --load-format dummy: the seed of the random weights")
    b.add_argument(
        "--layers", type=int, help="with --load-format dummy: build this many transformer blocks (default: all)"
    )
    b.add_argument(
        "--group-blocks",
        type=int,
        help="with --load-format dummy: stream the build, this many blocks per ONNX graph and one group in "
        "memory at a time, 0 for one graph (default: chosen from the model's size and the available memory)",
    )
    b.add_argument("--backend", default="auto", help="|".join(("auto", *BACKENDS)))
    b.add_argument(
        "--precision",
        default="auto",
        help="auto|fp32|fp16|bf16|fp8 (auto: with --load-format dummy fp32 where the model's fp32 weights take "
        "at most half the available memory, else fp16; otherwise fp32)",
    )
    b.add_argument("--frames", type=int, help=f"video frames (default: the model's; {REDUCED_HELP})")
    b.add_argument("--height", type=int, help=f"video height in pixels (default: the model's; {REDUCED_HELP})")
    b.add_argument("--width", type=int, help=f"video width in pixels (default: the model's; {REDUCED_HELP})")
    b.add_argument("--max-batch", type=int, default=4, help="most samples per generate call")
    b.add_argument("--compute-capability", help="tensorrt-rtx target without a GPU, e.g. SM89 or SM120")
    b.add_argument(
        "--fp8-samples",
        type=int,
        default=4,
        help="with --precision fp8: uncached trajectories that calibrate the quantizer",
    )
    b.add_argument(
        "--fp8-prompts",
        type=Path,
        help="with --precision fp8: their prompts, one per line, taken in turn (default: the model's "
        "calibration prompts, as for `sencache calibrate`)",
    )
    b.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier bundle in --out" + OURS)


def run_build(args: argparse.Namespace) -> None:
    """Build the bundle the parsed arguments describe."""
    if args.model not in MODELS:
        raise BadInput(f"unknown model {args.model!r} (known: {', '.join(MODELS)})")
    check_output(args.out, BUNDLE, args.overwrite)
    if args.weights is not None:
        from sencache.runtime.weights import transformer_folder

        transformer_folder(args.weights)  # a wrong folder stops here, before the builder is imported
    from sencache.engine_builder.builder import BuildOptions, build

    build(
        BuildOptions(
            model=args.model,
            out=args.out,
            weights=args.weights,
            backend=args.backend,
            precision=args.precision,
            frames=args.frames,
            height=args.height,
            width=args.width,
            max_batch=args.max_batch,
            compute_capability=args.compute_capability,
            fp8_samples=args.fp8_samples,
            fp8_prompts=_fp8_prompts(args.fp8_prompts),
            load_format=args.load_format,
            seed=args.seed,
            layers=args.layers,
            group_blocks=args.group_blocks,
        )
    )


def _fp8_prompts(path: Path | None) -> tuple[str, ...] | None:
    from sencache.data.prompts import read_prompts

    return None if path is None else tuple(read_prompts(path))


def failure(error: Exception) -> str:
    """What an internal error is called: a failed export or check is a failed build."""
    from sencache.engine_builder.onnx_export import BuildFailed

    return "build failed" if isinstance(error, BuildFailed) else f"internal error ({type(error).__name__})"


def parser() -> CommandParser:
    """The build command on its own, as `sencache build` parses it."""
    p = CommandParser(prog=NAME)
    add_build_arguments(p)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=run_build, flag=p.flag)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the build command; its exit status is `sencache build`'s."""
    return run(NAME, parser().parse_args(argv), failure)


if __name__ == "__main__":
    sys.exit(main())
