"""The stand-in denoiser of `policy_loop.cpp`: a bundle's ONNX stages and solver, run by the
runtime's step engine, with every decision taken OUTSIDE it, by the C++ program's `sc_policy_*`.

The C++ loop asks for the next step (`ask`: step, timestep and the drift of the latent from its
anchor), decides natively, and answers with the run mask (`answer`), which the engine applies:
the call pattern of a host with its own engines, with the runtime's stages standing in for them.
Only for the example and its test; a real host runs its own denoiser.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from pathlib import Path

import numpy as np

from sencache.runtime.cache import StepDecision
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams
from sencache.runtime.stepping import StepEngine


class ExternalRule:
    """A cache rule whose decide() hands the inputs out and waits for the decision to come back."""

    name = "sencache-native"
    needs_drift = True
    deterministic_drift = False
    needs_modulation = False
    may_reuse = True

    def __init__(self) -> None:
        self.asked: queue.Queue = queue.Queue(maxsize=1)
        self.answers: queue.Queue = queue.Queue(maxsize=1)

    def settings(self) -> dict[str, str]:
        return {"method": self.name}

    def warnings(self) -> list[str]:
        return []

    def decide(self, step, t, drift_sumsq=None, modulation=None) -> StepDecision:
        drift = None if drift_sumsq is None else np.asarray(drift_sumsq, dtype=np.float32).tobytes()
        self.asked.put((step, t, drift))
        run = self.answers.get()
        return StepDecision(run, np.full(len(run), np.nan), math.nan, False)


class Denoiser:
    """One request (batch 1) of `bundle_dir` stepped one step per ask/answer pair."""

    def __init__(self, bundle_dir: str, prompt: str, seed: int, steps: int) -> None:
        self.model = Model.open(bundle_dir, threads=1)
        self.numel = self.model.numel
        self.engine = StepEngine(self.model)
        self.rule = ExternalRule()
        self.id = self.engine.submit(
            GenerationParams([prompt], [seed], steps, self.model.bundle.manifest.defaults.guidance), self.rule
        )
        self.worker: threading.Thread | None = None

    def ask(self) -> tuple[int, float, bytes | None] | None:
        """Run the next step up to its decision: (step, t, drift_sumsq as float32 bytes, None on
        step 0); None once the request has ended."""
        while True:
            if self.worker is None or not self.worker.is_alive():
                if self.engine.poll(self.id).state not in ("queued", "running"):
                    return None
                self.worker = threading.Thread(target=self.engine.step)
                self.worker.start()
            try:
                return self.rule.asked.get(timeout=0.05)
            except queue.Empty:
                continue

    def answer(self, run_mask: bytes) -> None:
        """Apply the decision (one byte per sample, 1: run) and finish the step."""
        self.rule.answers.put(np.frombuffer(run_mask, dtype=np.uint8).astype(bool))
        self.worker.join()

    def save(self, out_dir: str) -> None:
        """Write frames.npy (float32 [T, H, W, 3]) and decisions.json of the finished request."""
        result = self.engine.result(self.id)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "frames.npy", self.model.decode(result.latents)[0].astype(np.float32))
        (out / "decisions.json").write_text(json.dumps(result.decisions[0]))
