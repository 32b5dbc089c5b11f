"""Token mixers, channel mixers and norms, built by name: `build(name, dim, **options)`."""

from mmeff.blocks import attention, efficient, ffn, hybrid, linear, moe, norm, sparse, ssm  # noqa: F401  (register the blocks)
from mmeff.blocks.cache import Cache
from mmeff.blocks.layout import Layout, Tokens
from mmeff.blocks.registry import build, entry, names, register

__all__ = ["Cache", "Layout", "Tokens", "build", "entry", "names", "register"]
