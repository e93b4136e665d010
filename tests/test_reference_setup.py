"""The rest of the authors' setup (vita-epfl/SenCache) next to the engine's: Wan's sampling shift
as a run preset (`sampling="reference"`), and their calibration procedure (`procedure="reference"`:
training-distribution videos noised to each timestep, the conditional branch, one solver state per
sample stepped through its timesteps in order)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from conftest import engine_for
from sencache.calibration.calibrate import CalibrationPlan, SolverSteps, calibrate
from sencache.cli import main, parser
from sencache.data import clips
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import NoCache
from sencache.runtime.errors import BadInput
from sencache.runtime.families import resolve
from sencache.runtime.families.parts import make_scheduler
from sencache.runtime.prediction import predict
from sencache.runtime.request import GenerationParams

# -- Wan's sampling shift as a run preset ----------------------------------------------------------


def flow_sigmas(steps: int, shift: float) -> np.ndarray:
    """diffusers' flow sigmas, written out: linspace(1, 1/1000, N + 1) without the last, shifted by
    shift * s / (1 + (shift - 1) * s). (The original Wan code's grid is linspace(0.999, 0, N + 1),
    at most 0.001 away before the shift: a difference of diffusers' port, the same for both shifts.)"""
    sigmas = np.linspace(1, 1 / 1000, steps + 1)[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@pytest.mark.parametrize("model", ["tiny-wan", "wan2.1-t2v-1.3b"])
@pytest.mark.parametrize("steps", [2, 7, 30, 50])
def test_the_wan_preset_runs_diffusers_unipc_at_shift_5(model, steps):
    adapter, preset = resolve(model)
    default = adapter.scheduler_config(preset)
    config = adapter.reference_scheduler(dict(default), preset)
    ours = adapter.sampler(make_scheduler(adapter, preset, config), steps, preset, None)
    theirs = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0,
        solver_order=2,
        predict_x0=True,
        final_sigmas_type="zero",
    )
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.allclose(ours.scheduler.sigmas, theirs.sigmas)
    assert np.allclose(ours.scheduler.sigmas[:-1].numpy(), flow_sigmas(steps, 5.0), atol=1e-6)
    # the engine's default is untouched: diffusers' 480p shift (3.0) for these presets
    assert default["flow_shift"] == 3.0 == adapter.scheduler_config(preset)["flow_shift"]
    engine = adapter.sampler(make_scheduler(adapter, preset), steps, preset, None)
    assert np.allclose(engine.scheduler.sigmas[:-1].numpy(), flow_sigmas(steps, 3.0), atol=1e-6)
    assert not torch.equal(engine.timesteps, ours.timesteps)


@pytest.mark.parametrize("model", ["tiny-cogvideox", "cogvideox", "tiny-ltx", "ltx-video"])
def test_families_without_the_preset_refuse_it(model):
    adapter, preset = resolve(model)
    with pytest.raises(BadInput, match="sampling 'reference' is a preset of Wan") as e:
        adapter.reference_scheduler(adapter.scheduler_config(preset), preset)
    assert e.value.param == "sampling"


def test_the_preset_is_checked_and_named_on_every_surface():
    with pytest.raises(BadInput) as e:
        GenerationParams(["a"], [0], 4, 1.0, sampling="shift5")
    assert e.value.param == "sampling"
    adapter, preset = resolve("tiny-wan")
    with pytest.raises(BadInput) as e:
        adapter.reference_scheduler({**adapter.scheduler_config(preset), "_class_name": "DDIMScheduler"}, preset)
    assert e.value.param == "sampling"
    generate = parser().parse_args(["generate", "--engine", "e", "--out", "o", "--sampling", "reference"])
    assert generate.sampling == "reference" and generate.flag("sampling") == "--sampling"
    calibrate_args = parser().parse_args(["calibrate", "--engine", "e"])
    assert (calibrate_args.procedure, calibrate_args.solver_state, calibrate_args.branch) == ("engine", None, None)
    assert calibrate_args.flag("solver_state") == "--solver-state"


def test_the_preset_is_a_server_field():
    pydantic = pytest.importorskip("pydantic")  # the server's extra
    from sencache.serving.schema import VideoRequest, json_field

    assert VideoRequest(prompt="a").sampling == "engine"
    assert VideoRequest(prompt="a", sampling="reference").sampling == "reference"
    assert json_field("sampling") == "sampling"
    with pytest.raises(pydantic.ValidationError):
        VideoRequest(prompt="a", sampling="shift5")


def test_a_wan_run_with_the_preset(ort_bundle):
    model = engine_for(ort_bundle)
    prompt = ["one large white square static on black"]
    shifted = model.generate(GenerationParams(prompt, [3], 6, 4.0, sampling="reference"), NoCache(1))
    default = model.generate(GenerationParams(prompt, [3], 6, 4.0), NoCache(1))
    reference = UniPCMultistepScheduler.from_config({**model.bundle.manifest.scheduler, "flow_shift": 5.0})
    reference.set_timesteps(6)
    assert shifted.timesteps == [float(t) for t in reference.timesteps]
    unshifted = UniPCMultistepScheduler.from_config(model.bundle.manifest.scheduler)
    unshifted.set_timesteps(6)
    assert default.timesteps == [float(t) for t in unshifted.timesteps]
    assert shifted.timesteps != default.timesteps
    assert np.all(np.isfinite(shifted.latents)) and not np.allclose(shifted.latents, default.latents)
    assert model.bundle.manifest.scheduler["flow_shift"] == 3.0


# -- the solver state of calibration ---------------------------------------------------------------

STEPS = 6
SHAPE = (2, 3, 2, 4, 4)


def _inputs(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x_k, f_k) for every timestep: unrelated draws, as independently noised inputs are."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)) for _ in range(STEPS)]


def _wan_sampler():
    adapter, preset = resolve("tiny-wan")
    return adapter.sampler(make_scheduler(adapter, preset), STEPS, preset, None)


def test_the_per_sample_state_is_diffusers_stepped_through_the_timesteps_in_order():
    """The authors' handling: set_timesteps when a sample starts, then one step per timestep with
    that timestep's (x_k, f_k): diffusers' own scheduler driven so gives every x'."""
    solver = SolverSteps(_wan_sampler, "per-sample")
    fresh = SolverSteps(_wan_sampler, "fresh")
    adapter, preset = resolve("tiny-wan")
    for sample_seed in (1, 2):
        inputs = _inputs(sample_seed)
        scheduler = make_scheduler(adapter, preset)
        scheduler.set_timesteps(STEPS)  # the authors reset per sample
        solver.begin()
        fresh.begin()
        for k, (x_k, f_k) in enumerate(inputs):
            theirs = scheduler.step(f_k, scheduler.timesteps[k], x_k.clone(), return_dict=False)[0]
            ours = solver.step(k, f_k.numpy(), x_k.numpy(), [])
            assert np.allclose(ours, theirs.numpy(), atol=1e-6)
            alone = fresh.step(k, f_k.numpy(), x_k.numpy(), [])
            # they agree only where history cannot enter: the first step (none yet) and the last
            # (to sigma 0, x' is the x0 prediction of x_k, whatever the corrector did to x_k)
            assert np.allclose(alone, ours, atol=1e-6) == (k in (0, STEPS - 1))


def test_the_per_sample_state_resets_per_sample_and_steps_in_order():
    solver = SolverSteps(_wan_sampler, "per-sample")
    runs = []
    for _ in range(2):
        solver.begin()
        runs.append([solver.step(k, f.numpy(), x.numpy(), []) for k, (x, f) in enumerate(_inputs(5))])
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))
    solver.begin()
    x, f = _inputs(5)[0]
    with pytest.raises(ValueError, match="in order"):
        solver.step(1, f.numpy(), x.numpy(), [])
    with pytest.raises(BadInput) as e:
        CalibrationPlan(solver_state="shared")
    assert e.value.param == "solver_state"
    with pytest.raises(BadInput) as e:
        CalibrationPlan(procedure="paper")
    assert e.value.param == "procedure"


def test_the_plan_takes_each_procedures_defaults():
    engine = CalibrationPlan()
    reference = CalibrationPlan(procedure="reference")
    assert (engine.branch, engine.solver_state) == ("guided", "fresh")
    assert (reference.branch, reference.solver_state) == ("cond", "per-sample")
    mixed = CalibrationPlan(procedure="reference", branch="guided", solver_state="fresh")
    assert (mixed.branch, mixed.solver_state) == ("guided", "fresh")


# -- the authors' calibration procedure on tiny-wan ------------------------------------------------


def test_the_reference_procedure(ort_bundle):
    model = engine_for(ort_bundle)
    plan = CalibrationPlan(samples=2, steps=4, seed=11, procedure="reference")
    result = calibrate(model, plan, show_progress=False)
    assert result.baselines is None
    sensitivity = result.sensitivity
    timesteps = [float(t) for t in model.sampler(4).timesteps]
    assert sorted(sensitivity.timesteps.tolist()) == sorted(timesteps)  # every step, the last (to t = 0) too
    assert np.all(sensitivity.jx > 0) and np.all(sensitivity.jt > 0)
    assert sensitivity.counts is not None and np.all(sensitivity.counts == 2)
    meta = sensitivity.meta
    assert (meta["procedure"], meta["branch"], meta["solver_state"], meta["sampling"]) == (
        "reference",
        "cond",
        "per-sample",
        "engine",
    )
    captions, frames = clips.batch(np.random.default_rng(11), 2)
    assert meta["prompts"] == captions and meta["seeds"] == [11, 12]

    again = calibrate(model, plan, show_progress=False).sensitivity
    assert np.array_equal(again.jx, sensitivity.jx) and np.array_equal(again.jt, sensitivity.jt)
    engine_procedure = calibrate(model, CalibrationPlan(samples=2, steps=4, seed=11), show_progress=False).sensitivity
    assert engine_procedure.meta["procedure"] == "engine" and len(engine_procedure.timesteps) == 3
    on_the_same_timesteps = [sensitivity.lookup(t, nearest=True)[0] for t in engine_procedure.timesteps]
    assert not np.allclose(engine_procedure.jx, on_the_same_timesteps, rtol=0.05)
    fresh = calibrate(
        model,
        CalibrationPlan(samples=2, steps=4, seed=11, procedure="reference", solver_state="fresh"),
        show_progress=False,
    )
    # the first step has no solver history and the last lands on the x0 prediction; between, Jx
    # depends on the state (the test above shows where)
    order = np.argsort(-sensitivity.timesteps)
    ends = [0, -1]
    assert fresh.sensitivity.jx[order][ends] == pytest.approx(sensitivity.jx[order][ends], rel=1e-5)
    assert not np.allclose(fresh.sensitivity.jx[order][1:-1], sensitivity.jx[order][1:-1], rtol=1e-3)
    assert np.allclose(fresh.sensitivity.jt, sensitivity.jt, rtol=1e-6)

    # recomputed here from its parts for sample 0 at the first two timesteps: the clip, noised to
    # t_k with that sample's generator, the cond branch, diffusers' scheduler stepped in order
    captions, frames = clips.batch(np.random.default_rng(11), 1)
    x0 = torch.from_numpy(model.adapter.tiny_format.latents(frames))
    text = model.encode(captions)
    noise = torch.Generator().manual_seed(11)
    scheduler = model.scheduler()
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas

    def cond(x: np.ndarray, t: float) -> np.ndarray:
        return predict(model, x, np.full(1, t, np.float32), text, None, 1.0).cond

    per_sample = [[], []]
    for k in range(2):
        eps = torch.randn(x0.shape[1:], generator=noise)[None]
        x_k = ((1 - sigmas[k]) * x0 + sigmas[k] * eps).numpy()
        t_k, t_next = timesteps[k], timesteps[k + 1]
        f_k = cond(x_k, t_k)
        x_prime = scheduler.step(torch.from_numpy(f_k), scheduler.timesteps[k], torch.from_numpy(x_k.copy()))
        x_prime = x_prime.prev_sample.numpy()
        per_sample[0].append(np.linalg.norm(cond(x_prime, t_k) - f_k) / np.linalg.norm(x_prime - x_k))
        per_sample[1].append(np.linalg.norm(cond(x_k, t_next) - f_k) / abs(t_next - t_k))
    second = calibrate(
        model, CalibrationPlan(samples=1, steps=4, seed=11, procedure="reference"), show_progress=False
    ).sensitivity
    for k in range(2):
        jx, jt, _ = second.lookup(timesteps[k], nearest=True)
        assert (jx, jt) == pytest.approx((per_sample[0][k], per_sample[1][k]), rel=1e-4)


def test_the_reference_procedure_from_the_command_line(ort_bundle, tmp_path, capsys):
    bundle = tmp_path / "tiny-wan"
    shutil.copytree(ort_bundle, bundle)
    before = Bundle.load(bundle).manifest.files
    args = ["calibrate", "--engine", str(bundle), "--procedure", "reference", "--samples", "1", "--steps", "3"]
    assert main([*args, "--sampling", "reference", "--threads", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = Bundle.load(bundle)
    table = json.loads((bundle / "sensitivity.json").read_text())
    assert table["meta"]["procedure"] == "reference" and table["meta"]["sampling"] == "reference"
    assert table["meta"]["scheduler"]["flow_shift"] == 5.0
    shifted = UniPCMultistepScheduler.from_config({**loaded.manifest.scheduler, "flow_shift": 5.0})
    shifted.set_timesteps(3)
    assert sorted(table["timesteps"]) == sorted(float(t) for t in shifted.timesteps)
    assert ("baselines.json" in loaded.manifest.files) == ("baselines.json" in before)
    assert main([*args, "--overwrite", "--prompt", "one large white square static on black"]) == 2
    assert "--prompts: none are taken by the reference procedure" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-cogvideox"])
def test_data_is_noised_as_the_model_was_trained(model):
    """The reference procedure's x_k: Wan's flow interpolation at the step's sigma, CogVideoX's
    sqrt(a) x0 + sqrt(1 - a) noise at the step's alphas_cumprod (the tiny models' training objective)."""
    adapter, preset = resolve(model)
    scheduler = make_scheduler(adapter, preset)
    sampler = adapter.sampler(scheduler, 5, preset, None)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for k in range(5):
        if model == "tiny-wan":
            sigma = scheduler.sigmas[k]
            expected = (1 - sigma) * x0 + sigma * noise
        else:
            a = scheduler.alphas_cumprod[int(sampler.timesteps[k])]
            expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
        assert torch.allclose(sampler.noised(k, x0, noise), expected, atol=1e-6)


def test_the_reference_procedure_on_cogvideox(cogvideox_bundle):
    """CogVideoX: clips noised by its scheduler's add_noise, its DPM solver's state per sample."""
    model = engine_for(cogvideox_bundle)
    table = calibrate(
        model, CalibrationPlan(samples=2, steps=3, seed=4, procedure="reference"), show_progress=False
    ).sensitivity
    assert len(table.timesteps) == 3 and np.all(table.jx > 0) and np.all(table.jt > 0)
    assert table.meta["family"] == "cogvideox" and table.meta["solver_state"] == "per-sample"
    with pytest.raises(BadInput) as e:
        calibrate(model, CalibrationPlan(samples=1, steps=3, procedure="reference", sampling="reference"))
    assert e.value.param == "sampling"
