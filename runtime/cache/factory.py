"""The one factory of cache rules: a method name and its knobs to a rule for one request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from sencache.runtime.cache.base import CachePolicy
from sencache.runtime.cache.knobs import check_knobs
from sencache.runtime.cache.registry import RuleContext, rule_for
from sencache.runtime.cache.segments import expert_segments
from sencache.runtime.experts import experts_of, segments

if TYPE_CHECKING:
    from sencache.runtime.bundle import Bundle


def make_policy(
    method: str, knobs: Mapping[str, object] | None, steps: int, batch: int, bundle: Bundle, numel: int
) -> CachePolicy:
    """The cache rule `method` for one request of `batch` samples and `steps` steps on `bundle`
    (latents of `numel` elements per sample), as its module registered it; unset knobs take the
    bundle's defaults of the rule's section. Every problem is a BadInput naming the knob or the
    missing table. On a bundle of two experts, one rule per expert's run of steps (of the bundle's
    schedule), each with that expert's tables (runtime/cache/segments.py) and its share of the
    request's knobs (`Rule.share`)."""
    given = check_knobs(method, knobs)
    rule = rule_for(method, given)
    defaults = bundle.manifest.defaults.knobs(rule.section) if rule.section else {}
    boundary = None if bundle is None else bundle.manifest.boundary  # a rule that needs nothing may have none
    if boundary is None:
        return rule.build(dict(given), RuleContext(steps, batch, numel, defaults, bundle, rule.needs))
    parts = segments(experts_of(bundle.timesteps(steps), boundary))
    contexts = [RuleContext(end - first, batch, numel, defaults, bundle, rule.needs, e) for e, first, end in parts]
    if rule.share is not None:
        shares = rule.share(dict(given), contexts)
    elif "nfe" in given:
        shares = [{**given, "nfe": n} for n in split_nfe(int(given["nfe"]), [c.steps for c in contexts])]
    else:
        shares = [dict(given) for _ in contexts]
    return expert_segments([rule.build(k, c) for k, c in zip(shares, contexts, strict=True)], parts, boundary)


def split_nfe(nfe: int, lengths: list[int]) -> list[int]:
    """A request's NFE budget shared out over its experts' runs of steps in proportion to their
    lengths (largest remainders), each run's own budget: steps never move between experts."""
    exact = [nfe * n / sum(lengths) for n in lengths]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(lengths)), key=lambda i: shares[i] - exact[i])[: nfe - sum(shares)]:
        shares[i] += 1
    return shares
