"""Per-request NFE budgets (issue 12): the knobs, the curves and their inversion, the hard rule's
exactness, and a budgeted request end to end on tiny-wan."""

import json

import numpy as np
import pytest

from budget_tables import TABLE, curves
from conftest import engine_for
from sencache.cli import main, parser
from sencache.runtime.cache.budget import (
    SenCacheHardBudget,
    eps_for_fraction,
    fraction_curve,
    make_budget_policy,
    online_eps_for_fraction,
    replay,
    step_profile,
)
from sencache.runtime.cache.knobs import check_knobs
from sencache.runtime.cache.sencache import SenCachePolicy, SenCacheSettings
from sencache.runtime.errors import BadInput
from sencache.runtime.request import GenerationParams
from sencache.runtime.sensitivity import BudgetCurves, SensitivityTable

PROMPTS = [
    "one small red circle static on black",
    "two large blue squares moving left fast on texture",
    "three small green circles moving up slow on gradient",
]


def table_with(budget: BudgetCurves | None) -> SensitivityTable:
    return SensitivityTable(TABLE.timesteps, TABLE.jx, TABLE.jt, budget=budget)


def test_the_curve_is_inverted_at_recorded_and_interpolated_step_counts():
    c = curves()
    assert eps_for_fraction(c, 10, 0.7) == pytest.approx(0.15)
    assert eps_for_fraction(c, 20, 0.35) == pytest.approx(0.3)
    assert eps_for_fraction(c, 10, 1.0) == 0.0
    assert eps_for_fraction(c, 10, 0.45) is None  # below what the largest eps reaches
    between = fraction_curve(c, 14)  # linear in log(steps)
    w = np.log(14 / 10) / np.log(2)
    assert between == pytest.approx((1 - w) * np.array(c.fractions[0]) + w * np.array(c.fractions[1]))
    assert fraction_curve(c, 40) == pytest.approx(c.fractions[1])  # outside: the nearest recorded


def test_the_profile_is_resampled_and_scaled_to_the_step_count():
    c = curves()
    assert step_profile(c, 10) == pytest.approx(c.profiles[0])
    half = step_profile(c, 5)  # nearest is 10 steps; steps twice as long score about twice as high
    assert len(half) == 5 and half[0] == pytest.approx(0.1 * 9 / 4) and half[-1] == pytest.approx(0.2 * 9 / 4)


def test_the_curves_round_trip_and_corrupt_or_missing_ones_say_recalibrate():
    table = table_with(curves())
    again = SensitivityTable.parse(table.to_bytes(), "t.json")
    assert again.budget == table.budget
    assert SensitivityTable.parse(TABLE.to_bytes(), "old.json").budget is None  # tables from before still load
    with pytest.raises(BadInput, match="no NFE-budget curves: recalibrate"):
        TABLE.budget_curves()
    for broken in (
        {"fractions": [[1.0, 0.5, 0.7, 0.4], [1.0, 0.6, 0.4, 0.3]]},  # grows with eps
        {"eps_grid": [0.0, 0.2, 0.1, 0.4]},
        {"profiles": [[0.1] * 9, [0.1] * 20]},
        {"format": "sencache-budget/0"},
        {"max_reuse": "3"},
    ):
        document = json.loads(table.to_bytes())
        document["budget"].update(broken)
        with pytest.raises(BadInput, match=r"corrupt NFE-budget curves in t.json .*recalibrate"):
            SensitivityTable.parse(json.dumps(document).encode(), "t.json")
    document = json.loads(table.to_bytes())
    del document["budget"]["profiles"]
    with pytest.raises(BadInput, match="missing 'profiles'"):
        SensitivityTable.parse(json.dumps(document).encode(), "t.json")


def test_budget_knobs_are_checked_against_each_other_and_the_thresholds():
    assert check_knobs("sencache", {"nfe": 12, "budget": "hard"}) == {"nfe": 12, "budget": "hard"}
    assert check_knobs("sencache", {"speed": "fast"}) == {"speed": "fast"}
    cases = {
        (("nfe", 10), ("speedup", 2.0)): "speedup cannot be given with nfe",
        (("speedup", 2.0), ("eps_main", 0.3)): "eps_main cannot be given with speedup",
        (("speed", "high"), ("max_reuse", 2)): "max_reuse cannot be given with speed",
        (("budget", "hard"),): "budget needs an NFE budget",
        (("speed", "turbo"),): "speed must be one of lossless, high, balanced, fast",
        (("speedup", 0.5),): r"speedup must be a number in \[1, ",
        (("nfe", 2.5),): "nfe must be an integer",
    }
    for knobs, message in cases.items():
        with pytest.raises(BadInput, match=message) as e:
            check_knobs("sencache", dict(knobs))
        assert e.value.param == str(e.value).split(" ")[0]
    with pytest.raises(BadInput, match="nfe does not apply to cache 'sencache-max'"):
        check_knobs("sencache-max", {"nfe": 10})


def test_a_budget_outside_the_steps_or_below_the_threshold_rule_is_refused():
    table = table_with(curves())
    with pytest.raises(BadInput, match=r"nfe 1 asks for 1 runs of 10 steps; a budget must lie in \[2, 10\]") as e:
        make_budget_policy({"nfe": 1}, table, 10, 1, 4)
    assert e.value.param == "nfe"
    with pytest.raises(BadInput, match=r"nfe 11 asks for 11 runs"):
        make_budget_policy({"nfe": 11, "budget": "hard"}, table, 10, 1, 4)
    with pytest.raises(BadInput, match=r"speedup 2.5 asks for 4.0 runs of 10 steps, fewer than .*budget hard"):
        make_budget_policy({"speedup": 2.5}, table, 10, 1, 4)
    hard = make_budget_policy({"speedup": 2.5, "budget": "hard"}, table, 10, 1, 4)
    assert isinstance(hard, SenCacheHardBudget) and hard.nfe == 4
    assert "eps_main" not in hard.settings() and hard.settings()["budget"] == {"mode": "hard", "nfe": 4}
    with pytest.raises(BadInput, match="no NFE-budget curves"):
        make_budget_policy({"nfe": 5}, TABLE, 10, 1, 4)


def test_the_threshold_mode_picks_eps_from_the_curve_in_the_recorded_ratio():
    policy = make_budget_policy({"speed": "high"}, table_with(curves()), 10, 2, 4)
    assert type(policy) is SenCachePolicy
    assert policy.config.eps_main == pytest.approx(0.125)  # 0.75 between 0.8 at 0.1 and 0.6 at 0.2
    assert policy.config.eps_start == pytest.approx(0.25 * 0.125)
    assert policy.settings()["budget"] == {"mode": "threshold", "requested_nfe": pytest.approx(7.5)}


@pytest.mark.parametrize("steps", [6, 10, 23])
def test_the_hard_mode_gives_every_sample_exactly_its_budget(steps):
    rng = np.random.default_rng(steps)
    profile = step_profile(curves(), steps)
    batch = 16
    for nfe in range(2, steps + 1):
        policy = SenCacheHardBudget(SenCacheSettings(0.0, 0.0, 3), TABLE, steps, batch, 4, nfe, profile)
        runs = np.zeros(batch, int)
        for i in range(steps):
            t = 1000.0 * (1 - i / steps)
            # random score traces: heavy-tailed drifts, some samples far from the profile
            drift = rng.lognormal(-3.0, 1.5, batch) ** 2 * rng.choice([0.0, 1.0, 50.0], batch)
            decision = policy.decide(i, t, None if i == 0 else drift)
            runs += decision.run
        assert runs.tolist() == [nfe] * batch, (steps, nfe)


def test_the_hard_mode_spends_its_runs_where_the_scores_are_highest():
    steps = 10
    policy = SenCacheHardBudget(SenCacheSettings(0.0, 0.0, 3), TABLE, steps, 2, 1, 4, np.full(steps, 0.01))
    trajectory = np.zeros((steps, 2, 1))
    trajectory[3:, 0] = 1.0  # sample 0 jumps at step 3 and again at 6; sample 1 never moves
    trajectory[6:, 0] = 2.0
    runs, _ = replay(policy, trajectory, np.full(steps, 500.0))
    assert runs.sum(axis=0).tolist() == [4, 4]
    ran = np.flatnonzero(runs[:, 0]).tolist()
    assert ran[:2] == [0, 3] and 6 <= ran[2] < 9  # at its jumps, not before them
    assert np.flatnonzero(runs[:, 1]).tolist() == [0, 7, 8, 9]  # no score: as late as the budget lets it


def test_replay_runs_the_rule_as_the_engine_calls_it():
    trajectory = np.zeros((5, 2, 4))
    trajectory[:, 1] = np.arange(5)[:, None]  # sample 1 moves by 1 per element a step: drift 2 / step
    policy = SenCachePolicy(SenCacheSettings(1.0, 1.0, 10), TABLE, 5, 2, 4)
    runs, scores = replay(policy, trajectory, np.full(5, 0.0))
    assert runs[:, 0].tolist() == [True, False, False, False, True]
    assert runs[:, 1].tolist() == [True, True, True, True, True]
    assert scores[1:4, 1] == pytest.approx([1.0, 1.0, 1.0])  # Jx(0) * 2 / sqrt(4), anchored at the step before


def test_the_budget_knobs_reach_the_command_line_and_server_schema():
    args = parser().parse_args(["generate", "--engine", "b", "--out", "o", "--nfe", "12", "--budget", "hard"])
    assert (args.nfe, args.budget, args.speedup, args.speed) == (12, "hard", None, None)
    args = parser().parse_args(["generate", "--engine", "b", "--out", "o", "--speed", "balanced"])
    assert args.speed == "balanced"


def test_the_budget_knobs_reach_the_server_schema():
    pydantic = pytest.importorskip("pydantic")  # the server's extra
    from sencache.serving.schema import CacheSpec

    spec = CacheSpec(method="sencache", knobs={"nfe": 12, "budget": "hard"})
    assert spec.resolve("sencache-online") == ("sencache", {"nfe": 12, "budget": "hard"})
    with pytest.raises(pydantic.ValidationError, match="cache.knobs.eps_main cannot be given with speedup"):
        CacheSpec(method="sencache", knobs={"speedup": 2.0, "eps_main": 0.3})


def test_a_calibrated_bundle_meets_a_hard_budget_exactly_and_records_curves(calibrated_bundle, tmp_path):
    engine = engine_for(calibrated_bundle)
    budget = engine.bundle.sensitivity().budget_curves()
    assert budget.steps == (4, 8, 16)
    # sencache-online's curve, measured by running it at the calibration's steps: a threshold budget runs it
    assert budget.online is not None and (budget.online.steps, len(budget.online.fractions)) == (8, 10)
    online = engine.policy("sencache-online", 8, 3, {"nfe": 5})
    assert online.settings()["eps_main"] == pytest.approx(online_eps_for_fraction(budget, 8, 5 / 8))
    for steps, nfe in ((8, 5), (12, 4)):
        request = GenerationParams(PROMPTS, [1, 2, 3], steps, 4.0)
        policy = engine.policy("sencache", steps, 3, {"nfe": nfe, "budget": "hard"})
        assert engine.generate(request, policy).nfe == [nfe] * 3
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            "--engine",
            str(calibrated_bundle),
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--seed",
            "1",
            "--seed",
            "2",
        ]
        + ["--steps", "8", "--nfe", "5", "--budget", "hard", "--out", str(out), "--threads", "1"]
    )
    assert code == 0
    stats = json.loads((out / "stats.json").read_text())
    assert [sample["nfe"] for sample in stats["samples"]] == [5, 5]
    assert stats["cache"]["budget"] == {"mode": "hard", "nfe": 5}
