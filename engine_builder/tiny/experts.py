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
import copy
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sencache.data import clips
from sencache.engine_builder.tiny.train import DEFAULT_ROOT, _lr
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    finals = []
    for expert in range(preset.experts):
        torch.manual_seed(seed + expert)
        rng = np.random.default_rng(seed + expert)
        low, high = noise_range(preset.boundary_ratio, expert)
        transformer = build_transformer(adapter, preset, source).train()
        stages = adapter.split(transformer, preset, shapes)
        ema = copy.deepcopy(transformer).eval()
        opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
        start, step, avg = time.time(), 0, None
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
            loss = torch.nn.functional.mse_loss(pred, noise - x0)
            for group in opt.param_groups:
                group["lr"] = _lr(lr, elapsed / budget, step, warmup=20)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), transformer.parameters(), strict=True):
                    e.lerp_(p, 1 - min(0.995, (1 + step) / (10 + step)))
            value = float(loss.detach())
            avg = value if avg is None else 0.95 * avg + 0.05 * value
            step += 1
            log.append({"expert": expert + 1, "step": step, "elapsed_s": round(elapsed, 1), "loss": round(value, 5)})
            print(f"expert {expert + 1} step {step:5d}  {elapsed:6.0f} s  loss {value:.4f}  avg {avg:.4f}", flush=True)
        ema.save_pretrained(tmp / weights_folder(expert), safe_serialization=True)
        finals.append({"expert": expert + 1, "sigmas": [low, high], "steps": step, "final_loss_avg": avg})
    shutil.copyfile(source / "text_encoder.safetensors", tmp / "text_encoder.safetensors")
    with open(tmp / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
    meta = {"model": model, "init": init, "seed": seed, "batch": batch, "lr": lr, "minutes": minutes}
    meta.update({"threads": threads, "torch": torch.__version__, "experts": finals, "text_encoder": "frozen"})
    (tmp / "train.json").write_text(json.dumps(meta, indent=1))
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    train_experts(args.model, args.init, out, args.minutes, args.batch, args.lr, args.seed, args.threads)


if __name__ == "__main__":
    main()
