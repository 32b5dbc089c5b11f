"""One registry type for everything chosen by name: blocks, encoders, tasks, shard sources, presets, commands.

As timm's `register_model`: a decorator on the definition registers it, lookups go by name and unknown names
list the known ones. A registry may hold a table of name -> module that registers it: a lookup imports only
that module, so choosing one task does not import the others (nor Lightning for a config error).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Generic, TypeVar

from mmeff.errors import ConfigError

T = TypeVar("T")


def summary_of(obj: Any) -> str:
    """The first line of `obj`'s docstring ('' without one)."""
    doc = inspect.getdoc(obj) if getattr(obj, "__doc__", None) else ""
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object: its name, kind within the registry (a block's 'mixer', 'ffn', 'norm'), one-line
    summary and any further facts the registering code gave (`meta`)."""

    name: str
    obj: T
    kind: str = ""
    summary: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> T:
        """The registered object (a class, for blocks and config sections)."""
        return self.obj


class Registry(Generic[T]):
    """Named objects of one sort (`what` names it in errors: 'block', 'task', ...).

    `modules` maps names to the module whose import registers them; that module is imported on the first
    lookup of the name. Names registered without a table entry (a user's own block) work once their module
    is imported.
    """

    def __init__(self, what: str, modules: Mapping[str, str] | None = None) -> None:
        self.what = what
        self._modules = dict(modules or {})
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, kind: str = "", summary: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: register the object as `name` (summary: its docstring's first line unless given)."""

        def wrap(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} registered twice")
            text = summary_of(obj) if summary is None else (summary.strip().splitlines() or [""])[0]
            self._entries[name] = Entry(name, obj, kind, text, dict(meta))
            return obj

        return wrap

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._modules

    def names(self, kind: str | None = None) -> list[str]:
        """Known names, sorted (of one `kind` only: this imports every module of the table)."""
        if kind is None:
            return sorted({*self._entries, *self._modules})
        return [e.name for e in self.entries() if e.kind == kind]

    def entry(self, name: str) -> Entry[T]:
        """The entry of `name`, importing its module first if needed; a ConfigError lists the known names."""
        if name not in self._entries and name in self._modules:
            importlib.import_module(self._modules[name])
            if name not in self._entries:
                raise ImportError(f"{self._modules[name]} does not register {self.what} {name!r}")
        if name not in self._entries:
            raise ConfigError(f"unknown {self.what} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def get(self, name: str) -> T:
        """The object registered as `name`."""
        return self.entry(name).obj

    def entries(self) -> list[Entry[T]]:
        """Every entry, sorted by name (imports every module of the table)."""
        return [self.entry(name) for name in self.names()]


_contract_checked: dict[tuple[int, str], ModuleType] = {}


def contract_module(registry: Registry, name: str, contract: type, what: str) -> ModuleType:
    """The module that registered `name` in `registry`, checked against `contract` on first use."""
    key = (id(registry), name)
    if key not in _contract_checked:
        module = sys.modules[registry.get(name).__module__]
        _contract_checked[key] = check_contract(module, contract, f"{what} for {name!r}")
    return _contract_checked[key]


def check_contract(module: ModuleType, contract: type, what: str) -> ModuleType:
    """Raise a TypeError naming what `module` lacks of the Protocol `contract` (its functions, with their
    parameters, and its annotated attributes); return the module."""
    problems = []
    for name, fn in vars(contract).items():
        if name.startswith("_") or not callable(fn):
            continue
        own = getattr(module, name, None)
        want = [p for p in inspect.signature(fn).parameters if p != "self"]
        if not callable(own):
            problems.append(f"def {name}({', '.join(want)})")
        elif len(inspect.signature(own).parameters) != len(want):
            problems.append(f"{name} takes ({', '.join(want)}), not {inspect.signature(own)}")
    problems += [f"{name}: {tp}" for name, tp in vars(contract).get("__annotations__", {}).items() if not hasattr(module, name)]
    if problems:
        raise TypeError(f"{module.__name__} is not a complete {what}: it needs {'; '.join(problems)}")
    return module
