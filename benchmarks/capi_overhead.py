"""Per-call overhead of the C ABI's engine: `sc_engine_step` against the Python step engine's
`step()` on the same bundle, in one process (libsencache loaded through ctypes, so it uses this
interpreter, as an embedding host that already runs Python does).

    python -m sencache.benchmarks.capi_overhead --engine DIR --lib build/capi/libsencache.so \
        [--out benchmarks/results/capi_overhead]

Two engines on the same bundle take the same requests; their steps are interleaved (the order
alternates by round) and paired, so the difference of each pair is the cost of the ABI around
the same pass: ctypes, the GIL, the argument and result conversions, the progress report. Also
timed, interleaved: a step of both engines when idle (the fixed cost of the step call itself)
and `sc_engine_poll` against `StepEngine.poll` (the bare cost of one call across the ABI).
One CPU thread (torch.set_num_threads(1), backend threads=1). Writes report.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams
from sencache.runtime.stepping import StepEngine

PROMPT = "one small red circle static on black"


class Options(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_char_p), ("device", ctypes.c_char_p), ("threads", ctypes.c_int32)]


class CRequest(ctypes.Structure):
    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("prompt_embeds", ctypes.c_void_p),
        ("embed_tokens", ctypes.c_int64),
        ("embed_channels", ctypes.c_int64),
        ("seed", ctypes.c_uint64),
        ("steps", ctypes.c_int32),
        ("guidance", ctypes.c_double),
        ("cache", ctypes.c_char_p),
        ("knobs_json", ctypes.c_char_p),
    ]


class CProgress(ctypes.Structure):
    _fields_ = [("state", ctypes.c_int), ("step", ctypes.c_int32), ("steps", ctypes.c_int32), ("nfe", ctypes.c_int32)]


def summary(values: list[float]) -> dict[str, float]:
    """Median and spread (quartiles, min, max) in microseconds."""
    a = np.asarray(values) * 1e6
    return {
        "median_us": float(np.median(a)),
        "q25_us": float(np.percentile(a, 25)),
        "q75_us": float(np.percentile(a, 75)),
        "min_us": float(a.min()),
        "max_us": float(a.max()),
        "n": len(a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--lib", type=Path, required=True, help="libsencache.so")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/capi_overhead"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    lib = ctypes.CDLL(str(args.lib))
    lib.sc_last_error.restype = ctypes.c_char_p
    engine_c = ctypes.c_void_p()
    if lib.sc_engine_create(
        str(args.engine).encode(), ctypes.byref(Options(b"auto", b"cpu", 1)), ctypes.byref(engine_c)
    ):
        raise SystemExit(f"sc_engine_create: {lib.sc_last_error().decode()}")
    model = Model.open(args.engine, threads=1)
    engine_py = StepEngine(model)
    guidance = model.bundle.manifest.defaults.guidance

    def step_c() -> None:
        active = ctypes.c_int32()
        if lib.sc_engine_step(engine_c, ctypes.byref(active)):
            raise RuntimeError(lib.sc_last_error().decode())

    py_steps, c_steps, paired = [], [], []
    for r in range(args.rounds):
        request = CRequest(PROMPT.encode(), None, 0, 0, r, args.steps, guidance, b"sencache", None)
        c_id = ctypes.c_int64()
        if lib.sc_engine_submit(engine_c, ctypes.byref(request), ctypes.byref(c_id)):
            raise RuntimeError(lib.sc_last_error().decode())
        py_id = engine_py.submit(
            GenerationParams([PROMPT], [r], args.steps, guidance), model.policy("sencache", args.steps, 1, {})
        )
        for k in range(args.steps + 1):  # the last call retires the finished requests
            order = (step_c, engine_py.step) if (r + k) % 2 else (engine_py.step, step_c)
            times = {}
            for fn in order:
                started = time.perf_counter()
                fn()
                times[fn] = time.perf_counter() - started
            py_steps.append(times[engine_py.step])
            c_steps.append(times[step_c])
            paired.append(times[step_c] - times[engine_py.step])
        engine_py.release(py_id)
        lib.sc_engine_release(engine_c, c_id)

    # The fixed cost of a step call: both engines idle (no request), so the pass does nothing and
    # what remains is the call itself (and, for the ABI, the GIL, the report and the conversions).
    idle_py, idle_c = [], []
    for k in range(args.polls):
        for fn, times in ((engine_py.step, idle_py), (step_c, idle_c))[:: 1 if k % 2 else -1]:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)

    # The bare call: poll a known request, many times, interleaved.
    request = CRequest(PROMPT.encode(), None, 0, 0, 0, 2, guidance, b"sencache", None)
    c_id = ctypes.c_int64()
    lib.sc_engine_submit(engine_c, ctypes.byref(request), ctypes.byref(c_id))
    py_id = engine_py.submit(GenerationParams([PROMPT], [0], 2, guidance), model.policy("sencache", 2, 1, {}))
    progress = CProgress()
    poll_c, poll_py = [], []
    for _ in range(args.polls):
        started = time.perf_counter()
        lib.sc_engine_poll(engine_c, c_id, ctypes.byref(progress))
        poll_c.append(time.perf_counter() - started)
        started = time.perf_counter()
        engine_py.poll(py_id)
        poll_py.append(time.perf_counter() - started)
    lib.sc_engine_destroy(engine_c)

    report = {
        "tool": "sencache.benchmarks.capi_overhead",
        "bundle": model.bundle.manifest.model,
        "backend": model.backend.name,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": 1,
        },
        "rounds": args.rounds,
        "steps_per_request": args.steps,
        "python_step": summary(py_steps),
        "sc_engine_step": summary(c_steps),
        "sc_engine_step_minus_python_step": summary(paired),
        "python_step_idle": summary(idle_py),
        "sc_engine_step_idle": summary(idle_c),
        "python_poll": summary(poll_py),
        "sc_engine_poll": summary(poll_c),
        "note": "ctypes calls from the same interpreter (ctypes itself is part of the sc_* times); paired "
        "differences of interleaved steps; measured on a shared machine, so the spread of the "
        "loaded steps is other load",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    for key in (
        "python_step",
        "sc_engine_step",
        "sc_engine_step_minus_python_step",
        "python_step_idle",
        "sc_engine_step_idle",
        "python_poll",
        "sc_engine_poll",
    ):
        s = report[key]
        print(f"{key:34s} median {s['median_us']:10.1f} us  [q25 {s['q25_us']:.1f}, q75 {s['q75_us']:.1f}]")


if __name__ == "__main__":
    main()
