"""Compare methods at matched NFE: upper envelopes, interpolation, bootstrap over samples.

Each method's runs that skip at least one step give points (mean NFE, mean PSNR). Its upper
envelope keeps the points that no cheaper run beats, and is interpolated linearly in NFE.
SenCache is compared with each baseline at NFE targets inside both envelopes; the bootstrap
resamples the evaluation samples (same resample for every method) and gives a 95% interval of
the PSNR difference. A difference whose interval holds 0 is a tie.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BOOTSTRAP = 1000
PSNR_CAP = 100.0
"""Identical videos have infinite PSNR; they are capped so means stay finite."""


def envelope(nfe: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The upper envelope: points sorted by NFE whose quality beats every cheaper point."""
    order = np.lexsort((-quality, nfe))
    xs, ys, best = [], [], -np.inf
    for i in order:
        if quality[i] > best:
            xs.append(nfe[i])
            ys.append(quality[i])
            best = quality[i]
    return np.asarray(xs), np.asarray(ys)


def _at(nfe: np.ndarray, quality: np.ndarray, targets: np.ndarray) -> np.ndarray:
    xs, ys = envelope(nfe, quality)
    out = np.interp(targets, xs, ys)
    out[(targets < xs[0]) | (targets > xs[-1])] = np.nan
    return out


def compare_at_matched_nfe(
    runs: list[dict[str, Any]],
    steps: int,
    reference: str = "sencache",
    seed: int = 0,
    nfe_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """`reference` (SenCache by default) minus each baseline, in PSNR dB, at shared NFE targets
    (inside `nfe_range` when given), with bootstrap intervals."""
    # A run in which every sample ran every step is the uncached video itself (PSNR capped): it
    # would pull the envelope up to the cap, so it is left out of the comparison.
    runs = [r for r in runs if min(r["nfe"]) < steps]
    methods = sorted({r["method"] for r in runs})
    if reference not in methods:
        return {}
    per_method = {m: [r for r in runs if r["method"] == m] for m in methods}
    nfe = {m: np.array([r["nfe"] for r in rs], float) for m, rs in per_method.items()}
    psnr = {m: np.minimum(np.array([r["psnr"] for r in rs], float), PSNR_CAP) for m, rs in per_method.items()}
    samples = nfe[reference].shape[1]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, samples, size=(BOOTSTRAP, samples))
    result: dict[str, Any] = {"reference": reference, "bootstrap": BOOTSTRAP, "baselines": {}}
    for base in methods:
        if base == reference:
            continue
        lo = max(nfe[reference].mean(axis=1).min(), nfe[base].mean(axis=1).min())
        hi = min(nfe[reference].mean(axis=1).max(), nfe[base].mean(axis=1).max())
        if nfe_range is not None:
            lo, hi = max(lo, nfe_range[0]), min(hi, nfe_range[1])
        if lo > hi:
            result["baselines"][base] = {"overlap": None, "points": []}
            continue
        targets = np.unique(np.round(np.linspace(lo, hi, 5), 2))

        def diff(idx: np.ndarray, base: str = base, targets: np.ndarray = targets) -> np.ndarray:
            ours = _at(nfe[reference][:, idx].mean(axis=1), psnr[reference][:, idx].mean(axis=1), targets)
            theirs = _at(nfe[base][:, idx].mean(axis=1), psnr[base][:, idx].mean(axis=1), targets)
            return ours - theirs

        point = diff(np.arange(samples))
        boot = np.stack([diff(idx) for idx in draws])
        points = []
        for j, target in enumerate(targets):
            column = boot[:, j][np.isfinite(boot[:, j])]
            if not np.isfinite(point[j]) or len(column) < BOOTSTRAP // 2:
                continue
            low, high = np.percentile(column, [2.5, 97.5])
            verdict = "win" if low > 0 else "loss" if high < 0 else "tie"
            points.append(
                {
                    "nfe": float(target),
                    "psnr_diff_db": float(point[j]),
                    "ci95": [float(low), float(high)],
                    "verdict": verdict,
                }
            )
        result["baselines"][base] = {"overlap": [float(lo), float(hi)], "points": points}
    return result
