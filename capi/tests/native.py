"""ctypes bindings of libsencache_policy for the parity tests (path in $SENCACHE_POLICY_LIB)."""

from __future__ import annotations

import ctypes
import os

import numpy as np

c_double_p = ctypes.POINTER(ctypes.c_double)


class Settings(ctypes.Structure):
    _fields_ = [
        ("rule", ctypes.c_int),
        ("eps_start", ctypes.c_double),
        ("eps_main", ctypes.c_double),
        ("max_reuse", ctypes.c_int32),
        ("switch_frac", ctypes.c_double),
        ("force_last", ctypes.c_int32),
    ]


class Extra(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("online_rate", ctypes.c_double),
        ("online_bound", ctypes.c_double),
        ("online_prior", ctypes.c_double),
    ]


class Budget(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("kind", ctypes.c_int),
        ("mode", ctypes.c_int),
        ("value", ctypes.c_double),
        ("speed", ctypes.c_int),
    ]


SC_ERR_INVALID_ARGUMENT, SC_ERR_STATE, SC_ERR_UNSUPPORTED = 1, 6, 9
SC_BUDGET_NFE, SC_BUDGET_SPEEDUP, SC_BUDGET_SPEED = 0, 1, 2
SC_BUDGET_THRESHOLD, SC_BUDGET_HARD = 0, 1


def load() -> ctypes.CDLL:
    lib = ctypes.CDLL(os.environ["SENCACHE_POLICY_LIB"])
    lib.sc_last_error.restype = ctypes.c_char_p
    lib.sc_table_parse_json.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    lib.sc_table_load_npz.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.sc_table_load_bundle.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.sc_table_lookup.argtypes = [
        ctypes.c_void_p,
        ctypes.c_double,
        c_double_p,
        c_double_p,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.sc_table_destroy.argtypes = [ctypes.c_void_p]
    lib.sc_policy_create.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(Settings),
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.sc_policy_create_ex.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(Settings),
        ctypes.POINTER(Extra),
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.sc_policy_create_budget.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(Extra),
        ctypes.POINTER(Budget),
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.sc_policy_budget.argtypes = [ctypes.c_void_p, c_double_p, c_double_p, ctypes.POINTER(ctypes.c_int32)]
    lib.sc_table_has_budget.argtypes = [ctypes.c_void_p]
    lib.sc_policy_decide.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_double,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int32,
    ]
    lib.sc_policy_last.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int32,
        c_double_p,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.sc_policy_observe.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    lib.sc_policy_factor.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    lib.sc_policy_outside_table.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
    lib.sc_policy_reset.argtypes = [ctypes.c_void_p]
    lib.sc_policy_destroy.argtypes = [ctypes.c_void_p]
    return lib


class Table:
    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p) -> None:
        self.lib, self.handle = lib, handle

    @classmethod
    def from_json(cls, lib: ctypes.CDLL, data: bytes) -> Table:
        handle = ctypes.c_void_p()
        status = lib.sc_table_parse_json(data, len(data), ctypes.byref(handle))
        if status:
            raise ValueError(lib.sc_last_error().decode())
        return cls(lib, handle)

    @classmethod
    def from_npz(cls, lib: ctypes.CDLL, path: str) -> Table:
        handle = ctypes.c_void_p()
        if lib.sc_table_load_npz(path.encode(), ctypes.byref(handle)):
            raise ValueError(lib.sc_last_error().decode())
        return cls(lib, handle)

    def has_budget(self) -> int:
        return int(self.lib.sc_table_has_budget(self.handle))

    def lookup(self, t: float) -> tuple[float, float, bool]:
        jx, jt, inside = ctypes.c_double(), ctypes.c_double(), ctypes.c_int()
        assert self.lib.sc_table_lookup(self.handle, t, ctypes.byref(jx), ctypes.byref(jt), ctypes.byref(inside)) == 0
        return jx.value, jt.value, bool(inside.value)

    def close(self) -> None:
        self.lib.sc_table_destroy(self.handle)


class NativeError(ValueError):
    """A native call's failure: its status and sc_last_error's message."""

    def __init__(self, lib: ctypes.CDLL, status: int) -> None:
        super().__init__(lib.sc_last_error().decode())
        self.status = status


class Policy:
    """The native rule with the Python rule's decide() shape: (run mask, scores, threshold, forced);
    `online` (rate, bound, prior) goes in an sc_policy_extra (sc_policy_create_ex)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        table: Table,
        rule: int,
        eps_start: float,
        eps_main: float,
        max_reuse: int,
        switch_frac: float,
        force_last: bool,
        steps: int,
        batch: int,
        numel: int,
        online: tuple[float, float, float] | None = None,
    ) -> None:
        self.lib, self.batch = lib, batch
        settings = Settings(rule, eps_start, eps_main, max_reuse, switch_frac, int(force_last))
        self.handle = ctypes.c_void_p()
        if online is None:
            status = lib.sc_policy_create(
                table.handle, ctypes.byref(settings), steps, batch, numel, ctypes.byref(self.handle)
            )
        else:
            extra = Extra(ctypes.sizeof(Extra), *online)
            status = lib.sc_policy_create_ex(
                table.handle,
                ctypes.byref(settings),
                ctypes.byref(extra),
                steps,
                batch,
                numel,
                ctypes.byref(self.handle),
            )
        if status:
            raise NativeError(lib, status)
        self.run = np.zeros(batch, np.uint8)
        self.scores = np.zeros(batch, np.float64)

    @classmethod
    def with_budget(
        cls,
        lib: ctypes.CDLL,
        table: Table,
        rule: int,
        budget: Budget,
        steps: int,
        batch: int,
        numel: int,
        online: tuple[float, ...] | None = None,
    ) -> Policy:
        """sc_policy_create_budget; `online` the knobs given (a prefix of rate, bound, prior: the
        extra's size covers just those), None for no extra."""
        extra = None
        if online is not None:
            extra = Extra(0, *online)
            extra.size = Extra.online_rate.offset + 8 * len(online)
        handle = ctypes.c_void_p()
        status = lib.sc_policy_create_budget(
            table.handle,
            rule,
            None if extra is None else ctypes.byref(extra),
            ctypes.byref(budget),
            steps,
            batch,
            numel,
            ctypes.byref(handle),
        )
        if status:
            raise NativeError(lib, status)
        policy = cls.__new__(cls)
        policy.lib, policy.batch, policy.handle = lib, batch, handle
        policy.run = np.zeros(batch, np.uint8)
        policy.scores = np.zeros(batch, np.float64)
        return policy

    def budget(self) -> tuple[float, float, int]:
        """sc_policy_budget: (eps_start, eps_main, nfe)."""
        eps_start, eps_main, nfe = ctypes.c_double(), ctypes.c_double(), ctypes.c_int32()
        outputs = (ctypes.byref(eps_start), ctypes.byref(eps_main), ctypes.byref(nfe))
        status = self.lib.sc_policy_budget(self.handle, *outputs)
        if status:
            raise NativeError(self.lib, status)
        return eps_start.value, eps_main.value, nfe.value

    def reset(self) -> None:
        assert self.lib.sc_policy_reset(self.handle) == 0

    def decide(self, step: int, t: float, drift_sumsq: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, float, bool]:
        drift = None if drift_sumsq is None else np.ascontiguousarray(drift_sumsq, dtype=np.float32)
        status = self.lib.sc_policy_decide(
            self.handle, step, t, None if drift is None else drift.ctypes.data, self.run.ctypes.data, self.batch
        )
        if status:
            raise ValueError(self.lib.sc_last_error().decode())
        threshold, forced = ctypes.c_double(), ctypes.c_int()
        assert (
            self.lib.sc_policy_last(
                self.handle, self.scores.ctypes.data, self.batch, ctypes.byref(threshold), ctypes.byref(forced)
            )
            == 0
        )
        return self.run.astype(bool), self.scores.copy(), threshold.value, bool(forced.value)

    def observe(self, step: int, error_sumsq: np.ndarray) -> None:
        errors = np.ascontiguousarray(error_sumsq, dtype=np.float64)
        status = self.lib.sc_policy_observe(self.handle, step, errors.ctypes.data, self.batch)
        if status:
            raise NativeError(self.lib, status)

    def factor(self) -> np.ndarray:
        out = np.zeros(self.batch, np.float64)
        status = self.lib.sc_policy_factor(self.handle, out.ctypes.data, self.batch)
        if status:
            raise NativeError(self.lib, status)
        return out

    def outside(self) -> int:
        count = ctypes.c_int64()
        assert self.lib.sc_policy_outside_table(self.handle, ctypes.byref(count)) == 0
        return count.value

    def close(self) -> None:
        self.lib.sc_policy_destroy(self.handle)
