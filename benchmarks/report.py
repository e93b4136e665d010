"""Render a bench report as a Markdown table and a quality-vs-NFE plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sencache.benchmarks.matched import envelope
from sencache.benchmarks.timing import FLOOR_TOLERANCE


def _knobs(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items())


def _speedup(run: dict[str, Any], flag: int) -> str:
    """The speed-up cell: median and range of the pairs, `disturbed` when below the floor, and a
    [n] pointing at the run's timing warning."""
    mark = f" [{flag}]" if run.get("timing_warning") else ""
    if run.get("below_floor"):
        return f"disturbed{mark}"
    if not run.get("speedup_range"):
        return f"{run['speedup']:.2f}x{mark}"
    low, high = run["speedup_range"]
    return f"{run['speedup']:.2f}x ({low:.2f}-{high:.2f}){mark}"


def _load(report: dict[str, Any]) -> str:
    load = report["machine"].get("load_average_1m")
    if not load:
        return ""
    return (
        f" Load average (1 min) {load['start']:.1f} at the start and {load['end']:.1f} at the end, on "
        f"{report['machine']['cpus']} CPUs."
    )


def _timing_note(report: dict[str, Any]) -> str:
    timing = report.get("timing") or {}
    return (
        f"Speed-up: the median over {timing.get('pairs')} uncached/cached pairs on the first "
        f"{timing.get('samples')} samples, with their range: the runs form one chain, uncached and cached "
        "alternating, and each cached run pairs with the uncached run on either side. A range wider "
        f"than {timing.get('max_spread', 0) * 100:.0f}% of the median means the machine was busy and is "
        "flagged. Steps/NFE and the distance from the floor are for those samples. A speed-up above what the "
        f"floor allows by more than {FLOOR_TOLERANCE:.0%} is impossible for the loop itself: it is shown as "
        "`disturbed`, not as a result."
    )


def write_markdown(report: dict[str, Any], path: Path) -> None:
    ref = report["reference"]
    lines = [
        f"# {report['model']}: {len(report['prompts'])} prompts x 1 seed, {report['steps']} steps, "
        f"guidance {report['guidance']}"
        + ("" if report.get("guidance_2") is None else f" (the second expert {report['guidance_2']})"),
        "",
        *([f"**Quality figures {report['quality_meaningless']}.**", ""] if report.get("quality_meaningless") else []),
        *([f"Images: {report['images']['source']}.", ""] if report.get("images") else []),
        f"Machine: {report['machine']['processor']}, {report['machine']['torch_threads']} thread, "
        f"{report['machine']['backend'].get('backend')}. Uncached: {ref['denoise_s']:.2f} s denoising, "
        f"{ref['run_step_s'] * 1000:.1f} ms per step; a step that reuses everything (head + tail): "
        f"{ref['reuse_step_s'] * 1000:.2f} ms ({ref['head_tail_share'] * 100:.1f}% of a full step).{_load(report)}",
        "",
        "Head + tail share of the blocks' FLOPs per call (counted on the meta device): "
        + ", ".join(f"{name} {f['head_tail_share'] * 100:.3g}%" for name, f in report["flops"].items())
        + ". What a reused step still costs is that share, so speed-up approaches steps/NFE at real depth.",
        "",
        _timing_note(report),
        "",
        "| method | knobs | requested NFE | NFE | PSNR dB | SSIM | LPIPS | speed-up (range) | steps/NFE (timed) | "
        "decision us/step | vs floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    flagged = []
    for r in report["runs"]:
        gap = "n/a" if r.get("vs_floor") is None else f"{r['vs_floor'] * 100:+.1f}%"
        decision = "n/a" if r["decision_per_step_s"] is None else f"{r['decision_per_step_s'] * 1e6:.0f}"
        ideal = r["ideal_speedup"] if r.get("timed_ideal_speedup") is None else r["timed_ideal_speedup"]
        if r.get("timing_warning"):
            flagged.append(r)
        requested = "" if r.get("requested_nfe") is None else f"{r['requested_nfe']:.1f}"
        lines.append(
            f"| {r['method']} | {_knobs(r['knobs'])} | {requested} | {r['mean_nfe']:.1f} | {r['mean_psnr']:.2f} | "
            f"{r['mean_ssim']:.4f} | n/a | {_speedup(r, len(flagged))} | {ideal:.2f}x | {decision} | {gap} |"
        )
    if flagged:
        lines += ["", "Timing warnings:", ""]
        lines += [f"{i}. {r['method']} {_knobs(r['knobs'])}: {r['timing_warning']}" for i, r in enumerate(flagged, 1)]
    peer = report.get("diffusers_reference")
    if peer:
        lines += [
            "",
            f"diffusers peers run in diffusers' own pipeline on the PyTorch path; their speed-up is against "
            f"that pipeline uncached ({peer['denoise_s']:.2f} s), whose latents differ from ours by at most "
            f"{peer['max_abs_latent_diff_vs_ours']:.1e}.",
        ]
    lines += comparison_lines("SenCache", report.get("comparison") or {})
    for variant, comparison in (report.get("variant_comparisons") or {}).items():
        lines += comparison_lines(f"{variant} (NFE 40-70% of the steps)", comparison)
    if any(r.get("requested_nfe") is not None for r in report["runs"]):
        lines += [
            "",
            "budget-threshold, budget-hard and sencache-plan ask for an NFE (the named speeds: "
            "lossless, high, balanced, fast) instead of thresholds; requested NFE is what each asked for.",
        ]
    for skipped in report.get("skipped", []):
        lines += ["", f"Not measured: {skipped['method']} {_knobs(skipped['knobs'])}: {skipped['reason']}"]
    lines += ["", "LPIPS: unavailable (no LPIPS backbone weights on this machine); never estimated.", ""]
    path.write_text("\n".join(lines))


def write_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    methods = list(dict.fromkeys(r["method"] for r in report["runs"]))
    for method, colour in zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        # runs that never skipped a step are the uncached video itself (PSNR capped): not plotted
        runs = [r for r in report["runs"] if r["method"] == method and min(r["nfe"]) < report["steps"]]
        if not runs:
            continue
        nfe = np.array([r["mean_nfe"] for r in runs])
        for ax, key in zip(axes, ("mean_psnr", "mean_ssim"), strict=True):
            quality = np.array([r[key] for r in runs])
            ax.scatter(nfe, quality, color=colour, s=18, alpha=0.6)
            xs, ys = envelope(nfe, quality)
            ax.plot(xs, ys, color=colour, lw=2 if method == "sencache" else 1.3, label=method)
    for ax, label in zip(axes, ("PSNR vs uncached (dB)", "SSIM vs uncached"), strict=True):
        ax.set_xlabel(f"NFE (of {report['steps']} steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(top=min(axes[0].get_ylim()[1], 60.0))  # near-identical runs (PSNR -> cap) off the top
    axes[0].legend()
    fig.suptitle(f"{report['model']}: quality against NFE, {len(report['prompts'])} evaluation samples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def comparison_lines(title: str, comparison: dict[str, Any]) -> list[str]:
    """The matched-NFE table of one reference rule against every other method."""
    if not comparison.get("baselines"):
        return []
    lines = [
        "",
        f"{title} minus baseline, PSNR dB at matched NFE (95% bootstrap interval over samples):",
        "",
        "| baseline | NFE | difference | interval | verdict |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for base, data in comparison["baselines"].items():
        if not data["points"]:
            lines.append(f"| {base} | no shared NFE range | | | |")
        for p in data["points"]:
            lines.append(
                f"| {base} | {p['nfe']:.1f} | {p['psnr_diff_db']:+.2f} | "
                f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] | {p['verdict']} |"
            )
    return lines
