"""Model-family adapters and the registry of named models. Each adapter registers itself
(`@register_family`); a new family is its module and an import line here."""

from __future__ import annotations

from sencache.runtime.errors import BadInput
from sencache.runtime.families import wan  # noqa: F401  (registers first: the order of ADAPTERS)

# isort: split
from sencache.runtime.families import cogvideox, ltx  # noqa: F401

# isort: split
from sencache.runtime.families import cogvideox_i2v, ltx_i2v, wan_i2v  # noqa: F401  (image-to-video variants after their T2V families)
from sencache.runtime.families.base import ADAPTERS, FamilyAdapter, ModelPreset, Shapes, StageLayout


def resolve(model: str) -> tuple[FamilyAdapter, ModelPreset]:
    """The adapter and preset of a model name such as `tiny-wan` or `wan2.1-t2v-1.3b`."""
    for adapter in ADAPTERS.values():
        name = adapter.aliases.get(model, model)
        if name in adapter.presets:
            return adapter, adapter.presets[name]
    known = ", ".join(name for a in ADAPTERS.values() for name in (*a.aliases, *a.presets))
    raise BadInput(f"unknown model {model!r} (known: {known})")


def adapter_for(family: str) -> FamilyAdapter:
    """The adapter of a family named in a bundle manifest."""
    try:
        return ADAPTERS[family]
    except KeyError:
        raise BadInput(f"unknown model family {family!r} (known: {', '.join(ADAPTERS)})") from None


__all__ = ["ADAPTERS", "FamilyAdapter", "ModelPreset", "Shapes", "StageLayout", "adapter_for", "resolve"]
