"""Fine-tune a tiny image-to-video model from a trained tiny text-to-video one.

    python -m sencache.engine_builder.tiny.image --model tiny-wan-i2v --init tiny-wan --minutes 15 --threads 1

The image-to-video transformer starts from `--init`'s: its head, tail and first blocks (as many as
the preset has), the patch embedding's noise channels copied and its first-frame channels zero, the
image tokens' projections new with the value projection zero, so the first step computes `--init`'s
text-to-video output. It is then trained with `train.py`'s rectified-flow objective on the same
procedural clips, each clip's first frame (as 8-bit RGB, the way a request gives it) encoded by the
adapter as inference encodes a request's image: the model learns to continue the motion the prompt
describes from the frame it is given. The tiny text encoder is `--init`'s, frozen; prompts are
dropped 10% of the time for guidance (the image stays, as in the real pipeline's uncond call). The
EMA weights are saved in fp16 as `transformer/` (the carried tree stays small; the engine loads
them in its own precision) with `text_encoder.safetensors`, `loss.csv`, `loss.png` and
`train.json`, written atomically at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sencache.data import clips
from sencache.engine_builder.tiny.train import DEFAULT_ROOT, Trainer, _plot, replacing, write_log
from sencache.runtime.chain import module_runner, run_chain
from sencache.runtime.families import resolve
from sencache.runtime.families.base import FamilyAdapter, ModelPreset, Shapes
from sencache.runtime.families.parts import build_transformer
from sencache.runtime.tiny_text import TinyTextEncoder


def initialise(transformer: nn.Module, source: nn.Module) -> None:
    """Copy `source` (text-to-video) into `transformer` (image-to-video): every tensor of the same
    name and shape, the first blocks in order, the noise channels of the patch embedding; the
    first-frame channels and the image value projections zero (see the module docstring)."""
    own, theirs = transformer.state_dict(), source.state_dict()
    with torch.no_grad():
        for name, tensor in own.items():
            if name.endswith(("add_v_proj.weight", "add_v_proj.bias")):
                tensor.zero_()
            elif name == "patch_embedding.weight":
                channels = theirs[name].shape[1]
                tensor.zero_()
                tensor[:, :channels] = theirs[name]
            elif name in theirs and theirs[name].shape == tensor.shape:
                tensor.copy_(theirs[name])
            elif ".add_" not in name and "image_embedder" not in name and "norm_added" not in name:
                raise SystemExit(f"{name}: no tensor of {list(tensor.shape)} in the initial model to start from")


def first_frame_conditions(
    adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes, frames: np.ndarray
) -> dict[str, torch.Tensor]:
    """The head's image inputs of each clip in `frames` [B, T, H, W, 3] in [0, 1]: its first frame as
    the uint8 RGB a request carries, encoded by the adapter as a request's image."""
    rows = []
    for clip in frames:
        image = np.round(clip[0] * 255.0).astype(np.uint8)
        rows.append(adapter.encode_image(image, [torch.Generator()], None, preset, shapes))
    return {name: torch.cat([row[name] for row in rows]) for name in adapter.layout.conditions}


def train_image_model(
    model: str, init: str, out: Path, minutes: float, batch: int, lr: float, seed: int, threads: int
) -> None:
    """Fine-tune `model` from `init` (see the module docstring) and save it to `out`."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    adapter, preset = resolve(model)
    if not (preset.tiny and adapter.takes_image):
        raise SystemExit(f"{model} is not a tiny image-to-video model")
    source_adapter, source_preset = resolve(init)
    source = DEFAULT_ROOT / init
    transformer = build_transformer(adapter, preset, None)
    initialise(transformer, build_transformer(source_adapter, source_preset, source))
    transformer.train()
    shapes = Shapes(preset.frames, preset.height, preset.width, batch)
    stages = adapter.split(transformer, preset, shapes)
    text_encoder = TinyTextEncoder(dim=adapter.tiny_format.text_dim(adapter.text_shape(preset))).eval()
    text_encoder.load_state_dict(load_file(str(source / "text_encoder.safetensors")))
    trainer = Trainer([transformer], lr, warmup=20, ema=0.995, avg_weight=0.05)
    log: list[dict] = []
    start = time.time()
    budget = minutes * 60
    while (elapsed := time.time() - start) < budget:
        prompts, frames = clips.batch(rng, batch)
        text = torch.from_numpy(
            adapter.tiny_format.encode_text(text_encoder, ["" if rng.random() < 0.1 else p for p in prompts])
        )
        x0 = torch.from_numpy(adapter.tiny_format.latents(frames))
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(len(x0)))
        s = sigma.view((-1,) + (1,) * (x0.dim() - 1))
        inputs = {"latent": (1 - s) * x0 + s * noise, "timestep": sigma * 1000.0, "text": text}
        inputs.update(first_frame_conditions(adapter, preset, shapes, frames))
        pred = run_chain(module_runner(stages, adapter.layout), adapter.layout, inputs).noise
        value = trainer.update(torch.nn.functional.mse_loss(pred, noise - x0), elapsed / budget)
        step, avg = trainer.step, trainer.avg
        log.append(
            {
                "step": step,
                "elapsed_s": round(elapsed, 1),
                "loss": round(value, 5),
                "loss_avg": round(avg, 5),
                "lr": round(trainer.current_lr, 7),
            }
        )
        print(f"step {step:5d}  {elapsed:6.0f} s  loss {value:.4f}  avg {avg:.4f}", flush=True)
    ema, step, avg = trainer.averages[0], trainer.step, trainer.avg
    with replacing(out) as tmp:
        (tmp / "transformer").mkdir()
        ema.save_config(tmp / "transformer")
        weights = {k: v.to(torch.float16).contiguous() for k, v in ema.state_dict().items()}
        save_file(weights, str(tmp / "transformer" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(source / "text_encoder.safetensors", tmp / "text_encoder.safetensors")
        write_log(tmp / "loss.csv", log)
        _plot(log, tmp / "loss.png")
        meta = {"model": model, "init": init, "seed": seed, "batch": batch, "lr": lr, "minutes": minutes}
        meta.update({"threads": threads, "torch": torch.__version__, "steps": step, "elapsed_s": round(elapsed, 1)})
        meta.update({"final_loss_avg": avg, "text_encoder": "frozen", "cfg_dropout": 0.1, "ema": 0.995})
        meta.update({"weights_dtype": "float16"})
        (tmp / "train.json").write_text(json.dumps(meta, indent=1))
    print(f"saved {out} after {step} steps")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-wan-i2v")
    parser.add_argument("--init", default="tiny-wan", help="the trained tiny text-to-video model it starts from")
    parser.add_argument("--out", type=Path, default=None, help="default: the bundled tiny_models/<model> folder")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    out = args.out or DEFAULT_ROOT / args.model
    train_image_model(args.model, args.init, out, args.minutes, args.batch, args.lr, args.seed, args.threads)


if __name__ == "__main__":
    main()
