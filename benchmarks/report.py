"""Render a bench report as a Markdown table and a quality-vs-NFE plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sencache.benchmarks.matched import envelope


def _knobs(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items())


def write_markdown(report: dict[str, Any], path: Path) -> None:
    ref = report["reference"]
    lines = [
        f"# {report['model']}: {len(report['prompts'])} prompts x 1 seed, {report['steps']} steps, "
        f"guidance {report['guidance']}",
        "",
        f"Machine: {report['machine']['processor']}, {report['machine']['torch_threads']} thread, "
        f"{report['machine']['backend'].get('backend')}. Uncached: {ref['denoise_s']:.2f} s denoising, "
        f"{ref['run_step_s'] * 1000:.1f} ms per step; a step that reuses everything (head + tail): "
        f"{ref['reuse_step_s'] * 1000:.2f} ms ({ref['head_tail_share'] * 100:.1f}% of a full step).",
        "",
        "Head + tail share of the blocks' FLOPs per call (counted on the meta device): "
        + ", ".join(f"{name} {f['head_tail_share'] * 100:.3g}%" for name, f in report["flops"].items())
        + ". What a reused step still costs is that share, so speed-up approaches steps/NFE at real depth.",
        "",
        "| method | knobs | requested NFE | NFE | PSNR dB | SSIM | LPIPS | speed-up | steps/NFE | decision us/step "
        "| vs floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        gap = f"{(r['denoise_s'] / r['floor_s'] - 1) * 100:+.1f}%" if r["floor_s"] else "n/a"
        decision = "n/a" if r["decision_per_step_s"] is None else f"{r['decision_per_step_s'] * 1e6:.0f}"
        requested = "" if r.get("requested_nfe") is None else f"{r['requested_nfe']:.1f}"
        lines.append(
            f"| {r['method']} | {_knobs(r['knobs'])} | {requested} | {r['mean_nfe']:.1f} | {r['mean_psnr']:.2f} | "
            f"{r['mean_ssim']:.4f} | n/a | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
            f"{decision} | {gap} |"
        )
    peer = report.get("diffusers_reference")
    if peer:
        lines += [
            "",
            f"diffusers peers run in diffusers' own pipeline on the PyTorch path; their speed-up is against "
            f"that pipeline uncached ({peer['denoise_s']:.2f} s), whose latents differ from ours by at most "
            f"{peer['max_abs_latent_diff_vs_ours']:.1e}.",
        ]
    comparison = report.get("comparison") or {}
    if comparison.get("baselines"):
        lines += [
            "",
            "SenCache minus baseline, PSNR dB at matched NFE (95% bootstrap interval over samples):",
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
    if any(r.get("requested_nfe") is not None for r in report["runs"]):
        lines += [
            "",
            "budget-threshold and budget-hard ask for an NFE (the named speeds: "
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
