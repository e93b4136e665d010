"""The command line: bad input ends in exit status 2, one clear line, and no output written."""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
    before = (bundle_dir / "sensitivity.json").read_bytes()
    code, err = run_cli(capsys, "calibrate", "--engine", bundle_dir, "--import-npz", tmp_path / "authors.npz")
    assert code == 2 and "--overwrite not given" in err and "already has a sensitivity table" in err
    assert (bundle_dir / "sensitivity.json").read_bytes() == before
    code, err = run_cli(
        capsys, "calibrate", "--engine", bundle_dir, "--import-npz", tmp_path / "authors.npz", "--overwrite"
    )
    assert code == 0, err
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
    code, err = run_cli(capsys, "calibrate", "--engine", bundle_dir, "--prompt", "a dog on a beach", "--overwrite")
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
    helps = [
        subprocess.run([*command, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
        for command in ([sys.executable, "engine_builder/build_engine.py"], ["sencache", "build"])
    ]
    assert helps[0].returncode == 0 and "--fp8-prompts" in helps[0].stdout and helps[0].stdout == helps[1].stdout
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


def _subcommands():
    from sencache.cli import parser

    return parser()._subparsers._group_actions[0].choices


def test_every_option_says_what_it_does_and_shows_its_default():
    for name, command in _subcommands().items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings[0]} has no help"
        text = command.format_help()
        assert "default: None" not in text and "default: False" not in text, name
        for action in command._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action, argparse._HelpAction):
                shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                assert f"(default: {shown})" in " ".join(text.split()), f"{name} {action.option_strings[0]}"


def test_generate_help_gives_the_prompt_grammar_and_the_pairing():
    from sencache.runtime.tiny_grammar import FORM, SLOTS

    text = _subcommands()["generate"].format_help()
    assert FORM in text
    for slot, words in SLOTS.items():
        assert f"{slot}: {'|'.join(words)}" in text
    assert "--prompt and --seed repeat and pair up" in " ".join(text.split())


def test_words_of_the_vocabulary_out_of_the_grammar_are_refused(capsys, ort_bundle, tmp_path):
    from sencache.runtime.tiny_grammar import grammar_line

    code, err = run_cli(
        capsys,
        "generate",
        "--engine",
        ort_bundle,
        "--prompt",
        "one small red circles static on black",
        "--out",
        tmp_path / "out",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "word 4 'circles' should be a shape" in err and err.strip().endswith(grammar_line())
    assert not (tmp_path / "out").exists()


CHEAP = """
import contextlib, io, json, sys
from sencache.cli import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    heavy = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)
    print(json.dumps([code, err.getvalue().strip(), heavy]))
"""
HEAVY = ("torch", "onnxruntime", "diffusers", "ray")
"""What a refusal that needs no model must come before: importing any of these takes seconds."""


def _refused_before_heavy_imports(cases: list[tuple[list[str], str]]) -> None:
    """Run every case's argv in one fresh interpreter: each is refused (exit 2, one line holding its
    needle) while none of HEAVY is in sys.modules; the import-free path is what keeps it under 2 s."""
    done = subprocess.run(
        [sys.executable, "-c", CHEAP, json.dumps([argv for argv, _ in cases]), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases)
    for (argv, needle), (code, err, heavy) in zip(cases, results, strict=True):
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (argv, err)
        assert heavy == [], (argv, heavy)


def test_cheap_checks_fail_before_any_model_code_is_imported(tmp_path):
    """A wrong weights folder or model name, a missing or corrupt bundle and an output that needs
    --overwrite stop the command before torch (or ONNX Runtime, diffusers, Ray) is even imported."""
    from sencache.runtime.files import BUNDLE, staged_folder

    empty, corrupt, built = tmp_path / "empty", tmp_path / "corrupt", tmp_path / "built"
    empty.mkdir()
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{}")
    (corrupt / "manifest.sha256").write_text("0" * 64 + "  manifest.json\n")
    with staged_folder(built, BUNDLE) as folder:
        (folder / "manifest.json").write_text("{}")
    out, missing = str(tmp_path / "out"), str(tmp_path / "missing")
    _refused_before_heavy_imports(
        [
            (["build", "--model", "wan2.1-t2v-1.3b", "--weights", str(empty), "--out", out], "no transformer/config"),
            (["build", "--model", "tiny-wan", "--weights", missing, "--out", out], "--weights"),
            (["build", "--model", "tiny-wan", "--out", str(built)], "--overwrite not given"),
            (["build", "--model", "nonexistent-model", "--out", out], "unknown model 'nonexistent-model'"),
            (["generate", "--engine", missing, "--prompt", PROMPT, "--out", out], "no engine bundle"),
            (["generate", "--engine", str(corrupt), "--prompt", PROMPT, "--out", out], "does not match its digest"),
            (["calibrate", "--engine", missing], "no engine bundle"),
            (["bench", "--engine", str(corrupt), "--out", out], "does not match its digest"),
        ]
    )
    assert not (tmp_path / "out").exists()


def test_request_checks_on_a_bundle_fail_before_any_model_code_is_imported(ort_bundle, tmp_path):
    """What the bundle's manifest answers (steps, prompts and seeds that do not pair up, a guidance
    that is not a number, a knob out of range, threads, a prompt outside the tiny model's vocabulary
    or grammar) is refused before the heavy imports too."""
    out = str(tmp_path / "out")
    generate = ["generate", "--engine", str(ort_bundle), "--prompt", PROMPT, "--out", out]
    _refused_before_heavy_imports(
        [
            ([*generate, "--steps", "0"], "--steps must be in [1, 1000], got 0"),
            ([*generate, "--seed", "1", "--seed", "2"], "pair up"),
            ([*generate, "--guidance", "nan"], "--guidance"),
            ([*generate, "--eps-main", "-1"], "--eps-main"),
            ([*generate, "--threads", "5000"], "--threads must be in [0, 1024]"),
            (
                ["generate", "--engine", str(ort_bundle), "--prompt", "one small purple elephant", "--out", out],
                "vocabulary",
            ),
            (
                [
                    "generate",
                    "--engine",
                    str(ort_bundle),
                    "--prompt",
                    "small one red circle static on black",
                    "--out",
                    out,
                ],
                "--prompt",
            ),
            (["bench", "--engine", str(ort_bundle), "--steps", "0", "--out", out], "--steps must be in [1, 1000]"),
        ]
    )
    assert not (tmp_path / "out").exists()


def test_the_build_command_knows_every_model_of_the_registry():
    """build_engine.MODELS (read before torch is imported) names exactly the registry's models."""
    from sencache.engine_builder.build_engine import MODELS
    from sencache.runtime.families import ADAPTERS

    assert set(MODELS) == {name for adapter in ADAPTERS.values() for name in (*adapter.aliases, *adapter.presets)}


def test_a_real_model_without_weights_is_refused_by_the_option_check(tmp_path):
    """The build stops in BuildOptions.check, before the transformer is loaded or constructed."""
    from sencache.engine_builder.builder import BuildOptions, build
    from sencache.runtime.errors import BadInput

    with pytest.raises(BadInput) as raised:
        build(BuildOptions(model="wan2.1-t2v-1.3b", out=tmp_path / "b"))
    assert raised.value.param == "weights" and "weights must name a folder" in str(raised.value)
    frames = [entry.name for entry in raised.traceback]
    assert "check" in frames and "_load" not in frames and "build_transformer" not in frames
    assert not (tmp_path / "b").exists()


def test_an_earlier_demo_is_replaced_only_with_overwrite(capsys, tmp_path):
    from sencache.runtime.files import RUN, staged_folder

    out = tmp_path / "demo"
    with staged_folder(out / "none", RUN) as folder:
        (folder / "stats.json").write_text("{}")
    code, err = run_cli(capsys, "demo", "--out", out)
    assert code == 2 and "--overwrite not given" in err and "already holds a sencache run" in err
    assert sorted(p.name for p in out.iterdir()) == ["none"] and (out / "none" / "stats.json").read_text() == "{}"


def test_a_bench_report_is_replaced_only_with_overwrite(capsys, calibrated_bundle, tmp_path):
    from sencache.benchmarks.bench import KIND
    from sencache.runtime.files import staged_folder

    out = tmp_path / "bench"
    with staged_folder(out, KIND) as folder:
        (folder / "report.json").write_text("{}")
    code, err = run_cli(capsys, "bench", "--engine", calibrated_bundle, "--quick", "--out", out)
    assert code == 2 and "--overwrite not given" in err and "already holds a sencache bench report" in err
    assert (out / "report.json").read_text() == "{}"


def test_what_the_documented_commands_write_is_ignored_by_git():
    """Every output folder of a command in the README or docs/ (`--out X`, `-B X`) and every default
    --out of the command line is git-ignored, so following them leaves `git status` clean."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    pages = "".join(page.read_text() for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    folders = set(re.findall(r"(?:--out|-B)\s+([a-z][\w./-]*)", pages))
    folders |= {
        str(action.default)
        for command in _subcommands().values()
        for action in command._actions
        if action.dest == "out" and action.default is not None
    }
    assert {"bundles/cogvideox", "runs/x", "runs/demo", "build/capi"} <= folders
    for folder in sorted(f for f in folders if not f.startswith("benchmarks/results/")):  # reports: committed
        done = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", "--no-index", folder + "/"])
        assert done.returncode == 0, f"{folder} is not git-ignored"
