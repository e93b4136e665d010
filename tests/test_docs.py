"""The README and docs/ say only what is true: their commands parse, the files they name exist,
and the figures they quote are those of the committed results."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from sencache.benchmarks.bench import setting_label
from sencache.cli import parser
from sencache.demo import DEMO_PROMPTS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
TOP_FOLDERS = ("runtime", "engine_builder", "calibration", "benchmarks", "kernels", "capi", "serving", "sencache")
TOP_FOLDERS += ("tests", "docs", ".ci")


def _blocks(text: str, language: str = "bash") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_readme_opens_with_the_two_commands() -> None:
    text = README.read_text()
    first = text.index("```")
    assert text[:first].strip() == "# sencache"
    lines = _blocks(text)[0].strip().splitlines()
    test = "python -m pytest -q -n auto --dist loadgroup"
    assert lines == ["pip install -e . && sencache demo --overwrite", f'pip install -e ".[dev]" && {test}']
    assert "python3 -m pytest -q -n auto --dist loadgroup\n" in (ROOT / ".ci" / "run").read_text()


def _commands(text: str) -> list[list[str]]:
    """Every `sencache ...` command of the page's bash blocks, continuation lines joined."""
    found = []
    for block in _blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("sencache "):
                found.append(shlex.split(line)[1:])
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_parse(page: Path) -> None:
    cli = parser()
    commands = _commands(page.read_text())
    for argv in commands:
        if any(a.startswith("[") for a in argv):
            argv = argv[: next(i for i, a in enumerate(argv) if a.startswith("["))]
        try:
            cli.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{page.name}: `sencache {' '.join(argv)}` does not parse (exit {e.code})")


def _named_paths(text: str) -> set[str]:
    links = set(re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text))
    quoted = {
        p.rstrip("/")
        for p in re.findall(r"`([^`\s]+)`", text)
        if p.split("/")[0] in TOP_FOLDERS and "/" in p and not re.search(r"[<>*{}$]|\.\.\.", p)
    }
    return {link for link in links if not link.startswith("http")} | quoted


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_files_exist(page: Path) -> None:
    missing = []
    for name in sorted(_named_paths(page.read_text())):
        if not ((page.parent / name).exists() or (ROOT / name).exists()):
            missing.append(name)
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_no_page_points_outside_the_repository() -> None:
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, page.name
        assert "issue notes" not in text and "closing notes" not in text, page.name


def test_readme_demo_output_is_the_demo_prompts() -> None:
    text = README.read_text()
    for prompt, _ in DEMO_PROMPTS:
        assert prompt in text


_ROW = re.compile(
    r"^\| (?P<method>[a-z-]+) \((?P<knobs>[^)]*)\) \| (?P<nfe>[\d.]+) \| (?P<psnr>[\d.]+) \| (?P<ssim>[\d.]+) \|"
)


def _report_row(report: dict, method: str, knobs: str) -> dict:
    """The report's run that a docs table row names: its method and its knobs as bench labels them."""
    for run in report["runs"]:
        if run["method"] == method and setting_label(run["knobs"]) == knobs:
            return run
    raise AssertionError(f"no run of {method} with {knobs} in the report")


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-cogvideox"])
def test_benchmark_table_matches_committed_report(model: str) -> None:
    report = json.loads((ROOT / "benchmarks" / "results" / model / "report.json").read_text())
    section = (ROOT / "docs" / "benchmarks.md").read_text().split(f"### Results on {model}")[1].split("###")[0]
    rows = [m for line in section.splitlines() if (m := _ROW.match(line))]
    assert rows, f"no result rows for {model} in docs/benchmarks.md"
    for row in rows:
        run = _report_row(report, row["method"], row["knobs"])
        assert f"{run['mean_nfe']:.1f}" == row["nfe"], row.group(0)
        assert f"{run['mean_psnr']:.2f}" == row["psnr"], row.group(0)
        assert f"{run['mean_ssim']:.4f}" == row["ssim"], row.group(0)
