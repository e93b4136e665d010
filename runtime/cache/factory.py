"""The one factory of cache rules: a method name and its knobs to a rule for one request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sencache.runtime.cache.base import CachePolicy, NoCache
from sencache.runtime.cache.baselines import (
    FixedPolicy,
    FixedSettings,
    MagCachePolicy,
    MagCacheSettings,
    TeaCachePolicy,
    TeaCacheSettings,
)
from sencache.runtime.cache.budget import make_budget_policy
from sencache.runtime.cache.knobs import BUDGET_TARGETS, check_knobs
from sencache.runtime.cache.sencache import (
    SenCacheMaxPolicy,
    SenCacheOnlinePolicy,
    SenCacheOnlineSettings,
    SenCachePolicy,
    SenCacheSettings,
)
from sencache.runtime.errors import BadInput

if TYPE_CHECKING:
    from sencache.runtime.bundle import Bundle


def make_policy(
    method: str, knobs: Mapping[str, object] | None, steps: int, batch: int, bundle: Bundle, numel: int
) -> CachePolicy:
    """The cache rule `method` for one request of `batch` samples and `steps` steps on `bundle`
    (latents of `numel` elements per sample); unset knobs take the bundle's defaults, and
    SenCache's reference conventions are those of the bundle's family adapter. Every problem is a
    BadInput naming the knob or the missing table."""
    # Keyword arguments of the settings classes, which check each field against the knob table.
    given: dict[str, Any] = check_knobs(method, knobs)
    defaults = bundle.manifest.defaults.cache
    if method == "none":
        return NoCache(batch)
    if method == "sencache" and any(name in given for name in BUDGET_TARGETS):
        return make_budget_policy(given, bundle.sensitivity(), steps, batch, numel)
    if method == "sencache-online":
        online = SenCacheOnlineSettings(**{**defaults["sencache"], **given})
        reference = bundle.adapter.sencache_reference if online.conventions == "reference" else None
        return SenCacheOnlinePolicy(online, bundle.sensitivity(), steps, batch, numel, reference)
    if method in ("sencache", "sencache-max"):
        settings = SenCacheSettings(**{**defaults["sencache"], **given})
        rule = SenCachePolicy if method == "sencache" else SenCacheMaxPolicy
        conventions = bundle.adapter.sencache_reference if settings.conventions == "reference" else None
        return rule(settings, bundle.sensitivity(), steps, batch, numel, conventions)
    if method == "fixed":
        return FixedPolicy(FixedSettings(**{"interval": 2, **given}), steps, batch)
    tables = bundle.baselines()
    if method == "teacache":
        teacache = TeaCacheSettings(**{**defaults["teacache"], **given}, coefficients=tables.teacache_coefficients)
        return TeaCachePolicy(teacache, steps, batch)
    if tables.magcache_ratios is None:
        raise BadInput(
            f"no MagCache ratios are published for {bundle.manifest.model}: calibrate the bundle "
            f"(`sencache calibrate`) to measure them"
        )
    magcache = MagCacheSettings(**{**defaults["magcache"], **given}, ratios=tables.magcache_ratios)
    return MagCachePolicy(magcache, steps, batch)
