"""The sensitivity table: Jx(t) and Jt(t) per timestep, with its provenance (SPEC section 4).

Stored in a bundle as `sensitivity.json`; the authors' `.npz` format (keys `timesteps`,
`J_x_norm`, `J_t_norm`, optional `sample_counts`) is imported and exported too. Look-ups
interpolate linearly in t, so one table serves any number of steps or shift (or, under the
reference conventions, read the nearest tabulated t as the authors' code does); a t outside the
table clamps to its edge and is counted, so the caller can report it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sencache.runtime.errors import BadInput

FORMAT = "sencache-sensitivity/1"
BUDGET_FORMAT = "sencache-budget/1"
RECALIBRATE = "recalibrate the bundle (`sencache calibrate`) to record them"


def _check_axes(steps: tuple[int, ...], grid: np.ndarray) -> None:
    """The step counts increase from at least 2; the eps grid is finite, non-negative, increasing."""
    if len(steps) < 1 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError("steps must be increasing")
    if any(s < 2 for s in steps):
        raise ValueError("steps must be at least 2")
    if len(grid) < 2 or np.any(np.diff(grid) <= 0) or grid[0] < 0 or not np.all(np.isfinite(grid)):
        raise ValueError("eps_grid must be finite, non-negative and increasing")


def _check_curve(steps: int, grid: int, fractions: np.ndarray, profile: np.ndarray) -> None:
    """One step count's curve: a fraction in (0, 1] per eps, not growing with eps, and one finite
    non-negative score per step."""
    if len(fractions) != grid or not np.all((fractions > 0) & (fractions <= 1)):
        raise ValueError("each fractions row must hold one fraction in (0, 1] per eps")
    if np.any(np.diff(fractions) > 1e-9):
        raise ValueError("fractions must not grow with eps")
    if len(profile) != steps or not np.all(np.isfinite(profile)) or np.any(profile < 0):
        raise ValueError("each profile must hold one finite non-negative score per step")


@dataclass(frozen=True)
class OnlineCurve:
    """The mean NFE / steps of the sencache-online rule against its eps_main, measured at
    calibration by running the engine with that rule (its learnt factor needs the observed reuse
    errors, which a replay of uncached trajectories cannot give) on the calibration samples at
    `steps` steps, with the online knobs `rate`, `bound`, `prior` and the SenCache curves' eps_ratio,
    max_reuse and conventions. A budget's threshold mode inverts it."""

    steps: int
    eps_grid: tuple[float, ...]
    fractions: tuple[float, ...]
    rate: float
    bound: float
    prior: float

    def __post_init__(self) -> None:
        _check_axes((self.steps,), np.asarray(self.eps_grid, dtype=np.float64))
        fractions = np.asarray(self.fractions, dtype=np.float64)
        if len(fractions) != len(self.eps_grid) or not np.all((fractions > 0) & (fractions <= 1)):
            raise ValueError("the online curve must hold one fraction in (0, 1] per eps")
        if np.any(np.diff(fractions) > 1e-9):
            raise ValueError("the online curve's fractions must not grow with eps")

    @classmethod
    def from_dict(cls, document: Any) -> OnlineCurve:
        if not isinstance(document, dict):
            raise ValueError("the online curve must be an object")
        return cls(
            steps=_integer(document["steps"]),
            eps_grid=tuple(_vector(document["eps_grid"]).tolist()),
            fractions=tuple(_vector(document["fractions"]).tolist()),
            rate=_number(document["rate"]),
            bound=_number(document["bound"]),
            prior=_number(document["prior"]),
        )


@dataclass(frozen=True)
class ReuseCosts:
    """What reusing costs the final video, measured at calibration on its uncached trajectories at
    `steps` steps (sencache-plan's input, `sencache.runtime.cache.plan`): cost[a][i], for an anchor
    run at step a < i, is the mean over the calibration samples of G_i x ||f_i - f_a||^2 / numel,
    f the guided output, G_i the measured gain from an output error at step i to the final latent;
    0 where a >= i.

    score_sq[a][i] is the mean over the same samples of s(a, i)^2, SenCache's bound on reusing at
    step i from anchor a, s = Jx(t_a) ||x_i - n_i - x_a|| + Jt(t_a) |t_i - t_a| (n_i the noise a
    stochastic sampler injected since a), with Jx, Jt the table's: what a request's own drift is
    compared with to scale its costs (`sencache.runtime.cache.plan`). None in costs from before it.

    error_sq[a][d - 1] is the mean over the same samples of the reuse error a run observes at step
    a + d (`ReuseObserver`, per element: its mean square) after reusing steps a + 1 .. a + d - 1
    from an anchor run at a, the run uncached up to a; 0 where not measured (the last step, past
    the run's end). What a request's own observed errors are compared with. None in costs from
    before it."""

    steps: int
    cost: tuple[tuple[float, ...], ...]
    score_sq: tuple[tuple[float, ...], ...] | None = None
    error_sq: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        for name, matrix in (("reuse costs", self.cost), ("mean squared scores", self.score_sq)):
            if matrix is None:
                continue
            values = np.asarray(matrix, dtype=np.float64)
            if self.steps < 2 or values.shape != (self.steps, self.steps):
                raise ValueError(f"the {name} must be a {self.steps} x {self.steps} matrix of at least 2 steps")
            if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(np.tril(values) != 0):
                raise ValueError(f"the {name} must be finite, non-negative, and 0 on and below the diagonal")
        if self.error_sq is not None:
            depth = len(self.error_sq[0]) if self.error_sq else 0
            if len(self.error_sq) != self.steps or depth < 1 or any(len(row) != depth for row in self.error_sq):
                raise ValueError(f"the mean observed reuse errors must be a {self.steps} x depth matrix")
            if not all(math.isfinite(v) and v >= 0 for row in self.error_sq for v in row):
                raise ValueError("the mean observed reuse errors must be finite and non-negative")

    @classmethod
    def from_dict(cls, document: Any) -> ReuseCosts:
        if not isinstance(document, dict):
            raise ValueError("the reuse costs must be an object")

        def matrix(key: str) -> tuple[tuple[float, ...], ...] | None:
            value = document.get(key)
            return None if value is None else tuple(tuple(_vector(row).tolist()) for row in _list(value))

        return cls(
            steps=_integer(document["steps"]),
            cost=tuple(tuple(_vector(row).tolist()) for row in _list(document["cost"])),
            score_sq=matrix("score_sq"),
            error_sq=matrix("error_sq"),
        )


@dataclass(frozen=True)
class BudgetCurves:
    """What calibration records for per-request NFE budgets (issue 12): the SenCache rule replayed
    on uncached calibration trajectories at a few step counts, over a grid of eps_main (eps_start
    kept at `eps_ratio` x eps_main, the rest of the rule as recorded here).

    `fractions[n][g]` is the mean NFE / steps at `steps[n]` steps and `eps_grid[g]` (the threshold
    mode inverts it); `profiles[n]` is the mean score of each step anchored at the step before it
    (the hard mode plans with it)."""

    steps: tuple[int, ...]
    eps_grid: tuple[float, ...]
    fractions: tuple[tuple[float, ...], ...]
    profiles: tuple[tuple[float, ...], ...]
    eps_ratio: float
    max_reuse: int
    switch_frac: float
    force_last: bool
    online: OnlineCurve | None = None
    """sencache-online's measured curve (None in curves from before it, or where not measured)."""
    costs: ReuseCosts | None = None
    """sencache-plan's reuse costs (None in curves from before them, or where not measured)."""

    def __post_init__(self) -> None:
        grid = np.asarray(self.eps_grid, dtype=np.float64)
        _check_axes(self.steps, grid)
        if len(self.fractions) != len(self.steps) or len(self.profiles) != len(self.steps):
            raise ValueError("fractions and profiles need one row per step count")
        for n, row, profile in zip(self.steps, self.fractions, self.profiles, strict=True):
            _check_curve(n, len(grid), np.asarray(row, dtype=np.float64), np.asarray(profile, dtype=np.float64))
        if not (math.isfinite(self.eps_ratio) and self.eps_ratio >= 0):
            raise ValueError("eps_ratio must be a finite non-negative number")
        if self.max_reuse < 0 or not 0 <= self.switch_frac <= 1:
            raise ValueError("max_reuse and switch_frac are out of range")

    def to_dict(self) -> dict[str, Any]:
        return {"format": BUDGET_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, document: Any) -> BudgetCurves:
        """Curves from their JSON object; a ValueError says what is wrong."""
        if not isinstance(document, dict) or document.get("format") != BUDGET_FORMAT:
            raise ValueError(f"not {BUDGET_FORMAT} curves")
        try:
            steps = tuple(_integer(v) for v in _list(document["steps"]))
            return cls(
                steps=steps,
                eps_grid=tuple(_vector(document["eps_grid"]).tolist()),
                fractions=tuple(tuple(_vector(row).tolist()) for row in _list(document["fractions"])),
                profiles=tuple(tuple(_vector(row).tolist()) for row in _list(document["profiles"])),
                eps_ratio=float(_number(document["eps_ratio"])),
                max_reuse=_integer(document["max_reuse"]),
                switch_frac=float(_number(document["switch_frac"])),
                force_last=_boolean(document["force_last"]),
                online=None if document.get("online") is None else OnlineCurve.from_dict(document["online"]),
                costs=None if document.get("costs") is None else ReuseCosts.from_dict(document["costs"]),
            )
        except KeyError as e:
            raise ValueError(f"missing {e}") from None


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _optional_vector(value: Any) -> np.ndarray | None:
    """`_vector` of a table that may be absent (None stays None)."""
    return None if value is None else _vector(value)


def _vector(value: Any) -> np.ndarray:
    """A JSON list of numbers as float64; anything else is a ValueError."""
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError("tables must be lists of numbers")
    return np.asarray(value, dtype=np.float64)


@dataclass
class SensitivityTable:
    timesteps: np.ndarray
    jx: np.ndarray
    jt: np.ndarray
    counts: np.ndarray | None = None
    jx_std: np.ndarray | None = None
    jt_std: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    budget: BudgetCurves | None = None
    """NFE-budget curves (None in tables from before them, or imported from the authors' .npz)."""

    def __post_init__(self) -> None:
        arrays = {"timesteps": self.timesteps, "Jx": self.jx, "Jt": self.jt}
        arrays.update(
            {
                k: v
                for k, v in (("counts", self.counts), ("Jx_std", self.jx_std), ("Jt_std", self.jt_std))
                if v is not None
            }
        )
        for name, value in arrays.items():
            arrays[name] = np.asarray(value, dtype=np.float64)
            if arrays[name].ndim != 1 or len(arrays[name]) != len(arrays["timesteps"]):
                raise BadInput(f"{name} must be a list as long as timesteps")
            if not np.all(np.isfinite(arrays[name])):
                raise BadInput(f"{name} holds NaN or infinite values")
        if len(arrays["timesteps"]) < 2:
            raise BadInput("needs at least two timesteps")
        if np.any(arrays["Jx"] < 0) or np.any(arrays["Jt"] < 0):
            raise BadInput("Jx and Jt must be non-negative")
        order = np.argsort(arrays["timesteps"])
        if np.any(np.diff(arrays["timesteps"][order]) <= 0):
            raise BadInput("timesteps must be distinct")
        self.timesteps, self.jx, self.jt = (arrays[k][order] for k in ("timesteps", "Jx", "Jt"))
        self.counts = arrays["counts"][order] if "counts" in arrays else None
        self.jx_std = arrays["Jx_std"][order] if "Jx_std" in arrays else None
        self.jt_std = arrays["Jt_std"][order] if "Jt_std" in arrays else None

    def lookup(self, t: float, nearest: bool = False) -> tuple[float, float, bool]:
        """(Jx(t), Jt(t), inside) by linear interpolation, outside the table clamped; or, with
        `nearest`, at the nearest tabulated timestep, a tie going to the larger one (the earlier
        step: the authors' code takes the first in their descending order)."""
        inside = bool(self.timesteps[0] <= t <= self.timesteps[-1])
        if nearest:
            index = len(self.timesteps) - 1 - int(np.argmin(np.abs(self.timesteps[::-1] - t)))
            return float(self.jx[index]), float(self.jt[index]), inside
        return float(np.interp(t, self.timesteps, self.jx)), float(np.interp(t, self.timesteps, self.jt)), inside

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "meta": self.meta,
            "timesteps": self.timesteps.tolist(),
            "Jx": self.jx.tolist(),
            "Jt": self.jt.tolist(),
        }
        for name, value in (("counts", self.counts), ("Jx_std", self.jx_std), ("Jt_std", self.jt_std)):
            if value is not None:
                out[name] = value.tolist()
        if self.budget is not None:
            out["budget"] = self.budget.to_dict()
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()

    @classmethod
    def parse(cls, data: bytes, source: str) -> SensitivityTable:
        """A table from the bytes of a `sensitivity.json`; BadInput names `source` and the fault."""
        try:
            document = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"corrupt sensitivity table {source}: {e}") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise BadInput(f"corrupt sensitivity table {source}: not a {FORMAT} file")
        budget = None if document.get("budget") is None else _budget(document["budget"], source)
        try:
            meta = document.get("meta", {})
            if not isinstance(meta, dict):
                raise ValueError("meta must be an object")
            return cls(
                _vector(document["timesteps"]),
                _vector(document["Jx"]),
                _vector(document["Jt"]),
                counts=_optional_vector(document.get("counts")),
                jx_std=_optional_vector(document.get("Jx_std")),
                jt_std=_optional_vector(document.get("Jt_std")),
                meta=meta,
                budget=budget,
            )
        except KeyError as e:
            raise BadInput(f"corrupt sensitivity table {source}: missing {e}") from None
        except (TypeError, ValueError, BadInput) as e:
            raise BadInput(f"corrupt sensitivity table {source}: {e}") from None

    @classmethod
    def from_npz(cls, path: Path, meta: dict[str, Any] | None = None) -> SensitivityTable:
        """Import the authors' format: `timesteps`, `J_x_norm`, `J_t_norm` [, `sample_counts`]."""
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"timesteps", "J_x_norm", "J_t_norm"} - set(data.files)
                if missing:
                    raise BadInput(f"not a SenCache sensitivity .npz (missing {', '.join(sorted(missing))})")
                arrays = {k: data[k] for k in ("timesteps", "J_x_norm", "J_t_norm", "sample_counts") if k in data.files}
                for key, value in arrays.items():
                    if value.ndim != 1:
                        raise BadInput(f"{key} must be one-dimensional, got shape {list(value.shape)}")
                counts = arrays.get("sample_counts")
                return cls(
                    arrays["timesteps"],
                    arrays["J_x_norm"],
                    arrays["J_t_norm"],
                    counts=counts,
                    meta={"source": f"imported from {Path(path).name}", **(meta or {})},
                )
        except FileNotFoundError:
            raise BadInput(f"no such file: {path}") from None
        except BadInput as e:
            raise BadInput(f"{path}: {e}") from None
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read {path} as .npz: {e}") from None

    def budget_curves(self) -> BudgetCurves:
        """The NFE-budget curves, or a BadInput saying to recalibrate."""
        if self.budget is None:
            raise BadInput(f"the sensitivity table has no NFE-budget curves: {RECALIBRATE}")
        return self.budget

    def to_npz(self, path: Path) -> None:
        """Write the authors' format (for their tools, and to check the import round-trips)."""
        arrays = {"timesteps": self.timesteps, "J_x_norm": self.jx, "J_t_norm": self.jt}
        if self.counts is not None:
            arrays["sample_counts"] = self.counts
        with open(path, "wb") as f:
            # numpy>=2.1 types savez's own `allow_pickle: bool` keyword, so mypy checks the array
            # dict against it; passing allow_pickle instead would be saved as an array on numpy 1.26.
            np.savez(f, **arrays)  # type: ignore[arg-type]


def _budget(document: Any, source: str) -> BudgetCurves:
    """Parsed budget curves; a BadInput that says to recalibrate when they are corrupt."""
    try:
        return BudgetCurves.from_dict(document)
    except (TypeError, ValueError) as e:
        raise BadInput(f"corrupt NFE-budget curves in {source} ({e}): {RECALIBRATE}") from None
