"""mmeff: efficient sequence-model blocks (linear attention, SSMs, sparse attention, MoE) for every modality."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmeff.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from mmeff.checkpoint import load
    from mmeff.hub import Model

__version__ = "0.1.0"
__all__ = ["ConfigError", "Model", "RunConfig", "load", "__version__"]


def __getattr__(name: str) -> Any:
    # `load` imports torch (seconds): only when used, so that the command line's help and config errors are fast.
    if name == "load":
        from mmeff.checkpoint import load

        return load
    if name == "Model":  # Model.from_pretrained(DIR): any mmeff checkpoint folder
        from mmeff.hub import Model

        return Model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
