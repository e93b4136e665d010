"""Train a bundled tiny model with the rectified-flow objective on procedural clips.

    python -m sencache.engine_builder.tiny.train --model tiny-wan --minutes 75

The real diffusers transformer of the family (at its tiny preset) and the tiny text encoder are
trained together, through the same head / blocks / tail split the engine runs, with the objective
of the family's scheduler: for flow prediction (Wan) x_t = (1 - s) x0 + s n and the model predicts
n - x0 at timestep 1000 s, s logit-normal; for v-prediction (CogVideoX) x_t = sqrt(a) x0 +
sqrt(1 - a) n with a = alphas_cumprod[t] of the scheduler, t uniform in 0..999, and the model
predicts v = sqrt(a) n - sqrt(1 - a) x0. Prompts are dropped 10% of the time for guidance.
The exponential moving average of the weights is what gets saved, as a diffusers-format folder
(`transformer/`), `text_encoder.safetensors`, `loss.csv`, `loss.png` and `train.json`, written
atomically every few minutes so an interrupted run leaves the last good checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sencache.data import clips
from sencache.runtime.chain import module_runner, run_chain
from sencache.runtime.families import resolve
from sencache.runtime.families.base import Shapes
from sencache.runtime.families.parts import build_transformer, make_scheduler
from sencache.runtime.tiny_grammar import tokenize
from sencache.runtime.tiny_text import TinyTextEncoder

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "tiny_models"


def _lr(base: float, frac: float, step: int, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 5% over the time budget."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


class Trainer:
    """The update step of every tiny training script: AdamW (weight decay 0.01) on the parameters of
    `modules` at `_lr`'s schedule, gradients clipped to norm 1, an exponential moving average of
    each module's weights (`averages`, what gets saved; its decay ramps up to `ema` over the first
    steps when `ramp`), and a running mean of the loss (`avg`, `avg_weight` on each new loss)."""

    def __init__(
        self,
        modules: list[nn.Module],
        lr: float,
        warmup: int,
        ema: float,
        avg_weight: float,
        step: int = 0,
        ramp: bool = True,
    ) -> None:
        self.modules = modules
        self.params = [p for module in modules for p in module.parameters()]
        self.averages = [copy.deepcopy(module).eval() for module in modules]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
        self.lr, self.warmup, self.ema, self.avg_weight, self.ramp = lr, warmup, ema, avg_weight, ramp
        self.step = step
        self.avg: float | None = None

    @property
    def current_lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def update(self, loss: torch.Tensor, frac: float) -> float:
        """One optimizer step on `loss` at `frac` of the time budget, then the averages: the loss's value."""
        for group in self.opt.param_groups:
            group["lr"] = _lr(self.lr, frac, self.step, warmup=self.warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        decay = min(self.ema, (1 + self.step) / (10 + self.step)) if self.ramp else self.ema
        with torch.no_grad():
            for average, module in zip(self.averages, self.modules, strict=True):
                for e, p in zip(average.parameters(), module.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        value = float(loss.detach())
        self.avg = value if self.avg is None else (1 - self.avg_weight) * self.avg + self.avg_weight * value
        self.step += 1
        return value


@contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A new folder beside `out` to write into, which then takes `out`'s place in one rename (the
    previous one removed after): a reader finds the previous folder or the new one, whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    yield tmp
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_log(path: Path, log: list[dict]) -> None:
    """The training log as CSV, a row per entry."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)


def _save(out: Path, transformer, text_encoder, log: list[dict], meta: dict) -> None:
    with replacing(out) as tmp:
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        save_file(
            {k: v.contiguous() for k, v in text_encoder.state_dict().items()}, str(tmp / "text_encoder.safetensors")
        )
        write_log(tmp / "loss.csv", log)
        (tmp / "train.json").write_text(json.dumps(meta, indent=1))
        _plot(log, tmp / "loss.png")


def _plot(log: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=0.6, alpha=0.5, label="batch loss")
    ax.plot([r["step"] for r in log], [r["loss_avg"] for r in log], lw=1.5, label="running mean")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class Objective:
    """Noised inputs, timesteps and regression targets for the scheduler's prediction type."""

    def __init__(self, scheduler) -> None:
        self.kind = scheduler.config.prediction_type
        if self.kind == "v_prediction":
            self.alphas = scheduler.alphas_cumprod.float()
        elif self.kind != "flow_prediction":
            raise ValueError(f"no training objective for prediction type {self.kind!r}")

    def __call__(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = torch.randn_like(x0)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        if self.kind == "flow_prediction":
            sigma = torch.sigmoid(torch.randn(len(x0)))
            s = sigma.view(shape)
            return (1 - s) * x0 + s * noise, sigma * 1000.0, noise - x0
        t = torch.randint(0, len(self.alphas), (len(x0),))
        a = self.alphas[t].view(shape)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), a.sqrt() * noise - (1 - a).sqrt() * x0


def _read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if k != "step" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]


def train(
    model: str, out: Path, minutes: float, batch: int, lr: float, seed: int, threads: int, resume: bool = False
) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    adapter, preset = resolve(model)
    if not preset.trained:
        raise SystemExit(f"{model} ships untrained: training it is out of reach on these machines")
    transformer = build_transformer(adapter, preset, out if resume else None).train()
    stages = adapter.split(transformer, preset, Shapes(preset.frames, preset.height, preset.width, batch))
    objective = Objective(make_scheduler(adapter, preset))
    text_encoder = TinyTextEncoder(dim=adapter.tiny_format.text_dim(adapter.text_shape(preset))).train()
    previous: dict = {}
    if resume:
        text_encoder.load_state_dict(load_file(str(out / "text_encoder.safetensors")))
        previous = json.loads((out / "train.json").read_text())
    trainer = Trainer(
        [transformer, text_encoder],
        lr,
        warmup=200,
        ema=0.999,
        avg_weight=0.02,
        step=previous.get("steps", 0),
        ramp=not resume,
    )
    ema_t, ema_x = trainer.averages
    empty = tokenize("")
    start, last_save = time.time(), time.time()
    log: list[dict] = _read_log(out / "loss.csv") if resume else []
    meta = {
        "model": model,
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "minutes": minutes,
        "threads": threads,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in preset.config.items()},
        "torch": torch.__version__,
        "objective": objective.kind,
        "cfg_dropout": 0.1,
        "ema": 0.999,
    }
    if resume:
        meta["sessions"] = [
            *previous.get(
                "sessions", [{k: previous[k] for k in ("steps", "elapsed_s", "lr", "minutes") if k in previous}]
            ),
            {"lr": lr, "minutes": minutes},
        ]
    while (elapsed := time.time() - start) < minutes * 60:
        prompts, frames = clips.batch(rng, batch)
        ids = torch.tensor([empty if rng.random() < 0.1 else tokenize(p) for p in prompts])
        xt, timestep, target = objective(torch.from_numpy(adapter.tiny_format.latents(frames)))
        pred = run_chain(
            module_runner(stages, adapter.layout),
            adapter.layout,
            {"latent": xt, "timestep": timestep, "text": text_encoder(ids)},
        ).noise
        value = trainer.update(torch.nn.functional.mse_loss(pred, target), elapsed / (minutes * 60))
        step, avg = trainer.step, trainer.avg
        if step % 25 == 0:
            log.append(
                {
                    "step": step,
                    "elapsed_s": round(elapsed + previous.get("elapsed_s", 0.0), 1),
                    "loss": round(value, 5),
                    "loss_avg": round(avg, 5),
                    "lr": round(trainer.current_lr, 7),
                }
            )
            print(f"step {step:6d}  {elapsed / 60:6.1f} min  loss {value:.4f}  avg {avg:.4f}", flush=True)
        if time.time() - last_save > 300 and log:
            _save(
                out,
                ema_t,
                ema_x,
                log,
                {
                    **meta,
                    "steps": step,
                    "elapsed_s": round(elapsed + previous.get("elapsed_s", 0.0), 1),
                    "final_loss_avg": avg,
                },
            )
            last_save = time.time()
    total = round(time.time() - start + previous.get("elapsed_s", 0.0), 1)
    _save(out, ema_t, ema_x, log, {**meta, "steps": trainer.step, "elapsed_s": total, "final_loss_avg": trainer.avg})
    print(f"saved {out} after {trainer.step} steps")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-wan")
    parser.add_argument("--out", type=Path, default=None, help="default: the bundled tiny_models/<model> folder")
    parser.add_argument("--minutes", type=float, default=75.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="continue from the weights already in --out")
    args = parser.parse_args(argv)
    train(
        args.model,
        args.out or DEFAULT_ROOT / args.model,
        args.minutes,
        args.batch,
        args.lr,
        args.seed,
        args.threads,
        args.resume,
    )


if __name__ == "__main__":
    main()
