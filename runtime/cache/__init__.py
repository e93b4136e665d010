"""Cache rules (SPEC sections 1, 3 and 5): the pure decision code, its knob table, the registry
the rules add themselves to, and one factory. A new rule is its module and an import line here."""

# Each rule module registers its rules on import, in the order METHODS lists them.
from sencache.runtime.cache import sencache  # noqa: F401

# isort: split
from sencache.runtime.cache import baselines, budget, plan  # noqa: F401
from sencache.runtime.cache.base import CachePolicy, NoCache, ReuseObserver, StepDecision
from sencache.runtime.cache.factory import make_policy
from sencache.runtime.cache.knobs import KNOBS, Knob, check_knobs, method_knobs
from sencache.runtime.cache.registry import METHODS

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
