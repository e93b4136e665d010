"""Errors name the parameter, never a front end's spelling of it: the runtime says `eps_main`,
the command line `--eps-main`, the server `cache.knobs.eps_main`."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest

from sencache.cli import main, parser
from sencache.runtime.cache import KNOBS, METHODS, check_knobs, method_knobs
from sencache.runtime.cache.baselines import FixedSettings, MagCacheSettings, TeaCacheSettings
from sencache.runtime.cache.sencache import SenCacheSettings
from sencache.runtime.errors import BadInput
from sencache.runtime.request import GenerationParams
from sencache.runtime.tiny_grammar import check_prompt, tokenize

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
FLAG = re.compile(r"--[a-z]")


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring constants in `tree`."""
    owners = [
        tree,
        *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))),
    ]
    return {
        id(o.body[0].value)
        for o in owners
        if o.body and isinstance(o.body[0], ast.Expr) and isinstance(o.body[0].value, ast.Constant)
    }


def test_no_runtime_string_names_a_flag():
    found = []
    for path in sorted(RUNTIME.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        found += [
            f"{path.relative_to(RUNTIME)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docs
            and FLAG.search(node.value)
        ]
    assert not found, "\n".join(found)


def _raised(make) -> BadInput:
    with pytest.raises(BadInput) as error:
        make()
    return error.value


REQUEST_AND_KNOB_ERRORS = [
    (lambda: GenerationParams([], [], 2, 1.0), "prompt"),
    (lambda: GenerationParams([7], [0], 2, 1.0), "prompt"),
    (lambda: GenerationParams(["a"], [0], 0, 1.0), "steps"),
    (lambda: GenerationParams(["a"], [0], 2, -1.0), "guidance"),
    (lambda: GenerationParams(["a"], [-1], 2, 1.0), "seed"),
    (lambda: GenerationParams(["a", "b"], [0], 2, 1.0), "seed"),
    (lambda: check_knobs("deepcache", {}), "cache"),
    (lambda: check_knobs("sencache", {"velocity": 2}), "knobs"),
    (lambda: tokenize("one small purple circle static on black"), "prompt"),
    (lambda: tokenize(" ".join(["red"] * 13)), "prompt"),
    (lambda: check_prompt("one small red"), "prompt"),
    (lambda: check_knobs("sencache", {"eps_main": -1.0}), "eps_main"),
    (lambda: check_knobs("fixed", {"eps_start": 1.0}), "eps_start"),
    (lambda: SenCacheSettings(-1.0, 1.0, 3), "eps_start"),
    (lambda: SenCacheSettings(0.1, float("nan"), 3), "eps_main"),
    (lambda: SenCacheSettings(0.1, 1.0, -1), "max_reuse"),
    (lambda: FixedSettings(0), "interval"),
    (lambda: FixedSettings(2, warmup=-1), "warmup"),
    (lambda: TeaCacheSettings(-0.1, (1.0,)), "threshold"),
    (lambda: MagCacheSettings(0.1, 2, (1.0, 0.9), retention=2.0), "retention"),
]


@pytest.mark.parametrize("make,param", REQUEST_AND_KNOB_ERRORS)
def test_runtime_errors_name_the_parameter(make, param):
    error = _raised(make)
    assert error.param == param and str(error).startswith(param) and "--" not in str(error)


@pytest.mark.parametrize(
    "make,method,knob",
    [
        (lambda: SenCacheSettings(0.1, 0.1, 5000), "sencache", {"max_reuse": 5000}),
        (lambda: FixedSettings(5000), "fixed", {"interval": 5000}),
        (lambda: MagCacheSettings(0.1, 2, (1.0, 0.9), retention=1.5), "magcache", {"retention": 1.5}),
    ],
)
def test_policies_bound_their_settings_by_the_knob_table(make, method, knob):
    """A rule's settings and the knob given for it are refused in the same words."""
    assert str(_raised(make)) == str(_raised(lambda: check_knobs(method, knob)))


def test_a_parameter_error_begins_with_its_name_and_survives_pickling():
    with pytest.raises(ValueError):
        BadInput("must be positive", param="steps")
    error = pickle.loads(pickle.dumps(BadInput("steps must be positive", param="steps")))
    assert error.param == "steps" and error.worded("--steps") == "--steps must be positive"
    assert BadInput("no such file").worded("--steps") == "no such file"


def test_the_command_line_says_each_parameter_as_its_flag():
    args = parser().parse_args(["generate", "--engine", "e", "--out", "o"])
    for name in KNOBS:
        method = next(m for m in METHODS if name not in method_knobs(m))
        error = _raised(lambda: check_knobs(method, {name: 1}))  # noqa: B023
        assert error.worded(args.flag(error.param)) == f"--{name.replace('_', '-')} does not apply to cache {method!r}"
    for param, flag in (
        ("steps", "--steps"),
        ("seed", "--seed"),
        ("prompt", "--prompt"),
        ("threads", "--threads"),
        ("device", "--device"),
        ("dynamic_cfg", "--dynamic-cfg"),
        ("weights", None),
    ):
        assert args.flag(param) == flag


def test_the_command_line_renders_a_builder_parameter(capsys, tmp_path):
    assert main(["build", "--model", "tiny-wan", "--max-batch", "0", "--out", str(tmp_path / "b")]) == 2
    assert "sencache build: error: --max-batch must be in [1, 64], got 0" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_the_server_names_the_json_field():
    pydantic = pytest.importorskip("pydantic")
    from sencache.serving.schema import VideoRequest, json_field

    with pytest.raises(pydantic.ValidationError) as error:
        VideoRequest.model_validate({"prompt": "a", "cache": {"method": "teacache", "knobs": {"eps_main": 0.2}}})
    assert "cache.knobs.eps_main does not apply to cache 'teacache'" in str(error.value)
    assert "--" not in str(error.value)
    assert [json_field(p) for p in ("steps", "max_reuse", "cache", "knobs", "prompt_embeds", "threads", None)] == [
        "steps",
        "cache.knobs.max_reuse",
        "cache.method",
        "cache.knobs",
        "prompt_embeds",
        None,
        None,
    ]


def test_the_server_refusal_carries_the_field():
    pytest.importorskip("ray")
    from sencache.serving.app import _refused

    def body(message: str, param: str | None) -> dict:
        return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": "invalid_value"}}

    reply = _refused(_raised(lambda: GenerationParams(["a"], [0], 0, 1.0)))
    assert reply.status == 422 and reply.body == body("steps must be in [1, 1000], got 0", "steps")
    reply = _refused(_raised(lambda: check_knobs("fixed", {"eps_main": 0.2})))
    assert reply.body == body("cache.knobs.eps_main does not apply to cache 'fixed'", "cache.knobs.eps_main")
    reply = _refused(BadInput("threads must be >= 0, got -1", param="threads"))
    assert reply.body == body("threads must be >= 0, got -1", None)


@pytest.mark.parametrize(
    "make,field,c_field",
    [
        (lambda: check_knobs("deepcache", {}), "cache.method", "request->cache"),
        (lambda: check_knobs("sencache", {"velocity": 2}), "cache.knobs", "request->knobs_json"),
        (lambda: check_prompt("one small red"), "prompt", "request->prompt"),
        (lambda: GenerationParams(["a", "b"], [0], 2, 1.0), "seed", "request->seed"),
    ],
)
def test_the_server_and_the_c_abi_name_the_field_of_a_refused_request(make, field, c_field):
    pytest.importorskip("pydantic")
    from sencache.capi.host import INVALID_ARGUMENT, status
    from sencache.serving.schema import json_field

    error = _raised(make)
    assert json_field(error.param) == field
    assert status(error)[0] == INVALID_ARGUMENT and status(error)[1].startswith(f"{c_field} ")


def test_the_c_abi_tells_a_missing_bundle_from_a_corrupt_one(tmp_path):
    """SC_ERR_NOT_FOUND where there is no bundle (no folder, or a folder without a manifest, as
    /etc), SC_ERR_CORRUPT for a bundle that is there but cannot be read."""
    from sencache.capi.host import CORRUPT, NOT_FOUND, Host, Refused

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "manifest.json").write_text("{not json")
    for folder, code in (("/etc", NOT_FOUND), (tmp_path / "missing", NOT_FOUND), (tmp_path / "corrupt", CORRUPT)):
        with pytest.raises(Refused) as refused:
            Host(str(folder), "auto", "cpu", 1)
        assert refused.value.code == code, (folder, str(refused.value))
