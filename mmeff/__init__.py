"""mmeff: efficient sequence-model blocks (linear attention, SSMs, sparse attention, MoE) for every modality."""

from mmeff.checkpoint import load
from mmeff.config import ConfigError, RunConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "RunConfig", "load", "__version__"]
