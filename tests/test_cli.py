"""The command line: bad input ends in exit status 2, one clear line, and no output written."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import relist, reseal
from sencache.cli import main
from sencache.runtime.bundle import Bundle

PROMPT = "one small red circle static on black"


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def generate_args(engine, out, *extra):
    return ["generate", "--engine", engine, "--prompt", PROMPT, "--seed", "1", "--steps", "4", "--out", out, *extra]


def test_missing_bundle(capsys, tmp_path):
    code, err = run_cli(capsys, *generate_args(tmp_path / "nope", tmp_path / "out"))
    assert code == 2 and "no engine bundle" in err
    assert not (tmp_path / "out").exists()


def test_corrupt_manifest(capsys, ort_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ort_bundle, broken)
    (broken / "manifest.json").write_text("{ not json")
    code, err = run_cli(capsys, *generate_args(broken, tmp_path / "out", "--cache", "none"))
    assert code == 2 and "manifest.json does not match its digest" in err
    digest = hashlib.sha256(b"{ not json").hexdigest()
    (broken / "manifest.sha256").write_text(f"{digest}  manifest.json\n")
    code, err = run_cli(capsys, *generate_args(broken, tmp_path / "out", "--cache", "none"))
    assert code == 2 and "corrupt manifest.json" in err
    assert not (tmp_path / "out").exists()


def test_tampered_stage_file(capsys, ort_bundle, tmp_path):
    broken = tmp_path / "tampered"
    shutil.copytree(ort_bundle, broken)
    with open(broken / "tail.onnx", "ab") as f:
        f.write(b"\0")
    code, err = run_cli(capsys, *generate_args(broken, tmp_path / "out", "--cache", "none"))
    assert code == 2 and "tail.onnx does not match its checksum" in err


def test_corrupt_or_missing_table(capsys, ort_bundle, calibrated_bundle, tmp_path):
    code, err = run_cli(capsys, *generate_args(ort_bundle, tmp_path / "out"))
    assert code == 2 and "sencache calibrate" in err
    broken = tmp_path / "badtable"
    shutil.copytree(calibrated_bundle, broken)
    table = json.loads((broken / "sensitivity.json").read_text())
    table["Jx"][2] = None
    (broken / "sensitivity.json").write_text(json.dumps(table))
    code, err = run_cli(capsys, *generate_args(broken, tmp_path / "out"))
    assert code == 2 and "sensitivity.json does not match its checksum" in err
    reseal(broken, lambda manifest: relist(manifest, broken, "sensitivity.json"))
    code, err = run_cli(capsys, *generate_args(broken, tmp_path / "out"))
    assert code == 2 and "corrupt sensitivity table" in err
    assert not (tmp_path / "out").exists()


def test_prompt_outside_vocabulary(capsys, ort_bundle, tmp_path):
    code, err = run_cli(
        capsys,
        "generate",
        "--engine",
        ort_bundle,
        "--prompt",
        "a purple dragon",
        "--seed",
        "1",
        "--cache",
        "none",
        "--out",
        tmp_path / "out",
    )
    assert code == 2 and "purple" in err and "dragon" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--steps", "0"], "--steps must be in [1, 1000], got 0"),
        (["--seed", "2"], "pair up"),
        (["--eps-main", "-1"], "--eps-main"),
        (["--guidance", "nan"], "--guidance"),
    ],
)
def test_bad_numbers(capsys, calibrated_bundle, tmp_path, extra, needle):
    code, err = run_cli(capsys, *generate_args(calibrated_bundle, tmp_path / "out"), *extra)
    assert code == 2 and needle in err
    assert not (tmp_path / "out").exists()


def test_too_many_samples_for_the_bundle(capsys, calibrated_bundle, tmp_path):
    args = ["generate", "--engine", calibrated_bundle, "--steps", "2", "--out", tmp_path / "out"]
    for seed in range(4):
        args += ["--prompt", PROMPT, "--seed", seed]
    code, err = run_cli(capsys, *args)
    assert code == 2 and "larger max_batch" in err


def test_unknown_model_and_missing_weights(capsys, tmp_path):
    code, err = run_cli(capsys, "build", "--model", "sora", "--out", tmp_path / "b")
    assert code == 2 and "unknown model 'sora'" in err
    code, err = run_cli(capsys, "build", "--model", "wan2.1-t2v-1.3b", "--out", tmp_path / "b")
    assert code == 2 and "--weights must name a folder" in err
    code, err = run_cli(
        capsys, "build", "--model", "wan2.1-t2v-1.3b", "--weights", tmp_path / "none", "--out", tmp_path / "b"
    )
    assert code == 2 and "--weights" in err and "no such folder" in err
    code, err = run_cli(capsys, "build", "--model", "tiny-wan", "--backend", "tensorrt", "--out", tmp_path / "b")
    assert code == 2 and "pip install" in err
    assert not (tmp_path / "b").exists()


def test_import_npz_round_trips(capsys, calibrated_bundle, tmp_path):
    bundle_dir = tmp_path / "imported"
    shutil.copytree(calibrated_bundle, bundle_dir)
    original = Bundle.load(bundle_dir).sensitivity()
    original.to_npz(tmp_path / "authors.npz")
    code, _ = run_cli(capsys, "calibrate", "--engine", bundle_dir, "--import-npz", tmp_path / "authors.npz")
    assert code == 0
    imported = Bundle.load(bundle_dir).sensitivity()
    np.testing.assert_array_equal(imported.timesteps, original.timesteps)
    np.testing.assert_array_equal(imported.jx, original.jx)
    np.testing.assert_array_equal(imported.jt, original.jt)


def test_calibrate_on_prompts_from_a_file(capsys, ort_bundle, tmp_path):
    bundle_dir = tmp_path / "b"
    shutil.copytree(ort_bundle, bundle_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\ntwo large blue squares moving up fast on texture\n")
    code, err = run_cli(
        capsys,
        "calibrate",
        "--engine",
        bundle_dir,
        "--prompts",
        prompts,
        "--prompt",
        PROMPT,
        "--steps",
        "4",
        "--threads",
        "1",
    )
    assert code == 0, err
    meta = Bundle.load(bundle_dir).sensitivity().meta
    assert meta["prompts"] == [PROMPT, "two large blue squares moving up fast on texture", PROMPT]
    assert meta["samples"] == 3
    code, err = run_cli(capsys, "calibrate", "--engine", bundle_dir, "--prompt", "a dog on a beach")
    assert code == 2 and "outside the tiny model's vocabulary: a, dog, beach" in err


def test_device_flag_is_checked(capsys, ort_bundle, torch_bundle, tmp_path):
    """--device places torch bundles only; a GPU that is not there is one clear line."""
    import torch

    code, err = run_cli(capsys, *generate_args(ort_bundle, tmp_path / "a", "--device", "cuda"))
    assert code == 2 and "applies to torch bundles" in err
    code, err = run_cli(capsys, *generate_args(torch_bundle, tmp_path / "b", "--device", "npu:7"))
    assert code == 2 and "--device" in err
    if not torch.cuda.is_available():
        code, err = run_cli(capsys, *generate_args(torch_bundle, tmp_path / "c", "--device", "cuda"))
        assert code == 2 and "sees no CUDA GPU" in err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_build_engine_script_is_the_build_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "engine_builder/build_engine.py", "--model", "sora", "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "unknown model" in done.stderr
    done = subprocess.run(
        ["sencache", "generate", "--engine", str(tmp_path / "none"), "--prompt", PROMPT, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_doctor_reports_this_machine(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "CPUExecutionProvider" in out and "nvrtc" in out


def test_output_folder_may_not_replace_the_bundle(capsys, ort_bundle):
    code, err = run_cli(capsys, *generate_args(ort_bundle, ort_bundle, "--cache", "none"))
    assert code == 2 and "would replace the engine bundle" in err
    code, err = run_cli(capsys, *generate_args(ort_bundle, ort_bundle.parent, "--cache", "none"))
    assert code == 2
    assert Bundle.load(ort_bundle)


def test_a_foreign_output_folder_is_never_replaced(capsys, ort_bundle, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    code, err = run_cli(capsys, *generate_args(ort_bundle, mine, "--cache", "none"))
    assert code == 2 and "not ours to replace" in err
    code, err = run_cli(capsys, "build", "--model", "tiny-wan", "--out", mine)
    assert code == 2 and "not ours to replace" in err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    code, err = run_cli(capsys, *generate_args(ort_bundle, tmp_path / "o", "--cache", "none", "--threads", "-1"))
    assert code == 2 and "--threads" in err


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-ltx"])
def test_every_tiny_model_builds_and_generates(capsys, tmp_path, model):
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    assert main(["build", "--model", model, "--out", str(bundle), "--max-batch", "1"]) == 0
    code, err = run_cli(capsys, *generate_args(bundle, out, "--cache", "none"))
    assert code == 0, err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"][0]["nfe"] == 4 and (out / stats["samples"][0]["video"]).stat().st_size > 0
    manifest = Bundle.load(bundle).manifest
    assert manifest.trained == (model != "tiny-ltx")
    assert ("UNTRAINED" in err) == (model == "tiny-ltx")
