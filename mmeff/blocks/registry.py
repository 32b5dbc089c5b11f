"""The registry of blocks (token mixers, channel mixers, norms): config names -> classes, with their options."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from mmeff.config import ConfigError
from mmeff.registry import Entry, Registry

BLOCKS: Registry[type[nn.Module]] = Registry("block")


def register(name: str, kind: str = "mixer") -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make `cls` buildable as `build(name, dim, **options)`; kind: 'mixer', 'ffn' or 'norm'."""
    return BLOCKS.register(name, kind=kind)


def names(kind: str | None = None) -> list[str]:
    """Registered block names, optionally only those of one kind."""
    return BLOCKS.names(kind)


def entry(name: str) -> Entry[type[nn.Module]]:
    """The registry entry of `name` (`.cls`, `.kind`, `.summary`), with a clear error listing the known names."""
    return BLOCKS.entry(name)


def options(cls: type) -> dict[str, inspect.Parameter] | None:
    """The keyword options of block class `cls` (beyond `dim`), or None if it takes any.

    A constructor with `**options` passes them on to its base class (the convention of every block), so the
    options are collected up the class hierarchy until a constructor without `**`.
    """
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass is nn.Module:
            return found  # reached the end of the forwarding chain
        params = inspect.signature(klass.__init__).parameters
        for name, p in params.items():
            if name not in ("self", "dim") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                found.setdefault(name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return found
    return None


def build(name: str, dim: int, where: str = "", **kwargs: Any) -> nn.Module:
    """Build block `name` of width `dim`; unknown or mistyped options are a ConfigError naming `where`."""
    cls = entry(name).cls
    allowed = options(cls)
    if allowed is not None:
        for key in kwargs:
            if key not in allowed:
                prefix = f"{where}." if where else ""
                raise ConfigError(f"unknown option {prefix}{key} for block {name!r}; allowed: {', '.join(sorted(allowed))}")
    try:
        return cls(dim, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or name}: cannot build {name!r} with {kwargs}: {e}") from None
