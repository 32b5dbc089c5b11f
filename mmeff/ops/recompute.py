"""Saved tensors that the backward makes again from smaller inputs instead of keeping them.

A kernel's autograd function saves its inputs. Where an input is a cheap, deterministic product of smaller tensors
(Mamba-2's q and k: C and B repeated over the heads of their group; its v: x scaled by dt) or of tensors kept anyway
(a short conv's output, of the input the conv keeps), keeping the product costs memory that one pass in the backward
gives back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Recipe = tuple[Tensor, Callable[..., Tensor], Sequence[Tensor]]


class _Product:
    """A product's recipe, its inputs packed once for every saved view of it, and the product once a backward made it.

    Several nodes save views of one product (SSD keeps x, B and C of the short conv's output; the q, k, v, gate
    projections each keep the pre-norm's output): it is made once and lives until the last of them is freed."""

    def __init__(self, make: Callable[..., Tensor], inputs: tuple[Any, ...]) -> None:
        self.make, self.inputs = make, inputs  # inputs as the outer saved-tensor hooks packed them
        self.made: Tensor | None = None

    def get(self, unpack: Callable[[Any], Tensor]) -> Tensor:
        if self.made is None:
            self.made = self.make(*(unpack(x) for x in self.inputs))
        return self.made


@dataclass(frozen=True)
class _Made:
    """What `recomputed` keeps of a saved (view of a) product: the product's recipe and the view's geometry."""

    product: _Product
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


@contextlib.contextmanager
def recomputed(recipes: Sequence[Recipe]) -> Iterator[None]:
    """Inside: a tensor saved for the backward that is (a view of) `product` of a recipe (product, make, inputs) is
    kept as `inputs`, and `make(*inputs)` is run again when the backward first reads it (once for all its saved
    views). `make` must give the product bit for bit (elementwise ops, copies, a deterministic kernel). Saved-tensor
    hooks already in force get the inputs. Not while torch.compile traces: its partitioner picks what to save."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    outer_pack, outer_unpack = outer_hooks()
    products = {p.untyped_storage().data_ptr(): [p, make, inputs, None] for p, make, inputs in recipes if p.numel()}

    def pack(t: Tensor) -> Any:
        hit = products.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if hit is None or hit[0].dtype != t.dtype or hit[0]._version or t._version:
            return outer_pack(t)
        if hit[3] is None:
            hit[3] = _Product(hit[1], tuple(outer_pack(x) for x in hit[2]))
        return _Made(hit[3], t.shape, t.stride(), t.storage_offset())

    def unpack(saved: Any) -> Tensor:
        if not isinstance(saved, _Made):
            return outer_unpack(saved)
        return saved.product.get(outer_unpack).as_strided(saved.shape, saved.stride, saved.offset)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        products.clear()  # autograd keeps `pack` until the backward: the products must not live on through it


def under_autocast_now(fn: Callable[..., Tensor], device_type: str) -> Callable[..., Tensor]:
    """`fn` as a recipe's `make`: run in the backward (which runs without autocast) under the autocast state of now,
    so that it makes its product in the dtype the forward made it (its cast cache off too where it was: a CUDA-graph
    capture, mmeff.tasks.graphs)."""
    dtype, enabled = torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)
    cache = torch.is_autocast_cache_enabled()

    def again(*inputs: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache):
            return fn(*inputs)

    return again


def outer_hooks() -> tuple[Callable[[Tensor], Any], Callable[[Any], Tensor]]:
    """(pack, unpack) of the saved-tensor hooks in force (checkpointing, offloading, a count), else the identity: what
    hooks that keep some tensors their own way hand every other tensor to."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) or (_same, _same)


def _same(t: Any) -> Any:
    return t
