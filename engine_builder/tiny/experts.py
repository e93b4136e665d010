"""Train a tiny two-expert model (the shape of Wan 2.2 A14B) from a trained tiny model.

    python -m sencache.engine_builder.tiny.experts --model tiny-wan2.2 --init tiny-wan --minutes 6

Each expert starts from the trained `--init` model's transformer (as Wan 2.2's experts start from
one model) and is fine-tuned for half the minutes with `train.py`'s rectified-flow objective on the
same procedural clips, on its own noise levels only: the high-noise expert on sigma >= the preset's
boundary ratio (timesteps >= the boundary), the low-noise expert below. The tiny text encoder is
`--init`'s, frozen, so both experts read the same text. The EMA weights are saved as
`transformer/` and `transformer_2/` with `text_encoder.safetensors`, `loss.csv` and `train.json`,
written atomically when both are done.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sencache.data import clips
from sencache.engine_builder.tiny.train import DEFAULT_ROOT, Trainer, replacing, write_log
from sencache.runtime.chain import module_runner, run_chain
from sencache.runtime.experts import weights_folder
from sencache.runtime.families import resolve
from sencache.runtime.families.base import Shapes
from sencache.runtime.families.parts import build_transformer
from sencache.runtime.tiny_grammar import tokenize
from sencache.runtime.tiny_text import TinyTextEncoder


def noise_range(boundary: float, expert: int) -> tuple[float, float]:
    """The sigmas expert `expert` is trained on: [boundary, 1] for the first, [0, boundary) below."""
    return (boundary, 1.0) if expert == 0 else (0.0, boundary)


def train_experts(
    model: str, init: str, out: Path, minutes: float, batch: int, lr: float, seed: int, threads: int
) -> None:
    """Fine-tune each expert of `model` from `init` (see the module docstring) and save them to `out`."""
    torch.set_num_threads(threads)
    adapter, preset = resolve(model)
    if preset.boundary_ratio is None or not preset.tiny:
        raise SystemExit(f"{model} is not a tiny model of two experts")
    source = DEFAULT_ROOT / init
    shapes = Shapes(preset.frames, preset.height, preset.width, batch)
    text_encoder = TinyTextEncoder(dim=adapter.tiny_format.text_dim(adapter.text_shape(preset))).eval()
    text_encoder.load_state_dict(load_file(str(source / "text_encoder.safetensors")))
    empty = tokenize("")
    log: list[dict] = []
    finals, averages = [], []
    for expert in range(preset.experts):
        torch.manual_seed(seed + expert)
        rng = np.random.default_rng(seed + expert)
        low, high = noise_range(preset.boundary_ratio, expert)
        transformer = build_transformer(adapter, preset, source).train()
        stages = adapter.split(transformer, preset, shapes)
        trainer = Trainer([transformer], lr, warmup=20, ema=0.995, avg_weight=0.05)
        start = time.time()
        budget = minutes * 30  # seconds: half the minutes each
        while (elapsed := time.time() - start) < budget:
            prompts, frames = clips.batch(rng, batch)
            ids = torch.tensor([empty if rng.random() < 0.1 else tokenize(p) for p in prompts])
            x0 = torch.from_numpy(adapter.tiny_format.latents(frames))
            noise = torch.randn_like(x0)
            sigma = low + (high - low) * torch.sigmoid(torch.randn(len(x0)))
            s = sigma.view((-1,) + (1,) * (x0.dim() - 1))
            with torch.no_grad():
                text = text_encoder(ids)
            pred = run_chain(
                module_runner(stages, adapter.layout),
                adapter.layout,
                {"latent": (1 - s) * x0 + s * noise, "timestep": sigma * 1000.0, "text": text},
            ).noise
            value = trainer.update(torch.nn.functional.mse_loss(pred, noise - x0), elapsed / budget)
            step, avg = trainer.step, trainer.avg
            log.append({"expert": expert + 1, "step": step, "elapsed_s": round(elapsed, 1), "loss": round(value, 5)})
            print(f"expert {expert + 1} step {step:5d}  {elapsed:6.0f} s  loss {value:.4f}  avg {avg:.4f}", flush=True)
        averages.append(trainer.averages[0])
        finals.append(
            {"expert": expert + 1, "sigmas": [low, high], "steps": trainer.step, "final_loss_avg": trainer.avg}
        )
    with replacing(out) as tmp:
        for expert, ema in enumerate(averages):
            ema.save_pretrained(tmp / weights_folder(expert), safe_serialization=True)
        shutil.copyfile(source / "text_encoder.safetensors", tmp / "text_encoder.safetensors")
        write_log(tmp / "loss.csv", log)
        meta = {"model": model, "init": init, "seed": seed, "batch": batch, "lr": lr, "minutes": minutes}
        meta.update({"threads": threads, "torch": torch.__version__, "experts": finals, "text_encoder": "frozen"})
        (tmp / "train.json").write_text(json.dumps(meta, indent=1))
    print(f"saved {out}: " + ", ".join(f"expert {f['expert']} {f['steps']} steps" for f in finals))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-wan2.2")
    parser.add_argument("--init", default="tiny-wan", help="the trained tiny model both experts start from")
    parser.add_argument("--out", type=Path, default=None, help="default: the bundled tiny_models/<model> folder")
    parser.add_argument("--minutes", type=float, default=6.0, help="in all: half for each expert")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    out = args.out or DEFAULT_ROOT / args.model
    train_experts(args.model, args.init, out, args.minutes, args.batch, args.lr, args.seed, args.threads)


if __name__ == "__main__":
    main()
