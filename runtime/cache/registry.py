"""The registry of cache rules: each rule module registers its method, help line, the knobs it
takes, its defaults in the bundle manifest and what it needs from the bundle, with the function
that makes it. The factory, the knob table's per-method lists, the command line, the API and the
server all read this registry, so a new rule is its module and one import line."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sencache.runtime.errors import BadInput

if TYPE_CHECKING:
    from sencache.runtime.bundle import Bundle
    from sencache.runtime.cache.base import CachePolicy
    from sencache.runtime.cache.baselines import BaselineTables
    from sencache.runtime.conventions import SenCacheConventions
    from sencache.runtime.sensitivity import SensitivityTable

Need = Literal["sensitivity", "baselines", "reference"]
"""What a rule may need from the bundle: its sensitivity table, its baseline tables, or its
family's reference conventions (the authors' code)."""


@dataclass(frozen=True)
class RuleContext:
    """One request as a rule sees it, with what its rule needs from the bundle loaded."""

    steps: int
    batch: int
    numel: int
    """Latent elements per sample."""
    defaults: Mapping[str, Any]
    """The bundle's default knobs of the rule's section ({} where the rule has none)."""
    bundle: Bundle
    needs: tuple[Need, ...]
    expert: int = 0
    """The expert whose steps the rule decides (its tables are that expert's)."""

    def sensitivity(self) -> SensitivityTable:
        """The bundle's sensitivity table of the expert (parsed once per bundle)."""
        self._declared("sensitivity")
        return self.bundle.sensitivity(self.expert)

    def baselines(self) -> BaselineTables:
        """The bundle's baseline tables of the expert (parsed once per bundle)."""
        self._declared("baselines")
        return self.bundle.baselines(self.expert)

    def reference(self) -> SenCacheConventions:
        """The reference conventions of the bundle's family."""
        self._declared("reference")
        return self.bundle.adapter.sencache_reference

    def _declared(self, need: Need) -> None:
        assert need in self.needs, f"a rule reads {need} without registering that it needs it"


@dataclass(frozen=True)
class Rule:
    """One cache method as registered by its module."""

    method: str
    help: str
    knobs: tuple[str, ...]
    """The knobs it takes (names in the knob table)."""
    build: Callable[[dict[str, Any], RuleContext], CachePolicy]
    """The rule for one request from its checked knobs (unset ones absent) and context."""
    needs: tuple[Need, ...] = ()
    section: str | None = None
    """The manifest's defaults section the rule's unset knobs come from."""
    selected_by: tuple[str, ...] = ()
    """For a variant of a method already registered: the knobs that select it (any one given)."""
    share: Callable[[dict[str, Any], list[RuleContext]], list[dict[str, Any]]] | None = None
    """On a model of several experts, the knobs of each expert's run of steps (one context each)
    from the request's; None: every run takes the request's knobs, an `nfe` shared out in
    proportion to the runs' lengths (`sencache.runtime.cache.factory.split_nfe`)."""


@dataclass(frozen=True)
class DefaultsSection:
    """A section of the manifest's cache defaults: its settings type, whose fields are knobs."""

    name: str
    settings: type[Any]
    required: bool = False


RULES: dict[str, list[Rule]] = {}
"""The rules of each method: the plain one first, then variants selected by knobs."""
METHODS: dict[str, str] = {}
"""Each method's help line, in the order registered."""
SECTIONS: dict[str, DefaultsSection] = {}


def register_rule(rule: Rule) -> Rule:
    """Add `rule`; a rule with `selected_by` extends a method registered before it."""
    if rule.selected_by:
        if rule.method not in RULES:
            raise ValueError(f"variant of unregistered cache method {rule.method!r}")
    elif rule.method in RULES:
        raise ValueError(f"cache method {rule.method!r} is registered twice")
    else:
        METHODS[rule.method] = rule.help
    RULES.setdefault(rule.method, []).append(rule)
    return rule


def register_defaults(section: DefaultsSection) -> DefaultsSection:
    """Add a section of the manifest's cache defaults."""
    if section.name in SECTIONS:
        raise ValueError(f"cache defaults section {section.name!r} is registered twice")
    SECTIONS[section.name] = section
    return section


def rule_knobs(method: str) -> tuple[str, ...]:
    """Every knob `method` takes, its variants' included, or a BadInput listing the methods."""
    if method not in RULES:
        raise BadInput(f"cache must be one of {', '.join(METHODS)}, got {method!r}", param="cache")
    return tuple(name for rule in RULES[method] for name in rule.knobs)


def rule_for(method: str, knobs: Mapping[str, object]) -> Rule:
    """The registered rule of `method` for the given knobs: a variant when one of its selecting knobs is set."""
    rules = RULES[method]
    return next((r for r in rules[1:] if any(name in knobs for name in r.selected_by)), rules[0])
