"""The GPU check's report (`sencache.benchmarks.gpu_check_report`): the loop comparison on real
`sencache generate` folders, the figures of gpu-acceptance's JSON against their targets, and the
real-size run's figures with where they came from (its CPU rehearsal run here, for real)."""

import json

import numpy as np
import pytest

from sencache.benchmarks.gpu_check_report import compare_runs, figure_lines, main, real_size_lines
from sencache.benchmarks.metrics import psnr
from sencache.cli import main as sencache


@pytest.fixture(scope="module")
def runs(calibrated_bundle, tmp_path_factory):
    """SenCache and uncached runs of the same two prompts, 8 steps, on the calibrated bundle."""
    out = tmp_path_factory.mktemp("runs")
    prompts = [
        "--prompt",
        "one large white circle static on black",
        "--seed",
        "1",
        "--prompt",
        "two small red squares moving left fast on texture",
        "--seed",
        "2",
    ]
    for cache, knobs in (("sencache", ["--eps-main", "0.5"]), ("none", [])):
        assert (
            sencache(
                [
                    "generate",
                    "--engine",
                    str(calibrated_bundle),
                    "--steps",
                    "8",
                    "--threads",
                    "1",
                    "--cache",
                    cache,
                    *knobs,
                    *prompts,
                    "--out",
                    str(out / cache),
                ]
            )
            == 0
        )
    return out / "sencache", out / "none"


def test_loop_comparison_reads_both_runs(runs, tmp_path, capsys):
    cached, reference = runs
    stats = json.loads((cached / "stats.json").read_text())
    assert main(["loop", str(cached), str(reference), "--out", str(tmp_path / "loop.json")]) == 0
    loop = json.loads((tmp_path / "loop.json").read_text())
    assert [s["nfe"] for s in loop["samples"]] == [s["nfe"] for s in stats["samples"]]
    assert [s["reference_nfe"] for s in loop["samples"]] == [8, 8]
    expected = min(psnr(np.load(cached / "sample_1.npy"), np.load(reference / "sample_1.npy")), 100.0)
    assert loop["samples"][1]["psnr_db"] == pytest.approx(expected)
    assert loop["speedup"] == pytest.approx(loop["reference_denoise_s"] / loop["denoise_s"])
    assert "against --cache none" in capsys.readouterr().out


def test_loop_comparison_refuses_runs_of_other_requests(runs):
    cached, reference = runs
    assert compare_runs(reference, reference)["mean_psnr_db"] == 100.0  # identical: the cap
    stats = json.loads((reference / "stats.json").read_text())
    stats["samples"][0]["seed"] = 7
    other = reference.parent / "other"
    other.mkdir()
    (other / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="not runs of the same"):
        compare_runs(cached, other)


def acceptance(fraction: float, median_us: float, euler_syncs: tuple[int, int]) -> dict:
    """A gpu-acceptance document with the keys `sencache.gpu_acceptance.run` writes."""
    kernel = {
        "matches_blocking_model": True,
        "max_rel_vs_float64": 1e-7,
        "kernel_us": 90.0,
        "bandwidth_GBps": 4800 * fraction,
        "fraction_of_peak": fraction,
    }
    return {
        "device": "NVIDIA H200",
        "arch": "sm_90",
        "driver": 13000,
        "kernel": {
            "latent_per_sample": [16, 21, 60, 104],
            "samples": 2,
            "peak_GBps": 4800.0,
            "dtypes": {"fp32": kernel, "bf16": dict(kernel, matches_blocking_model=False)},
        },
        "decision": {"median_us": median_us, "p90_us": median_us * 1.5, "host_syncs_per_step": 1},
        "loop": {
            "backend": {"backend": "torch", "device": "cuda"},
            "none": {"nfe": 30.0, "torch_syncs": 64},
            "sencache": {"nfe": 19.0, "torch_syncs": 40},
            "speedup": 1.5,
            "flow_euler_syncs": dict(zip(("6", "20"), euler_syncs, strict=True)),
        },
    }


def test_figures_hold_each_against_its_target():
    good = "\n".join(figure_lines(acceptance(0.85, 30.0, (3, 3))))
    assert "85% of peak, meets >= 80%" in good and "meets <= 50 us" in good
    assert "equal: the loop adds none per step" in good
    assert "fp32: 4080 GB/s" in good and "bf16" in good and "blocking model FAILED" in good  # bf16's parity flag
    bad = "\n".join(figure_lines(acceptance(0.5, 80.0, (3, 9))))
    assert "MISSES >= 80%" in bad and "MISSES <= 50 us" in bad and "DIFFER" in bad


def test_figures_of_a_run_without_the_loop():
    document = acceptance(0.9, 20.0, (1, 1))
    document["loop"] = {"skipped": "this torch has no CUDA"}
    assert figure_lines(document)[-1] == "loop: skipped (this torch has no CUDA)"


@pytest.fixture(scope="module")
def real_size_run(tmp_path_factory):
    """The real-size run's CPU rehearsal, as the GPU check's rehearsal runs it: Wan 1.3B's true
    width with one block, dummy bf16 weights, a torch bundle at 9x64x64."""
    from sencache.benchmarks.gpu_real_size import main as real_size
    from sencache.engine_builder.builder import BuildOptions, build

    work = tmp_path_factory.mktemp("real-size")
    options = BuildOptions(
        model="wan2.1-t2v-1.3b",
        out=work / "bundle",
        load_format="dummy",
        layers=1,
        backend="torch",
        precision="bf16",
        frames=9,
        height=64,
        width=64,
        max_batch=2,
    )
    build(options, log=lambda _: None)
    out = work / "real_size.json"
    argv = ["--engine", str(work / "bundle"), "--device", "cpu", "--rehearsal", "--steps", "3"]
    assert real_size([*argv, "--rows", "1,2", "--passes", "1", "--launches", "3", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_real_size_run_measures_every_part_in_bf16(real_size_run):
    run = real_size_run
    assert run["rehearsal"] and run["dummy"] and run["blocks"] == 1 and run["precision"] == "bf16"
    assert run["backend"]["dtype"] == "bfloat16" and run["latent_per_sample"] == [16, 3, 8, 8]
    uncached, cached = run["runs"]["uncached"], run["runs"]["sencache"]
    assert uncached["nfe"] == 3 and uncached["rows_per_step"] == 2 and uncached["drift_readbacks_per_step"] == 0
    assert cached["drift_readbacks_per_step"] == pytest.approx(2 / 3)  # one per step after the first
    assert run["drift_kernel"]["samples"] == 2 and run["drift_kernel"]["bandwidth_GBps"] > 0
    assert list(run["rows"]["curve"]) == ["1", "2"] and run["rows"]["curve"]["1"]["per_row_vs_first"] == 1.0


def test_real_size_lines_name_where_each_figure_came_from(real_size_run):
    lines = real_size_lines(real_size_run)
    assert "REHEARSAL on the CPU at a tiny size, not GPU figures" in lines[0] and "random weights" in lines[0]
    assert any("uncached:" in line and "s/step (2 rows)" in line for line in lines)
    assert any("drift:" in line and "host clock" in line for line in lines)
    assert any(line.startswith("  pass time against rows") for line in lines)
    measured = dict(real_size_run, rehearsal=False, source="measured on NVIDIA H200")
    measured["rows"] = {"not_run": "12 s of the 170 s budget left"}
    del measured["drift_kernel"]
    lines = real_size_lines(measured)
    assert "[measured on NVIDIA H200]" in lines[0]
    assert "  drift_kernel: missing (the run stopped before it)" in lines
    assert "  rows: not run (12 s of the 170 s budget left)" in lines
