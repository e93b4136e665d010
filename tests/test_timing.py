"""Paired timing statistics, the floor flag, and quiet third-party output (pure; no timed asserts)."""

import sys

import pytest

from sencache.benchmarks.bench import DISTURBED, _timed_run
from sencache.benchmarks.report import _speedup
from sencache.benchmarks.timing import (
    MAX_SPREAD,
    PairedTiming,
    below_floor,
    floor_speedup,
    run_chain,
)
from sencache.console.output import set_verbose, third_party_output


def test_median_range_and_spread_of_the_pair_ratios():
    timing = PairedTiming(uncached_s=(3.0, 4.0, 6.0), cached_s=(2.0, 2.0, 4.0))
    assert timing.ratios == (1.5, 2.0, 1.5)
    assert (timing.median, timing.low, timing.high) == (1.5, 1.5, 2.0)
    assert timing.spread == pytest.approx(1 / 3)
    assert "33%" in timing.warning and "do not trust" in timing.warning
    assert timing.describe() == "1.50x (1.50-2.00 over 3 pairs)"
    assert timing.as_dict()["median"] == 1.5 and timing.as_dict()["warning"] == timing.warning


def test_a_spread_at_the_limit_is_trusted_and_above_it_is_not():
    at_limit = PairedTiming(uncached_s=(1.0, 1.25, 1.25), cached_s=(1.0, 1.0, 1.0))
    assert at_limit.spread == MAX_SPREAD == 0.2 and at_limit.warning is None
    above = PairedTiming(uncached_s=(1.0, 1.25, 1.3), cached_s=(1.0, 1.0, 1.0))
    assert above.spread == pytest.approx(0.24) and above.warning is not None
    assert PairedTiming(uncached_s=(1.0, 1.3), cached_s=(1.0, 1.0), max_spread=0.3).warning is None


def test_one_pair_is_never_trusted():
    timing = PairedTiming(uncached_s=(6.0,), cached_s=(4.0,))
    assert timing.median == 1.5 and timing.spread == 0.0
    assert timing.warning.startswith("one pair only")


def test_pairs_must_match_and_take_time():
    with pytest.raises(ValueError, match="as many"):
        PairedTiming(uncached_s=(1.0, 2.0), cached_s=(1.0,))
    with pytest.raises(ValueError, match="as many"):
        PairedTiming(uncached_s=(), cached_s=())
    with pytest.raises(ValueError, match="positive"):
        PairedTiming(uncached_s=(1.0,), cached_s=(0.0,))


def test_each_cached_run_pairs_with_the_uncached_runs_on_either_side():
    calls = []
    uncached_s = iter([6.0, 7.0, 5.0, 6.0, 8.0])

    def uncached():
        calls.append("U")
        return next(uncached_s)

    def cached(name, seconds):
        return lambda repeat: calls.append(f"{name}{repeat}") or seconds[repeat]

    a, b = run_chain(uncached, [cached("a", [4.0, 3.0]), cached("b", [5.0, 4.0])], 2)
    assert calls == ["U", "a0", "U", "b0", "U", "a1", "U", "b1", "U"]
    assert a.uncached_s == (6.0, 7.0, 5.0, 6.0) and a.cached_s == (4.0, 4.0, 3.0, 3.0)
    assert b.uncached_s == (7.0, 5.0, 6.0, 8.0) and b.cached_s == (5.0, 5.0, 4.0, 4.0)
    assert a.ratios == (1.5, 1.75, 5 / 3, 2.0) and a.median == pytest.approx((1.75 + 5 / 3) / 2)
    assert b.ratios == (1.4, 1.0, 1.5, 2.0) and b.median == 1.45 and b.warning is not None
    with pytest.raises(ValueError, match="at least 1"):
        run_chain(uncached, [cached("a", [1.0])], 0)
    with pytest.raises(ValueError, match="no cached runs"):
        run_chain(uncached, [], 1)


def test_floor_speedup_and_the_below_floor_flag():
    assert floor_speedup(30, 15.0, 0.0) == 2.0
    assert floor_speedup(30, 15.0, 0.1) == pytest.approx(30 / 16.5)
    assert floor_speedup(30, 30.0, 0.5) == 1.0
    with pytest.raises(ValueError, match="mean NFE"):
        floor_speedup(30, 0.0, 0.1)
    assert not below_floor(2.0, 2.0) and not below_floor(2.05, 2.0)
    assert below_floor(2.07, 2.0) and below_floor(1.2, 1.0, tolerance=0.1)


def _run(uncached, cached, nfe):
    measured = {"nfe": nfe, "denoise_s": sum(cached), "decision_s": 0.001}
    return _timed_run("sencache", {"eps_main": 0.3}, measured, PairedTiming(uncached, cached), 2, 10, 0.0)


def test_a_run_faster_than_its_floor_is_withheld_not_reported():
    # 10 steps, NFE 5 on the timed samples: at most 2x even if a reused step were free.
    run = _run((6.0, 6.0, 6.0), (2.5, 2.5, 2.5), [5, 5, 9, 9])
    assert run["floor_speedup"] == 2.0 and run["below_floor"] is True
    assert run["speedup"] is None and run["timing_warning"] == DISTURBED
    assert run["timing"]["median"] == 2.4 and run["vs_floor"] == pytest.approx(2.0 / 2.4 - 1)
    assert _speedup(run, 1) == "disturbed [1]"
    honest = _run((6.0, 6.0, 6.0), (4.0, 4.0, 4.0), [5, 5, 9, 9])
    assert honest["below_floor"] is False and honest["speedup"] == 1.5 and honest["timing_warning"] is None
    assert honest["timed_ideal_speedup"] == 2.0 and honest["floor_s"] == 3.0
    assert _speedup(honest, 0) == "1.50x (1.50-1.50)"
    noisy = _run((6.0, 9.0, 6.0), (4.0, 4.0, 4.0), [5, 5, 9, 9])
    assert noisy["speedup"] == 1.5 and "do not trust" in noisy["timing_warning"]
    assert _speedup(noisy, 2) == "1.50x (1.50-2.25) [2]"


def test_third_party_prints_are_captured_unless_verbose(capsys):
    with third_party_output("a library") as captured:
        print("[MagCache] Calibration Complete")
        print("noise", file=sys.stderr)
    out, err = capsys.readouterr()
    assert out == err == "" and "Calibration Complete" in captured.getvalue() and "noise" in captured.getvalue()
    set_verbose(True)
    try:
        with third_party_output("a library"):
            print("shown")
    finally:
        set_verbose(False)
    assert capsys.readouterr().out == "shown\n"


def test_captured_prints_explain_a_failure(capsys):
    with pytest.raises(RuntimeError), third_party_output("the exporter"):
        print("why it broke")
        raise RuntimeError("boom")
    err = capsys.readouterr().err
    assert "the exporter printed, before it failed" in err and "why it broke" in err


@pytest.mark.parametrize(
    ("argv", "verbose"), [(["demo"], False), (["--verbose", "demo"], True), (["demo", "--verbose"], True)]
)
def test_verbose_is_one_flag_before_or_after_the_command(argv, verbose):
    from sencache.cli import parser

    assert parser().parse_args(argv).verbose is verbose


def test_the_demo_prints_a_speedup_above_steps_per_nfe_as_disturbed():
    from sencache.demo import speedup_verdict

    steady = PairedTiming(uncached_s=(6.0, 6.0, 6.0, 6.0), cached_s=(4.0, 4.0, 4.0, 4.0))
    assert speedup_verdict(steady, 1.58) == ("1.50x (1.50-1.50 over 4 pairs)", [])
    too_fast = PairedTiming(uncached_s=(8.0, 8.0, 8.0, 8.0), cached_s=(4.0, 4.0, 4.0, 4.0))
    text, warnings = speedup_verdict(too_fast, 1.58)
    assert text == "disturbed timing, not a result (median 2.00x)" and "1.58x" in warnings[0]
    busy = PairedTiming(uncached_s=(6.0, 9.0, 6.0, 6.0), cached_s=(4.0, 4.0, 4.0, 4.0))
    text, warnings = speedup_verdict(busy, 1.58)
    assert text.startswith("1.50x (1.50-2.25") and len(warnings) == 1 and "do not trust" in warnings[0]
