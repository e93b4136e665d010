"""Benchmarks: metric functions against known values, matched-NFE comparison, a quick report."""

import json
import math

import numpy as np
import pytest

from conftest import engine_for
from sencache.benchmarks.bench import BenchPlan, evaluation_set, run_bench
from sencache.benchmarks.matched import compare_at_matched_nfe, envelope
from sencache.benchmarks.metrics import SSIM_K1, SSIM_K2, ssim
from sencache.runtime.errors import BadInput
from sencache.runtime.families import ADAPTERS


def test_ssim_of_flat_frames_is_the_luminance_term():
    a = np.full((2, 16, 16, 3), 0.5)
    b = np.full((2, 16, 16, 3), 0.7)
    c1 = (SSIM_K1 * 1.0) ** 2
    expected = (2 * 0.5 * 0.7 + c1) / (0.5**2 + 0.7**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssim_of_anticorrelated_texture_is_negative():
    rng = np.random.default_rng(0)
    a = rng.random((1, 24, 24, 1))
    assert ssim(a, 1.0 - a) < 0 and SSIM_K2 == 0.03


def test_envelope_keeps_only_points_no_cheaper_run_beats():
    xs, ys = envelope(np.array([10.0, 12.0, 14.0, 16.0]), np.array([20.0, 19.0, 25.0, 24.0]))
    assert xs.tolist() == [10.0, 14.0] and ys.tolist() == [20.0, 25.0]


def _runs(method, nfes, offset):
    return [
        {"method": method, "nfe": [n] * 4, "psnr": [n + offset + d for d in (0.1, -0.1, 0.05, -0.05)]} for n in nfes
    ]


def test_matched_comparison_finds_win_and_tie():
    runs = (
        _runs("sencache", [10, 14, 18], 3.0) + _runs("fixed", [10, 15, 20], 0.0) + _runs("magcache", [10, 14, 18], 3.0)
    )
    result = compare_at_matched_nfe(runs, 20)
    assert all(
        p["verdict"] == "win" and p["psnr_diff_db"] == pytest.approx(3.0)
        for p in result["baselines"]["fixed"]["points"]
    )
    assert all(p["verdict"] == "tie" for p in result["baselines"]["magcache"]["points"])


def test_matched_comparison_keeps_to_the_nfe_range_and_any_reference():
    runs = _runs("sencache-online", [10, 14, 18], 1.0) + _runs("sencache", [10, 14, 18], 0.0)
    result = compare_at_matched_nfe(runs, 20, reference="sencache-online", nfe_range=(12.0, 16.0))
    points = result["baselines"]["sencache"]["points"]
    assert result["reference"] == "sencache-online" and [p["nfe"] for p in points] == [12.0, 13.0, 14.0, 15.0, 16.0]
    assert all(p["psnr_diff_db"] == pytest.approx(1.0) for p in points)


def test_online_benchmark_groups_samples_by_background_and_count():
    from sencache.benchmarks.online import difficulty, nfe_by_group

    prompts = ["one large white circle static on black", "three small red squares moving up fast on texture"]
    assert difficulty(prompts[1]) == ("texture", "three")
    with pytest.raises(ValueError, match="grammar"):
        difficulty("a red circle")
    groups = nfe_by_group(prompts, {"nfe": [12, 18], "psnr": [40.0, 30.0]})
    assert groups["background=black"] == {"samples": 1, "mean_nfe": 12.0, "mean_psnr": 40.0}
    assert groups["count=three"]["mean_nfe"] == 18.0 and len(groups) == 4


def test_evaluation_set_rejects_bad_input(tmp_path):
    (tmp_path / "p.txt").write_text("one red unicorn\n")
    with pytest.raises(BadInput, match="unicorn"):
        evaluation_set(4, tmp_path / "p.txt", None)
    with pytest.raises(BadInput, match="pair up"):
        evaluation_set(4, None, [1, 2])


def test_quick_bench_writes_a_valid_report(calibrated_bundle, tmp_path, capsys):
    engine = engine_for(calibrated_bundle)
    prompts, seeds = evaluation_set(3, None, None)
    plan = BenchPlan(
        methods=(
            "sencache",
            "fixed",
            "teacache",
            "magcache",
            "diffusers-magcache",
            "diffusers-fbc",
            "budget-hard",
            "sencache-plan",
        ),
        prompts=tuple(prompts),
        seeds=tuple(seeds),
        steps=6,
        guidance=4.0,
        quick=True,
        repeats=1,
    )
    report = run_bench(engine, plan, tmp_path / "bench", show_progress=False)
    out, err = capsys.readouterr()  # diffusers' MagCache calibration prints its ratios: captured, not shown
    assert "MagCache" not in out + err and out == err == ""
    stored = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert stored["steps"] == 6 and len(stored["runs"]) == len(report["runs"]) >= 12
    for run in stored["runs"]:
        assert len(run["nfe"]) == len(run["psnr"]) == len(run["ssim"]) == 3
        assert all(2 <= n <= 6 for n in run["nfe"]) and run["lpips"] is None
        assert all(math.isfinite(p) and p > 0 for p in run["psnr"])
        assert run["denoise_s"] > 0
        assert (run["floor_s"] is None) == run["method"].startswith("diffusers-")
        if run["timing"] is not None:
            assert run["timing"]["pairs"] == 2 and run["timing"]["samples"] == 3
            assert (run["speedup"] is None) == run["below_floor"]
    budgets = [run for run in stored["runs"] if run["method"] == "budget-hard"]
    assert [run["requested_nfe"] for run in budgets] == [round(0.75 * 6), round(0.45 * 6)]
    assert all(run["nfe"] == [run["requested_nfe"]] * 3 for run in budgets)
    plans = [run for run in stored["runs"] if run["method"] == "sencache-plan"]
    assert [run["requested_nfe"] for run in plans] == [round(0.75 * 6), round(0.45 * 6)]
    assert all(run["nfe"] == [run["requested_nfe"]] * 3 for run in plans)
    assert "sencache-plan" in stored["variant_comparisons"]
    assert "| budget-hard | speed=high, budget=hard | 4.0 | 4.0 |" in (tmp_path / "bench" / "report.md").read_text()
    assert stored["diffusers_reference"]["max_abs_latent_diff_vs_ours"] < 1e-3
    assert (tmp_path / "bench" / "quality_vs_nfe.png").stat().st_size > 10_000
    assert "| method |" in (tmp_path / "bench" / "report.md").read_text()


@pytest.mark.parametrize("model", [name for adapter in ADAPTERS.values() for name in adapter.presets])
def test_stage_flops_for_every_model(model):
    from sencache.benchmarks.flops import stage_flops

    counts = stage_flops(model)
    assert counts["blocks"] > 0 and 0 < counts["head_tail_share"] < 0.05


def test_reference_sweep_meets_the_same_nominal_threshold(calibrated_bundle):
    """sencache-reference's rescaled eps, times the family's constant, is the engine's eps times
    sqrt(numel): the two rules' sweeps compare at the same nominal eps."""
    from sencache.benchmarks.bench import _knobs

    engine = engine_for(calibrated_bundle)
    method, knobs = _knobs("sencache-reference", {"eps_main": 0.3}, 30, engine)
    policy = engine.policy(method, 30, 1, knobs)
    engine_rule = engine.policy("sencache", 30, 1, {"eps_main": 0.3})
    assert method == "sencache" and policy.config.conventions == "reference"
    assert policy.conventions.score_constant == pytest.approx(1447.978)
    assert policy.config.eps_main * policy.scale == pytest.approx(0.3 * engine_rule.scale)
    assert policy.config.eps_start * policy.scale == pytest.approx(engine_rule.config.eps_start * engine_rule.scale)


def test_variant_comparisons_measure_each_variant_inside_the_band():
    runs = _runs("sencache-online", [8, 12, 16], 2.0) + _runs("fixed", [8, 12, 16], 0.0) + _runs("sencache", [8, 16], 0)
    from sencache.benchmarks.bench import variant_comparisons

    result = variant_comparisons(runs, 20)
    assert set(result) == {"sencache-online"}
    points = result["sencache-online"]["baselines"]["fixed"]["points"]
    assert points and all(8 <= p["nfe"] <= 14 and p["verdict"] == "win" for p in points)
    assert all(p["psnr_diff_db"] == pytest.approx(2.0) for p in points)
