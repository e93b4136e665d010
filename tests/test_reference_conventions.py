"""SenCache under `conventions="reference"` decides as the authors' code does (vita-epfl/SenCache:
Wan2.1/sencache.py, CogVideoX/sencache.py, LTX-Video/sencache.py).

`AuthorsRule` below is an independent transcription of their per-step decision, written from
their code and sharing nothing with the engine's policy: their call counter, retention zone,
dual threshold scaled by a fixed constant, `np.argmin` look-up in their (descending) table order,
and consecutive-skip limit. It is replayed on the engine's own recorded runs of every tiny model
(the latent and timestep each step's denoiser saw), decision by decision, sample by sample.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import engine_for
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.cli import main, parser
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import NoCache, check_knobs
from sencache.runtime.cache.sencache import SenCachePolicy, SenCacheSettings
from sencache.runtime.conventions import engine_conventions
from sencache.runtime.errors import BadInput
from sencache.runtime.families import ADAPTERS
from sencache.runtime.prediction import predict
from sencache.runtime.preparation import sample_generators
from sencache.runtime.request import GenerationParams
from sencache.runtime.sensitivity import SensitivityTable

STEP_COUNTS = (12, 22, 27, 28, 30, 50)
REPLAY_STEPS = STEP_COUNTS[:-1]
"""The step counts the engine's runs are replayed at: between them they land the switch and the
forced steps in every way the conventions can (round(0.2 N) and Wan's round(0.4 N) rounded down
and up, odd and even; LTX's forced ends 0 and 1). N = 50 adds no new case (the pure test below
checks its switch and forced steps) and would cost as much as the rest together."""
CONSTANTS = {"wan": 1447.97790038, "cogvideox": 1099.8181667894016, "ltx": 1015.9685034488028}
"""The authors' JACOBIAN_SCALING_FACTOR / SCALING_FACTOR of each family."""


class AuthorsRule:
    """The authors' SenCache decision for one sample, transcribed from their three forward passes.

    Wan calls the model twice per step (cond, then uncond) and counts both; its cond call of step
    i is call 2i and decides for both. CogVideoX and LTX batch cond and uncond into one call."""

    def __init__(
        self,
        family: str,
        timesteps: np.ndarray,
        j_x: np.ndarray,
        j_t: np.ndarray,
        thresh_start: float,
        thresh_main: float,
        k: int,
        steps: int,
    ) -> None:
        self.timesteps, self.j_x, self.j_t = timesteps, j_x, j_t  # in the authors' stored order
        self.threshold_start = thresh_start * CONSTANTS[family]
        self.threshold_main = thresh_main * CONSTANTS[family]
        self.k = k
        if family == "wan":
            self.calls_per_step = 2
            total_calls = steps * 2
            self.threshold_switch_step = int(round(total_calls * 0.2))
            self.ret_steps = 0
            self.cutoff_steps = total_calls - 0
        elif family == "cogvideox":
            self.calls_per_step = 1
            self.threshold_switch_step = int(round(steps * 0.2))
            self.ret_steps = 1
            self.cutoff_steps = steps - 1
        else:
            self.calls_per_step = 1
            self.threshold_switch_step = int(round(steps * 0.2))
            self.ret_steps = int(round(steps * 0.02))
            self.cutoff_steps = steps - self.ret_steps
        self.cached_z: np.ndarray | None = None
        self.cached_t = 0.0
        self.cached_j_z = 0.0
        self.cached_j_t = 0.0
        self.accumulated_skips = 0

    def calculate(self, step: int, z_t: np.ndarray, t: float) -> bool:
        """Whether the (conditional) call of `step` runs the blocks, at latent `z_t` and timestep `t`."""
        cnt = step * self.calls_per_step
        threshold = self.threshold_start if cnt < self.threshold_switch_step else self.threshold_main
        in_skip_zone = self.ret_steps <= cnt < self.cutoff_steps
        should_calculate = True
        if in_skip_zone and self.cached_z is not None:
            norm_delta_z = float(np.linalg.norm((z_t.astype(np.float64) - self.cached_z).ravel()))
            norm_delta_t = abs(t - self.cached_t)
            error = self.cached_j_z * norm_delta_z + self.cached_j_t * norm_delta_t
            if error < threshold and self.accumulated_skips < self.k:
                should_calculate = False
                self.accumulated_skips += 1
        if should_calculate:
            self.accumulated_skips = 0
            self.cached_z = z_t.astype(np.float64)
            self.cached_t = t
            nearest = np.argmin(np.abs(self.timesteps - t))
            self.cached_j_z = float(self.j_x[nearest])
            self.cached_j_t = float(self.j_t[nearest])
        return should_calculate


# -- the conventions themselves, per family (no bundle) ------------------------------------------


@pytest.mark.parametrize("family", sorted(CONSTANTS))
@pytest.mark.parametrize("steps", STEP_COUNTS + (1, 2, 5, 25, 26, 75, 100))
def test_switch_and_forced_steps_are_the_authors(family, steps):
    conventions = ADAPTERS[family].sencache_reference
    rule = AuthorsRule(family, np.array([1000.0, 0.0]), np.ones(2), np.ones(2), 0.0, 0.0, 0, steps)
    first_main = next((i for i in range(steps) if i * rule.calls_per_step >= rule.threshold_switch_step), steps)
    assert min(conventions.switch_step(steps), steps) == first_main
    zone = [rule.ret_steps <= i * rule.calls_per_step < rule.cutoff_steps for i in range(steps)]
    forced = [not z or i == 0 for i, z in enumerate(zone)]  # step 0 has no anchor to reuse from
    assert [conventions.forced(i, steps) for i in range(steps)] == forced
    assert conventions.score_constant == CONSTANTS[family]
    assert conventions.nearest_lookup


def test_image_to_video_families_keep_the_conventions_of_the_family_they_extend():
    """The authors published text-to-video conventions only: every other family's adapter extends
    one of theirs and keeps its record."""
    for family, adapter in ADAPTERS.items():
        base = next(f for f in CONSTANTS if isinstance(adapter, type(ADAPTERS[f])))
        assert adapter.sencache_reference == ADAPTERS[base].sencache_reference
        assert family == base or family.startswith(f"{base}-")


def test_the_conventions_differ_where_the_issue_says():
    wan, cog, ltx = (ADAPTERS[f].sencache_reference for f in ("wan", "cogvideox", "ltx"))
    assert [wan.switch_step(n) for n in (12, 22, 27, 28)] == [3, 5, 6, 6]  # 2i >= round(0.4 N)
    assert [cog.switch_step(n) for n in (12, 22, 27, 28)] == [2, 4, 5, 6]  # i >= round(0.2 N)
    assert [ltx.switch_step(n) for n in (12, 22, 27, 28)] == [2, 4, 5, 6]
    assert [i for i in range(30) if wan.forced(i, 30)] == [0]
    assert [i for i in range(30) if cog.forced(i, 30)] == [0, 29]
    assert [i for i in range(22) if ltx.forced(i, 22)] == [0]  # int(round(0.44)) = 0
    assert [i for i in range(30) if ltx.forced(i, 30)] == [0, 29]
    engine = engine_conventions()
    assert engine.switch_step(22) == 4 and [i for i in range(22) if engine.forced(i, 22)] == [0, 21]
    assert engine.scale(16) == 4.0 and wan.scale(16) == CONSTANTS["wan"]


def test_nearest_lookup_takes_the_table_entry_and_the_authors_tie():
    descending = np.array([900.0, 600.0, 300.0])
    jx, jt = np.array([3.0, 2.0, 1.0]), np.array([0.3, 0.2, 0.1])
    table = SensitivityTable(descending, jx, jt)
    for t in (1000.0, 760.0, 750.0, 740.0, 450.0, 449.0, 100.0):
        index = int(np.argmin(np.abs(descending - t)))  # the authors' look-up on their order
        assert table.lookup(t, nearest=True)[:2] == (jx[index], jt[index])
    assert table.lookup(750.0)[:2] == pytest.approx((2.5, 0.25))  # the engine interpolates


def test_reference_policy_compares_the_raw_score_with_eps_times_the_constant():
    table = SensitivityTable(np.array([0.0, 500.0, 1000.0]), np.array([1.0, 2.0, 4.0]), np.array([0.0, 0.0, 0.0]))
    reference = ADAPTERS["cogvideox"].sencache_reference
    settings = SenCacheSettings(0.01, 0.01, 5, conventions="reference")
    policy = SenCachePolicy(settings, table, 10, 1, numel=4, conventions=reference)
    policy.decide(0, 700.0, None)  # runs; nearest entry 500 -> Jx = 2 (interpolated: 2.8)
    limit = 0.01 * CONSTANTS["cogvideox"]  # 10.998...
    below = policy.decide(1, 650.0, np.array([(limit / 2 - 1e-9) ** 2]))
    assert not below.run[0] and below.score[0] == pytest.approx((limit - 2e-9) / CONSTANTS["cogvideox"])
    assert policy.decide(2, 600.0, np.array([(limit / 2) ** 2])).run[0]


def test_the_knob_flows_through_table_and_cli():
    assert check_knobs("sencache", {"conventions": "reference"}) == {"conventions": "reference"}
    assert check_knobs("sencache-max", {"conventions": "engine"}) == {"conventions": "engine"}
    with pytest.raises(BadInput) as e:
        check_knobs("sencache", {"conventions": "paper"})
    assert e.value.param == "conventions" and str(e.value).startswith("conventions must be one of engine, reference")
    with pytest.raises(BadInput) as e:
        check_knobs("teacache", {"conventions": "reference"})
    assert e.value.param == "conventions"
    with pytest.raises(BadInput):
        SenCacheSettings(0.1, 0.1, 3, conventions="authors")
    args = parser().parse_args(["generate", "--engine", "b", "--out", "o", "--conventions", "reference"])
    assert args.conventions == "reference"
    assert parser().parse_args(["generate", "--engine", "b", "--out", "o"]).conventions is None
    assert parser().parse_args(["calibrate", "--engine", "b", "--branch", "cond"]).branch == "cond"
    assert parser().parse_args(["calibrate", "--engine", "b"]).branch is None  # the procedure's: guided


def test_the_knob_flows_through_the_server_schema():
    pydantic = pytest.importorskip("pydantic")  # the server's extra
    from sencache.serving.schema import CacheSpec

    spec = CacheSpec(method="sencache", knobs={"conventions": "reference", "eps_main": 0.2})
    assert spec.resolve("sencache") == ("sencache", {"eps_main": 0.2, "conventions": "reference"})
    with pytest.raises(pydantic.ValidationError):
        CacheSpec(method="sencache", knobs={"conventions": "paper"})


# -- replay on recorded runs of every tiny model --------------------------------------------------

PROMPTS = ["two large green circles moving down fast on gradient", "one small red square moving right slow on black"]
EPS = {"wan": (0.01, 0.06), "cogvideox": (0.15, 0.6), "ltx": (0.01, 0.06)}
"""eps_start, eps_main per family: on the tables below they mix runs and reuses (30-60% reuses)."""


def authors_table(model, steps: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A table in the authors' format and order (descending timesteps, as their calibration walks
    the schedule) at a coarse step count, so that nearest and interpolated look-ups differ; Jx is
    scaled so that eps reads as an RMS drift on the tiny latents, and varies along t."""
    timesteps = np.asarray(model.sampler(steps).timesteps, np.float64)
    profile = np.linspace(0.6, 1.8, steps)
    j_x = profile * CONSTANTS[model.bundle.manifest.family] / np.sqrt(model.numel)
    j_t = profile[::-1] * j_x * 1e-3
    return timesteps, j_x, j_t


def with_authors_table(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    bundle = Bundle.load(out)
    timesteps, j_x, j_t = authors_table(engine_for(out))
    bundle.write_tables(SensitivityTable(timesteps, j_x, j_t, meta={"source": "test, authors' order"}))
    return out


@pytest.fixture(scope="module", params=["wan", "cogvideox", "ltx"])
def tiny(request, ort_bundle, cogvideox_bundle, ltx_bundle, tmp_path_factory):
    source = {"wan": ort_bundle, "cogvideox": cogvideox_bundle, "ltx": ltx_bundle}[request.param]
    return request.param, engine_for(with_authors_table(source, tmp_path_factory.mktemp("reference") / request.param))


def test_reference_runs_match_the_authors_rule_decision_by_decision(tiny):
    family, model = tiny
    timesteps, j_x, j_t = authors_table(model)
    eps_start, eps_main, k = *EPS[family], 3
    knobs = {"eps_start": eps_start, "eps_main": eps_main, "max_reuse": k, "conventions": "reference"}
    decisions, mismatches, reuses = 0, [], 0
    for steps in REPLAY_STEPS:
        request = GenerationParams(PROMPTS, [1, 2], steps, model.bundle.manifest.defaults.guidance)
        result = model.generate(request, model.policy("sencache", steps, len(PROMPTS), knobs), record=True)
        for b in range(len(PROMPTS)):
            rule = AuthorsRule(family, timesteps, j_x, j_t, eps_start, eps_main, k, steps)
            for i in range(steps):
                theirs = rule.calculate(i, result.trajectory[i][b], float(result.timesteps[i]))
                ours = result.decisions[b][i] == "run"
                decisions += 1
                reuses += not ours
                if theirs != ours:
                    mismatches.append((steps, b, i))
    assert mismatches == [], f"{len(mismatches)} of {decisions} decisions differ: {mismatches[:10]}"
    assert 0.2 * decisions < reuses < 0.8 * decisions, f"{reuses} reuses of {decisions}: the replay tests little"


def test_authors_npz_then_generate_with_reference_conventions(capsys, calibrated_bundle, tmp_path):
    """The user's path: import the authors' table, generate under their conventions from the CLI."""
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(calibrated_bundle, bundle_dir)
    model = engine_for(bundle_dir)
    timesteps, j_x, j_t = authors_table(model)
    npz = tmp_path / "sensitivity_wan21.npz"
    np.savez(npz, timesteps=timesteps, J_x_norm=j_x, J_t_norm=j_t)
    assert main(["calibrate", "--engine", str(bundle_dir), "--import-npz", str(npz), "--overwrite"]) == 0
    out = tmp_path / "run"
    code = main(
        [
            "generate",
            "--engine",
            str(bundle_dir),
            "--prompt",
            PROMPTS[0],
            "--seed",
            "1",
            "--steps",
            "12",
            "--eps-start",
            "0.01",
            "--eps-main",
            "0.06",
            "--max-reuse",
            "3",
            "--conventions",
            "reference",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["cache"]["conventions"] == "reference"
    assert stats["samples"][0]["nfe"] < 12
    with pytest.raises(SystemExit) as e:
        main(
            [
                "generate",
                "--engine",
                str(bundle_dir),
                "--prompt",
                PROMPTS[0],
                "--conventions",
                "paper",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
    assert e.value.code == 2 and "--conventions" in capsys.readouterr().err


def test_calibration_on_the_conditional_branch(ort_bundle):
    """branch="cond" measures Jx, Jt of the conditional output alone (the authors' calibration),
    here recomputed along the same recorded trajectory without any unconditional call."""
    model = engine_for(ort_bundle)
    plan = CalibrationPlan(samples=1, steps=4, seed=7, branch="cond")
    table = calibrate(model, plan, PROMPTS[:1], show_progress=False).sensitivity
    guided = calibrate(model, CalibrationPlan(samples=1, steps=4, seed=7), PROMPTS[:1], show_progress=False).sensitivity
    assert table.meta["branch"] == "cond" and guided.meta["branch"] == "guided"
    guidance = model.bundle.manifest.defaults.guidance
    assert guidance > 1.0
    run = model.generate(GenerationParams(PROMPTS[:1], [7], 4, guidance), NoCache(1), record=True)
    text = model.encode(PROMPTS[:1])
    for k in range(3):
        x_k, t_k, t_next = run.trajectory[k], run.timesteps[k], run.timesteps[k + 1]

        def cond(x: np.ndarray, t: float) -> np.ndarray:
            return predict(model, x, np.full(1, t, np.float32), text, None, 1.0).guided

        f_k = cond(x_k, t_k)
        sampler = model.sampler(4)
        sampler.start_at(k)
        x_prime = sampler.step(
            k, torch.from_numpy(f_k), torch.from_numpy(x_k.copy()), sample_generators([7 + k])
        ).numpy()
        jx = np.linalg.norm((cond(x_prime, t_k) - f_k).astype(np.float64)) / np.linalg.norm(
            (x_prime - x_k).astype(np.float64)
        )
        jt = np.linalg.norm((cond(x_k, t_next) - f_k).astype(np.float64)) / abs(t_next - t_k)
        assert table.lookup(t_k, nearest=True)[:2] == pytest.approx((jx, jt), rel=1e-4)
    assert not np.allclose(table.jx, guided.jx, rtol=1e-3)
    with pytest.raises(BadInput) as e:
        CalibrationPlan(branch="uncond")
    assert e.value.param == "branch"
