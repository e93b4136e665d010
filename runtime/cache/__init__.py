"""Cache rules (SPEC sections 1, 3 and 5): the pure decision code, its knob table and one factory."""

from sencache.runtime.cache.base import CachePolicy, NoCache, ReuseObserver, StepDecision
from sencache.runtime.cache.factory import make_policy
from sencache.runtime.cache.knobs import KNOBS, METHODS, Knob, check_knobs, method_knobs

__all__ = [
    "KNOBS",
    "METHODS",
    "CachePolicy",
    "Knob",
    "NoCache",
    "ReuseObserver",
    "StepDecision",
    "check_knobs",
    "make_policy",
    "method_knobs",
]
