"""One registry from config names to block classes (token mixers, channel mixers, norms)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from mmeff.config import ConfigError


@dataclass(frozen=True)
class Entry:
    """A registered block: its class, kind ('mixer', 'ffn' or 'norm') and one-line summary."""

    cls: type[nn.Module]
    kind: str
    summary: str


_REGISTRY: dict[str, Entry] = {}


def register(name: str, kind: str = "mixer") -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make `cls` buildable as `build(name, dim, **options)`."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"block name {name!r} registered twice")
        summary = (inspect.getdoc(cls) or "").splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = Entry(cls, kind, summary)
        return cls

    return wrap


def names(kind: str | None = None) -> list[str]:
    """Registered block names, optionally only those of one kind."""
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def entry(name: str) -> Entry:
    """The registry entry of `name`, with a clear error listing the known names."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown block {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]


def build(name: str, dim: int, where: str = "", **options: Any) -> nn.Module:
    """Build block `name` of width `dim`; unknown or mistyped options are a ConfigError naming `where`."""
    cls = entry(name).cls
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p not in ("self", "dim") and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    if not takes_any:
        for key in options:
            if key not in allowed:
                prefix = f"{where}." if where else ""
                raise ConfigError(f"unknown option {prefix}{key} for block {name!r}; allowed: {', '.join(allowed)}")
    try:
        return cls(dim, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or name}: cannot build {name!r} with {options}: {e}") from None
