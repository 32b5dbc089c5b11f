"""Saved tensors that the backward makes again from smaller inputs instead of keeping them.

A kernel's autograd function saves its inputs. Where an input is a cheap, deterministic product of smaller tensors
(Mamba-2's q and k: C and B repeated over the heads of their group; its v: x scaled by dt) or of tensors kept anyway
(a short conv's output, of the input the conv keeps), keeping the product costs memory that one pass in the backward
gives back. `recomputed` takes products made before; `recomputed_output` a call whose own autograd function keeps its
output (the l2 feature map), made again from the call's inputs. Both work through saved-tensor hooks, which
torch.compile does not trace; there `compiled_recomputing` asks its partitioner for the same.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# What compiled_recomputing's regions keep when the backward needs it: the outputs of matmuls and of mmeff's kernels
# (custom ops, namespace "mmeff") but the short conv's, which eager mode makes again too (mmeff.blocks.conv);
# everything else in them (casts, gathers, elementwise ops) is made again.
_KEPT = frozenset(getattr(torch.ops.aten, name).default for name in ("mm", "addmm", "bmm", "baddbmm", "convolution"))
_REMADE_KERNELS = frozenset({"mmeff::causal_conv"})

# (product, make or the _Product of a `recomputed_output`, inputs); a tuple of products made by one call of `make`
Recipe = tuple["Tensor | tuple[Tensor, ...]", "Callable[..., Any] | _Product", Sequence[Tensor]]


@dataclass(frozen=True)
class PerRead:
    """A recipe's `make` whose product is made for each read of a saved view and not held between reads: for a
    copy cheaper to make twice than to hold through the backward between its readers (a scan's route-stacked input,
    read by the short conv's remade output before the recurrence's backward and by the conv's own backward after)."""

    make: Callable[..., Any]

    def __call__(self, *inputs: Tensor) -> Any:
        return self.make(*inputs)


class _Product:
    """A product's recipe, its inputs packed once for every saved view of it, and the product once a backward made it.

    Several nodes save views of one product (SSD keeps x, B and C of the short conv's output; the q, k, v, gate
    projections each keep the pre-norm's output): it is made once and held until each saved view has been read back
    (`views` counts those not yet read), then left to the views handed out. A short conv's output, from which the
    recipes of gated_deltanet's l2-mapped q, k and v's copy make theirs, so goes before the kernels' backward runs.
    A `PerRead` recipe's product is made for each read and never held; its inputs, as unpacked, are held instead."""

    def __init__(self, make: Callable[..., Any], inputs: Sequence[Tensor], pack: Callable[[Tensor], Any]) -> None:
        self.make = make
        self.inputs = tuple(pack(x) for x in inputs)  # as the outer saved-tensor hooks packed them
        # Where they keep an input as it is, the backward must find it as it was (other hooks answer for their own).
        self.versions = tuple(x._version if p is x else None for x, p in zip(inputs, self.inputs))
        self.made: Any = None
        self.views = 0
        self.unpacked: list[Tensor] | None = None  # a PerRead recipe's inputs, unpacked once for all its reads

    def get(self, unpack: Callable[[Any], Tensor]) -> Any:
        """The product, made on the first read of a saved view; one view's read counted (the last lets it go: a
        second backward through a retained graph makes it again for each view)."""
        made = self.made
        if made is None:
            inputs = self.unpacked
            if inputs is None:
                # Once: activation checkpointing's hooks refuse a second unpack of what they packed.
                inputs = [unpack(x) for x in self.inputs]
                if any(v is not None and x._version != v for x, v in zip(inputs, self.versions)):
                    raise RuntimeError(
                        "an input kept to make a saved tensor again was modified in place after the forward"
                    )
            made = self.make(*inputs)
            if isinstance(self.make, PerRead):
                self.unpacked = inputs
            else:
                self.made = made
        self.views -= 1
        if self.views <= 0:
            self.made = self.unpacked = None
        return made


@dataclass(frozen=True)
class _Made:
    """What `recomputed` keeps of a saved (view of a) product: the product's recipe, which of its products (None: it
    makes one), and the view's geometry."""

    product: _Product
    index: int | None
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int

    @classmethod
    def of(cls, product: _Product, t: Tensor, index: int | None = None) -> _Made:
        product.views += 1
        return cls(product, index, t.shape, t.stride(), t.storage_offset())

    def view(self, unpack: Callable[[Any], Tensor]) -> Tensor:
        """The saved view, on the product made (once) from the inputs as `unpack` gives them back."""
        made = self.product.get(unpack)
        return (made if self.index is None else made[self.index]).as_strided(self.shape, self.stride, self.offset)


def _unchanged_view(t: Tensor, product: Tensor) -> bool:
    """Whether t is a view of `product`, in its dtype, neither written in place (a recipe would make another tensor)."""
    same = t.untyped_storage().data_ptr() == product.untyped_storage().data_ptr() and t.dtype == product.dtype
    return same and not (t._version or product._version)


@contextlib.contextmanager
def recomputed(recipes: Sequence[Recipe]) -> Iterator[None]:
    """Inside: a tensor saved for the backward that is (a view of) `product` of a recipe (product, make, inputs) is
    kept as `inputs`, and `make(*inputs)` is run again when the backward first reads it (once for all its saved
    views). `make` must give the product bit for bit (elementwise ops, copies, a deterministic kernel). A tuple of
    products is made by one call of `make` (returning them in order), once for all of them. Saved-tensor hooks already
    in force get the inputs. A recipe of `recomputed_output` shares its product (made once for both). Not while
    torch.compile traces: its partitioner picks what to save."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    outer_pack, outer_unpack = outer_hooks()
    products: dict[int, tuple[Tensor, list[Any], int | None]] = {}  # storage -> (product, its recipe, index)
    for p, make, inputs in recipes:
        recipe = [make, inputs, make if isinstance(make, _Product) else None]  # the _Product once a view is saved
        for i, member in enumerate(p) if isinstance(p, tuple) else [(None, p)]:
            if member.numel():
                products[member.untyped_storage().data_ptr()] = (member, recipe, i)

    def pack(t: Tensor) -> Any:
        hit = products.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if hit is None or not _unchanged_view(t, hit[0]):
            return outer_pack(t)
        _, recipe, index = hit
        if recipe[2] is None:
            recipe[2] = _Product(recipe[0], recipe[1], outer_pack)
        return _Made.of(recipe[2], t, index)

    def unpack(saved: Any) -> Tensor:
        return saved.view(outer_unpack) if isinstance(saved, _Made) else outer_unpack(saved)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        products.clear()  # autograd keeps `pack` until the backward: the products must not live on through it


class _Pending:
    """A tensor `recomputed_output`'s call saved: kept as it is (packed by the outer hooks), or as a view of the call's
    output, once that is known."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def recomputed_output(make: Callable[..., Tensor], inputs: Sequence[Tensor]) -> tuple[Tensor, Recipe | None]:
    """(make(*inputs), its recipe for `recomputed`, or None): what the call itself saves of its output (an
    autograd function keeping its result: the l2 feature map) is kept as the inputs too, and made again in the
    backward, once for the call's own views and those of the recipe. None, and the plain call, where the output is no
    new tensor (a view of an input) or nothing is recorded; `make` must give its output bit for bit (as `recomputed`)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return make(*inputs), None
    outer_pack, outer_unpack = outer_hooks()
    pending: list[tuple[_Pending, Tensor]] = []

    def pack(t: Tensor) -> _Pending:
        slot = _Pending(None)
        pending.append((slot, t))  # packed below, once the output is known: then an offloading hook skips its views
        return slot

    def unpack(slot: _Pending) -> Tensor:
        return slot.value.view(outer_unpack) if isinstance(slot.value, _Made) else outer_unpack(slot.value)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = make(*inputs)
    product = None
    if out.numel() and not any(out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in inputs):
        product = _Product(make, inputs, outer_pack)
    for slot, t in pending:
        own = product is not None and _unchanged_view(t, out)
        slot.value = _Made.of(product, t) if own else outer_pack(t)
    pending.clear()  # autograd keeps `pack` until the backward: the call's outputs must not live on through it
    return out, (None if product is None else (out, product, ()))


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


@contextlib.contextmanager
def saved_storages() -> Iterator[dict[int, Tensor]]:
    """Inside: the tensors autograd saves for the backward are recorded (kept as they are: hooks outside are not
    called); at exit the dict holds {storage data pointer: a saved tensor of it} for those the graph still keeps. A
    tensor saved and let go inside is left out (the reference recurrence's final state, which a mixer drops): its
    address may already hold another saved storage, which a count by address alone then missed (a CI run of the
    checkpointing test). An output its own node keeps (exp's) stays in a cycle with the node, and counted, until a
    backward frees the graph."""
    found: dict[int, Tensor] = {}
    refs: list[weakref.ref[Tensor]] = []

    def pack(t: Tensor) -> Tensor:
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _same):
        yield found
    for ref in refs:
        t = ref()
        if t is not None:
            found.setdefault(t.untyped_storage().data_ptr(), t)


def _keep(products: bool, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing's policy of `compiled_recomputing`."""
    kernel = getattr(op, "namespace", None) == "mmeff" and op.name() not in _REMADE_KERNELS
    kept = kernel or (products and op in _KEPT)
    return CheckpointPolicy.PREFER_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE


def compiled_recomputing(fn: Callable[..., Any], *args: Any, keep_products: bool = True) -> Any:
    """fn(*args); while torch.compile traces with a backward to record, as a selective activation checkpoint whose
    casts, gathers and elementwise ops are made again in the backward rather than kept (their inputs kept instead);
    matmuls' outputs too where not `keep_products`.

    Inductor's partitioner keeps any value that a matmul or a kernel reads in the backward (it would be materialized
    there anyway): an MLP's GELU output, which the next projection's weight gradient reads, and the route-stacked
    copies of the bidirectional scans, which the kernels read, were then kept beside their inputs. Compiled ViT-S
    rows kept 19.1 (gla-bi) and 25.5 (mamba2-bi) KiB per token and layer against 11.6 and 12.8 eager; in these regions
    11.6 and 12.5 (`benchmarks/saved_memory.py --compiled`). On an H100 at 224 px that took the compiled peaks from
    12.1 to 8.1 GiB (gla-bi) and 15.6 to 8.8 (mamba2-bi); their speed against timm's moved within the spread between
    processes (mamba2-bi 0.31-0.36x with any region off or all on; `benchmarks/results/vision_speed_h100.md`, runs 5-7).
    """
    if not torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return fn(*args)
    policy = partial(_keep, keep_products)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, policy))


def kept_when_compiled(fn: Callable[..., Tensor], *inputs: Tensor, autocast: torch.dtype | None = None) -> list[Tensor]:
    """The tensors (fake: shapes and dtypes) that torch.compile's backward graphs take from the forward of
    fn(*inputs) (under `autocast` where given), as Inductor's partitioner picks them, over one backward of its
    output's mean square; the graphs run uncompiled. Dynamo's caches are reset first. (benchmarks/saved_memory.py
    --compiled, the regions' tests.)"""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    kept: list[Tensor] = []

    def backward(gm: torch.fx.GraphModule, _: Any) -> Any:
        for node in gm.graph.nodes:
            value = node.meta.get("val")
            if node.op == "placeholder" and not node.name.startswith("tangents") and isinstance(value, Tensor):
                kept.append(value)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=backward,
                           partition_fn=partial(min_cut_rematerialization_partition, compiler="inductor"))  # fmt: skip
    torch._dynamo.reset()
    device = inputs[0].device.type
    with torch.autocast(device, dtype=autocast or torch.get_autocast_dtype(device), enabled=autocast is not None):
        out = torch.compile(fn, backend=backend, dynamic=False)(*inputs)
    out.float().square().mean().backward()  # the backward graph is partitioned (and `backward` called) on its first run
    return kept

