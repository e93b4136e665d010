"""Fault suite: other people's files, other people's bundles, and interrupted writers.

Every case asserts the exit status, that stderr is one line without a traceback, and the state of
the folders afterwards: no user file deleted or changed, no half-written output, no leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import relist, reseal
from sencache.cli import main
from sencache.runtime.bundle import DIGEST, MANIFEST, Bundle
from sencache.runtime.errors import BadInput
from sencache.runtime.files import OWNER, output_lock, recover, staged_folder

PROMPT = "one small red circle static on black"


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code != 0:
        assert len(err.strip().splitlines()) == 1, err
    return code, err


def generate(engine, out, *extra):
    return [
        "generate",
        "--engine",
        engine,
        "--prompt",
        PROMPT,
        "--seed",
        "1",
        "--steps",
        "3",
        "--cache",
        "none",
        "--out",
        out,
        *extra,
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".sencache-" in p.name)


@pytest.fixture
def copy(ort_bundle, tmp_path):
    """A private copy of the tiny-wan ONNX bundle."""
    target = tmp_path / "bundle"
    shutil.copytree(ort_bundle, target)
    return target


# 1. Data loss: a folder is ours only by the marker the tool writes.


@pytest.mark.parametrize("marker", ["manifest.json", "stats.json", "report.json", OWNER])
def test_a_marker_name_does_not_make_a_folder_ours(capsys, ort_bundle, calibrated_bundle, tmp_path, marker):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / marker).write_text('{"tool": "sencache", "kind": "run", "files": []}' if marker == OWNER else "{}")
    (mine / "background.js").write_text("precious")
    before = snapshot(mine)
    for args in (
        ["build", "--model", "tiny-wan", "--out", mine],
        generate(ort_bundle, mine),
        ["bench", "--engine", calibrated_bundle, "--quick", "--out", mine],
    ):
        code, err = run(capsys, *args)
        assert code == 2 and ("did not write" in err or "not a bundle" in err or "not a bench" in err), err
        assert snapshot(mine) == before
    assert leftovers(tmp_path) == []


def test_our_own_run_is_replaced_but_not_with_a_user_file_added(capsys, ort_bundle, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, *generate(ort_bundle, out))[0] == 0
    first = json.loads((out / OWNER).read_text())
    assert first["kind"] == "run" and "stats.json" in first["files"]
    before = snapshot(out)
    code, err = run(capsys, *generate(ort_bundle, out, "--steps", "2"))
    assert code == 2 and "--overwrite not given" in err and "already holds a sencache run" in err
    assert snapshot(out) == before
    assert run(capsys, *generate(ort_bundle, out, "--steps", "2", "--overwrite"))[0] == 0
    assert json.loads((out / "stats.json").read_text())["steps"] == 2
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, err = run(capsys, *generate(ort_bundle, out, "--overwrite"))
    assert code == 2 and "'notes.txt'" in err
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_run_folder_is_not_replaced_by_a_bundle(capsys, ort_bundle, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, *generate(ort_bundle, out))[0] == 0
    code, err = run(capsys, "build", "--model", "tiny-wan", "--out", out)
    assert code == 2 and "holds a sencache run, not a bundle" in err


# 2. Integrity: every file the loader opens is listed and checked; the manifest has a digest.


def test_a_manifest_edit_without_its_digest_is_caught(capsys, copy, tmp_path):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["defaults"]["steps"] = 31
    (copy / MANIFEST).write_text(json.dumps(manifest))
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "does not match its digest" in err
    (copy / DIGEST).unlink()
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "manifest.sha256 is missing" in err
    assert not (tmp_path / "out").exists()


def test_an_unlisted_stage_file_is_refused(capsys, copy, tmp_path):
    data = bytearray((copy / "blocks.onnx").read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(len(data) // 2, len(data), 2000):
        data[i] ^= 1 << int(rng.integers(8))
    (copy / "blocks.onnx").write_bytes(bytes(data))
    reseal(copy, lambda m: m["files"].pop("blocks.onnx"))
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "blocks.onnx is not listed" in err
    assert not (tmp_path / "out").exists()


def test_empty_file_list_and_a_flipped_bit(capsys, copy, tmp_path):
    data = bytearray((copy / "head.onnx").read_bytes())
    data[len(data) // 2] ^= 0x10
    (copy / "head.onnx").write_bytes(bytes(data))
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "head.onnx does not match its checksum" in err
    reseal(copy, lambda m: m.update(files={}))
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "is not listed" in err


def test_an_unlisted_table_is_refused(capsys, copy, calibrated_bundle, tmp_path):
    shutil.copyfile(calibrated_bundle / "sensitivity.json", copy / "sensitivity.json")
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "sensitivity.json is not listed" in err


@pytest.mark.parametrize(
    "where,name",
    [
        ("stage", "../elsewhere/blocks.onnx"),
        ("stage", "/etc/passwd"),
        ("text", "../../../../etc/passwd"),
        ("text", "sub/../../x"),
        ("files", "../../../../etc/passwd"),
    ],
)
def test_names_that_leave_the_bundle_are_refused_before_opening(capsys, copy, tmp_path, where, name):
    def edit(m):
        if where == "stage":
            m["stages"]["blocks"]["file"] = name
        elif where == "text":
            m["text_encoder"]["file"] = name
        else:
            m["files"][name] = {"bytes": 1, "sha256": "0" * 64}

    reseal(copy, edit)
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "plain relative name" in err
    assert "exist" not in err and "missing" not in err  # says nothing of what lies outside


def test_a_link_leaving_the_bundle_is_refused(capsys, copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(copy / "tail.onnx", outside)
    (copy / "tail.onnx").symlink_to(outside)
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "symbolic link" in err


# 3. The manifest's schema, the family and the graphs.

CORRUPTIONS = [
    (lambda m: m["defaults"].pop("sencache"), "defaults.sencache is missing"),
    (lambda m: m["stages"].pop("head"), "stages.head is missing"),
    (lambda m: m.pop("shapes"), "shapes is missing"),
    (lambda m: m.update(files=list(m["files"])), "files must be a JSON object"),
    (lambda m: m["defaults"]["sencache"].update(eps_main="0.3"), "defaults.sencache.eps_main must be a finite number"),
    (lambda m: m["shapes"].update(frames=10**12), "shapes.frames must be an integer in [1, 1024]"),
    (lambda m: m["shapes"].update(max_batch="3"), "shapes.max_batch must be an integer"),
    (lambda m: m["defaults"].update(steps=10**9), "defaults.steps must be an integer in [1, 1000]"),
    (lambda m: m["scheduler"].update(_class_name="DiffusionPipeline"), "is not a diffusers scheduler"),
    (lambda m: m["scheduler"].update(_class_name="os.system"), "is not a diffusers scheduler"),
    (lambda m: m.update(family="sora"), "unknown model family"),
    (lambda m: m["stages"]["blocks"].update(outputs=["noise"]), "stages.blocks inputs/outputs"),
    (lambda m: m["shapes"].update(frames=16), "shapes.latent [3, 8, 32, 32] is not the [3, 16, 32, 32]"),
    (lambda m: m.update(format="sencache-bundle/1"), "rebuild it"),
    (lambda m: m["text_encoder"].update(dim=-1), "text_encoder.dim must be an integer"),
]


@pytest.mark.parametrize("edit,needle", CORRUPTIONS)
def test_manifest_corruption_is_one_line_naming_the_field(capsys, copy, tmp_path, edit, needle):
    reseal(copy, edit)
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_shapes_that_lie_about_the_graph(capsys, copy, tmp_path):
    """frames 16 in the manifest (with a consistent latent), 8 in the graph."""

    def edit(m):
        m["shapes"].update(frames=16, latent=[3, 16, 32, 32])

    reseal(copy, edit)
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "head.onnx takes latent of shape" in err


def test_a_swapped_stage_with_a_matching_hash(capsys, copy, tmp_path):
    shutil.copyfile(copy / "tail.onnx", copy / "head.onnx")
    reseal(copy, lambda m: relist(m, copy, "head.onnx"))
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "not the head stage's" in err


def test_a_corrupt_text_encoder_with_a_matching_hash(capsys, copy, tmp_path):
    (copy / "text_encoder.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    reseal(copy, lambda m: relist(m, copy, "text_encoder.safetensors"))
    code, err = run(capsys, *generate(copy, tmp_path / "out"))
    assert code == 2 and "is not a tiny text encoder" in err


# 4. Requests and options: bounds, checked before the work.


@pytest.mark.parametrize(
    "args,needle",
    [
        (["build", "--model", "tiny-wan", "--frames", "0", "--out", "{tmp}/b"], "--frames must be in [1, 1024]"),
        (
            ["build", "--model", "tiny-wan", "--max-batch", "100000", "--out", "{tmp}/b"],
            "--max-batch must be in [1, 64]",
        ),
        (
            [
                "generate",
                "--engine",
                "{ort}",
                "--prompt",
                PROMPT,
                "--steps",
                "1000000000",
                "--cache",
                "none",
                "--out",
                "{tmp}/o",
            ],
            "--steps must be in [1, 1000]",
        ),
        (
            [
                "generate",
                "--engine",
                "{ort}",
                "--prompt",
                PROMPT,
                "--threads",
                "100000",
                "--cache",
                "none",
                "--out",
                "{tmp}/o",
            ],
            "--threads must be in [0, 1024]",
        ),
        (["calibrate", "--engine", "{ort}", "--seed", "-1"], "--seed must be in"),
        (["calibrate", "--engine", "{ort}", "--steps", "5000"], "--steps must be in [2, 1000]"),
        (["demo", "--threads", "-1", "--out", "{tmp}/d"], "--threads must be in [1, 1024]"),
        (["demo", "--out", "{tmp}/afile"], "is a file, not a folder"),
        (["demo", "--repeats", "0", "--out", "{tmp}/d"], "--repeats must be in [1, 10]"),
        (["bench", "--engine", "{ort}", "--repeats", "0", "--out", "{tmp}/b"], "--repeats must be in [1, 10]"),
        (["generate", "--engine", "{ort}", "--prompt", "red " * 10_000, "--out", "{tmp}/o"], "words"),
        (["calibrate", "--engine", "{ort}", "--import-npz", "{tmp}/table2d.npz"], "must be one-dimensional"),
        (["generate", "--engine", "{ort}", "--steps", "x"], "invalid int value"),
    ],
)
def test_bad_options_are_one_line_before_any_work(capsys, ort_bundle, tmp_path, args, needle):
    (tmp_path / "afile").write_text("mine")
    np.savez(tmp_path / "table2d.npz", timesteps=np.ones((2, 3)), J_x_norm=np.ones((2, 3)), J_t_norm=np.ones((2, 3)))
    before = snapshot(ort_bundle)
    argv = [a.format(tmp=tmp_path, ort=ort_bundle) for a in args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 1000 and "Traceback" not in err
    assert snapshot(ort_bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "table2d.npz"]


# 5. The environment: unwritable, full, locked.


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only): skips where the machine does not allow mounting one."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_read_only_output_is_refused_before_the_work(capsys, ort_bundle, tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    code, err = run(capsys, *generate(ort_bundle, tmpfs / "out"))
    assert code == 2 and "Read-only file system" in err
    assert list(tmpfs.iterdir()) == []


def test_a_full_disk_is_refused_before_the_work(capsys, ort_bundle, tmpfs):
    (tmpfs / "filler").write_bytes(b"\0" * (12 * 2**20 - 200_000))
    code, err = run(capsys, *generate(ort_bundle, tmpfs / "out"))
    assert code == 2 and "MiB free" in err
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]


def test_disk_full_while_writing_tables_leaves_the_bundle_whole(capsys, ort_bundle, calibrated_bundle, tmpfs):
    bundle = tmpfs / "bundle"
    shutil.copytree(ort_bundle, bundle)
    before = snapshot(bundle)
    Bundle.load(calibrated_bundle).sensitivity().to_npz(tmpfs.parent / "table.npz")
    free = shutil.disk_usage(tmpfs).free
    (tmpfs / "filler").write_bytes(b"\0" * (free - 2048))
    code, err = run(capsys, "calibrate", "--engine", bundle, "--import-npz", tmpfs.parent / "table.npz")
    assert code == 2 and "No space left on device" in err
    assert snapshot(bundle) == before and leftovers(tmpfs) == []
    assert Bundle.load(bundle)


def test_a_locked_output_is_refused(capsys, ort_bundle, tmp_path):
    with output_lock(tmp_path / "out"):
        code, err = run(capsys, *generate(ort_bundle, tmp_path / "out"))
    assert code == 2 and "being written by another sencache process" in err
    assert leftovers(tmp_path) == []


def test_two_concurrent_writers(ort_bundle, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "sencache.cli",
        *map(str, generate(ort_bundle, out, "--steps", "12", "--overwrite")),
    ]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results)[0] == 0
    for code, err in results:
        assert code in (0, 2) and "Traceback" not in err
        if code == 2:
            assert "being written by another sencache process" in err
    assert json.loads((out / "stats.json").read_text())["steps"] == 12
    assert leftovers(tmp_path) == []


# 6. Interrupts and crashes.


def _start_and_wait_for_partial(args: list[str], parent: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "sencache.cli", *map(str, args)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(".sencache-partial." in p.name for p in parent.iterdir()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    return proc


@pytest.mark.slow
def test_sigterm_during_a_build_removes_the_partial_and_keeps_the_old(ort_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(ort_bundle, out)
    before = snapshot(out)
    proc = _start_and_wait_for_partial(
        ["build", "--model", "tiny-wan", "--max-batch", "3", "--out", out, "--overwrite"], tmp_path
    )
    proc.send_signal(signal.SIGTERM)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert code == 130 and "Traceback" not in err and "terminated; nothing was left half-written" in err
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("sig,word", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_a_signal_during_generate(ort_bundle, tmp_path, sig, word):
    out = tmp_path / "out"
    proc = _start_and_wait_for_partial(generate(ort_bundle, out, "--steps", "400"), tmp_path)
    proc.send_signal(sig)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert code == 130 and word in err and "Traceback" not in err, err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["build", "generate"])
def test_sigkill_leaves_a_partial_that_the_next_writer_sweeps(capsys, ort_bundle, tmp_path, command):
    out = tmp_path / "out"
    args = (
        ["build", "--model", "tiny-wan", "--max-batch", "3", "--out", out]
        if command == "build"
        else generate(ort_bundle, out, "--steps", "400")
    )
    proc = _start_and_wait_for_partial(args, tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    partials = [p for p in tmp_path.iterdir() if ".sencache-partial." in p.name]
    assert len(partials) == 1 and json.loads((partials[0] / OWNER).read_text())["state"] == "partial"
    assert not out.exists()
    assert run(capsys, *generate(ort_bundle, out))[0] == 0
    assert leftovers(tmp_path) == []


def test_a_crash_between_the_two_renames_is_rolled_back(tmp_path):
    """Where the filesystem cannot exchange, the swap is two renames; a crash between them leaves
    the old folder aside and no target: the next writer puts the old one back, deleting nothing."""
    target = tmp_path / "out"
    with staged_folder(target, "run") as folder:
        (folder / "a.txt").write_text("old")
    os.rename(target, tmp_path / ".out.sencache-old")
    partial = tmp_path / ".out.sencache-partial.1.x"
    shutil.copytree(tmp_path / ".out.sencache-old", partial)
    with output_lock(target):
        recover(target)
    assert (target / "a.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_the_swap_without_an_exchange(tmp_path, monkeypatch):
    """The two-rename fallback replaces the folder whole and leaves nothing behind."""
    import sencache.runtime.files as files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    for text in ("one", "two"):
        with staged_folder(target, "run") as folder:
            (folder / "a.txt").write_text(text)
    assert (target / "a.txt").read_text() == "two" and leftovers(tmp_path) == []


def test_a_failure_inside_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "out"
    with staged_folder(target, "run") as folder:
        (folder / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target, "run") as folder:
        (folder / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert snapshot(target) == {OWNER: (target / OWNER).read_bytes(), "keep.txt": b"old"}
    assert leftovers(tmp_path) == []


def test_sweeping_never_deletes_a_folder_without_our_marker(tmp_path):
    target = tmp_path / "out"
    foreign = tmp_path / ".out.sencache-partial.user"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("mine")
    with staged_folder(target, "run") as folder:
        (folder / "a.txt").write_text("x")
    assert (foreign / "precious.txt").read_text() == "mine"


def test_calibration_tables_are_written_together(ort_bundle, calibrated_bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(ort_bundle, target)
    bundle = Bundle.load(target)
    source = Bundle.load(calibrated_bundle)
    rebuilt = Bundle.load(target)
    rebuilt.write_tables(baselines=source.baselines())
    with pytest.raises(BadInput, match="changed since it was loaded"):
        bundle.write_tables(source.sensitivity(), source.baselines())
    fresh = Bundle.load(target)
    fresh.write_tables(source.sensitivity(), source.baselines())
    loaded = Bundle.load(target)
    assert {"sensitivity.json", "baselines.json"} <= set(loaded.manifest.files)
    assert loaded.sensitivity().jx.tolist() == source.sensitivity().jx.tolist()
    assert (target / "blocks.onnx").stat().st_ino == (tmp_path / "bundle" / "blocks.onnx").stat().st_ino
    assert leftovers(tmp_path) == []


# 7. Internal errors: exit 1, one line, the traceback in a log file.


def test_an_internal_error_points_at_its_log(capsys, ort_bundle, tmp_path, monkeypatch):
    from sencache.runtime.api import Engine

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(Engine, "denoise", broken)
    code = main([str(a) for a in generate(ort_bundle, tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "internal error (ZeroDivisionError)" in err and len(err.strip().splitlines()) == 1
    log = Path(err.split("traceback in ")[1].strip())
    assert log.parent == tmp_path / "state" / "sencache" and "ZeroDivisionError" in log.read_text()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
