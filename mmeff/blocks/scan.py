"""Scan orders for the linear-attention and SSM mixers, and the base class they share.

A recurrent mixer reads tokens in one order. For causal models that is the token order. For
bidirectional inputs (vision, audio) the recurrence runs along several routes and the outputs,
mapped back to token order, are averaged:

- ``scan: forward``: one route (``order: raster`` = token order, or ``column``: column-major in each
  frame of the layout's grid);
- ``scan: bi``: that route and its reverse (Vision Mamba, Zhu et al., 2024) - the default when causal=false;
- ``scan: cross``: VMamba's four routes (Liu et al., 2024): raster, column-major and both reversed;
- ``scan: global``: no route: every token reads one state summed over its whole sequence (mixers without
  decay or delta rule only, i.e. ``linear_attn``: the non-causal form, two matmuls instead of a scan).

The token grid and the class tokens come from the call's `Layout`: its `special` leading tokens and
any tokens after the grid are read last on every route, so each route's state has seen the whole
sequence when it reaches them. Packed documents (`layout.docs`) are scanned each on its own: the
recurrence restarts at every boundary (`cu_seqlens`), and the reverse route reverses each document.

A mixer may take `scan: bi` over a plain token order (no class token, no packed documents, no `scan_tokens`)
through one op that reads both directions (`ScanMixer.both_routes`; GLA on CUDA: mmeff.ops.bidirectional_gla);
otherwise, and elsewhere, the routes below run.

Routes are stacked along the batch dimension (each sequence's routes side by side), so the recurrence runs
once for all of them, with shared weights. Only the order-dependent part of a mixer (short conv + recurrence,
`mix`) runs per route; projections, gates and output norms are per token and run once (`project`, `output`).
``scan_tokens: N`` caps the route-stacked tokens of one run: the batch's sequences go through their routes in
groups of at most N tokens (one sequence's routes at the least; packed documents in one group), one group after
another, so that the backward holds one group's working buffers at a time rather than the whole batch's: more,
smaller launches for a lower peak.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff import ops
from mmeff.blocks.cache import Cache
from mmeff.blocks.layout import Layout
from mmeff.ops import dispatch
from mmeff.ops.recompute import PerRead, Recipe, compiled_recomputing, recomputed, under_autocast_now
from mmeff.ops.varlen import cu_seqlens_from_docs

ScanKind = Literal["forward", "bi", "cross", "global"]
Order = Literal["raster", "column"]
# A route: None (token order), "flip" (token order reversed) or gather indices [T].
Route = Union[None, str, Tensor]
# What `mix` runs on: token streams in scan order and the document boundaries over their flattened tokens.
MixFn = Callable[[list[Tensor], Union[Tensor, None]], Tensor]


class Routes:
    """The token orders a mixer scans along, and how route outputs go back to token order."""

    def __init__(self, causal: bool, scan: ScanKind | None = None, order: Order = "raster",
                 max_tokens: int | None = None) -> None:  # fmt: skip
        scan = scan or ("forward" if causal else "bi")
        if scan not in ("forward", "bi", "cross", "global"):
            raise ValueError(f"scan must be 'forward', 'bi', 'cross' or 'global', got {scan!r}")
        if order not in ("raster", "column"):
            raise ValueError(f"order must be 'raster' or 'column', got {order!r}")
        if causal and (scan != "forward" or order != "raster"):
            raise ValueError("a causal mixer scans forward in token order; scan/order need causal=false")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
            raise ValueError(f"scan_tokens must be a positive number of tokens or null, got {max_tokens!r}")
        self.scan, self.order, self.causal, self.max_tokens = scan, order, causal, max_tokens
        self._plans: dict[tuple, Plan | None] = {}

    @property
    def is_identity(self) -> bool:
        """True when the only route is the token order (what decoding with a cache needs)."""
        return self.scan == "forward" and self.order == "raster"

    def routes(self, length: int, layout: Layout, device: torch.device) -> list[Route]:
        """The routes over `length` tokens laid out as `layout`."""
        if self.causal or self.scan == "global":
            return [None]
        plain = layout.special == 0 and (layout.grid is None or layout.grid_tokens == length)
        if self.order == "raster" and self.scan != "cross" and (plain or layout.docs is not None):
            return [None, "flip"] if self.scan == "bi" else [None]
        if layout.docs is not None:
            raise ValueError(f"scan={self.scan!r}, order={self.order!r} over packed documents: only raster forward/bi scans keep documents apart")
        if layout.grid is None and (self.scan == "cross" or self.order == "column"):
            raise ValueError(f"scan={self.scan!r}, order={self.order!r} needs the token grid; the encoder's layout has none")
        body = layout.grid_tokens or length - layout.special
        raster = torch.arange(body, device=device)
        column = raster.view(*layout.grid).transpose(1, 2).reshape(-1) if layout.grid is not None else None
        if self.scan == "cross":
            bodies = [raster, column, raster.flip(0), column.flip(0)]
        else:
            first = column if self.order == "column" else raster
            bodies = [first] + ([first.flip(0)] if self.scan == "bi" else [])
        rest = torch.cat([torch.arange(layout.special, device=device), torch.arange(layout.special + body, length, device=device)])
        return [torch.cat([b + layout.special, rest]) for b in bodies]

    def flips(self, length: int, layout: Layout) -> bool:
        """Whether the routes are the token order and its reverse, over whole sequences in one group (what an op of
        both directions takes instead: ScanMixer.both_routes)."""
        plain = layout.special == 0 and (layout.grid is None or layout.grid_tokens == length)
        bi = not self.causal and self.scan == "bi" and self.order == "raster"
        return bi and plain and layout.docs is None and self.max_tokens is None

    def plan(self, batch: int, length: int, layout: Layout, device: torch.device) -> Plan | None:
        """The gathers of `batch` sequences of `length` tokens along the routes (None: the token order only);
        kept per shape, so a step does not rebuild the same index tensors in every layer."""
        key = (batch, length, layout.special, layout.grid, layout.docs is not None, device)
        tracing = torch.compiler.is_compiling()  # a traced length is a SymInt, not hashable; and no side effects
        if not tracing and key in self._plans:
            return self._plans[key]
        routes = self.routes(length, layout, device)
        plan = None
        if not (len(routes) == 1 and routes[0] is None):
            order = torch.cat([_indices(r, length, device) for r in routes])
            back = torch.cat([i * length + torch.argsort(o) for i, o in enumerate(order.view(len(routes), length))])
            flip = len(routes) == 2 and routes[0] is None and isinstance(routes[1], str)
            plan = Plan(len(routes), _rows(order, batch, length), _rows(back, batch, len(routes) * length), flip)
        if not tracing:
            self._plans[key] = plan
        return plan

    def __call__(self, fn: MixFn, streams: list[Tensor], layout: Layout, per_read: int = 0) -> Tensor:
        """Run `fn` on the token streams [B, T, ...] along every route; mean of the outputs in token order. The first
        `per_read` streams' route copies are gathered for each read in the backward (`regathered`)."""
        batch, length = streams[0].shape[:2]
        plan = self.plan(batch, length, layout, streams[0].device)
        if plan is None:
            # Compiled, in a region too, so that what eager mode makes again in the backward (`recomputed`) is made
            # again: outside one the compiled gated_deltanet LM kept 8 KiB a token and layer more than eager mode (its
            # short conv's output is that size; benchmarks/saved_memory.py --lm --compiled).
            return compiled_recomputing(lambda *s: fn(list(s), layout.cu_seqlens), *streams)
        group = max(1, self.max_tokens // (plan.routes * length)) if self.max_tokens else batch  # sequences a call
        if group < batch and layout.docs is None:
            # Groups of sequences one after another, each through its own routes: the backward of one group ends,
            # and frees its buffers, before the next one's starts.
            groups = [list(part) for part in zip(*(s.split(group) for s in streams))]
            plans = (self.plan(part[0].shape[0], length, layout, part[0].device) for part in groups)
            return torch.cat([self._stacked(fn, part, layout, p, per_read) for part, p in zip(groups, plans)])
        return self._stacked(fn, streams, layout, plan, per_read)

    def _stacked(self, fn: MixFn, streams: list[Tensor], layout: Layout, plan: Plan, per_read: int) -> Tensor:
        """`fn` on the streams' routes stacked along the batch, its outputs merged back to token order."""
        # Routes go along the batch, route-minor ([B * R, T]): one gather per stream builds them all (one launch for
        # all streams on the route kernels), one gathers the outputs back to token order, with no flipped or
        # permuted copy per route.
        docs = None if layout.docs is None else _stack([layout.docs], plan.order, plan.routes)[0]
        cu_seqlens = None if docs is None else cu_seqlens_from_docs(docs)

        def run(*sources: Tensor) -> Tensor:
            stacked = list(_Stack.apply(plan.order, plan.back, plan.routes, plan.flip, *sources))
            with regathered(stacked, list(sources), plan, per_read):
                return fn(stacked, cu_seqlens)

        # Compiled, the stacked copies are gathered again in the backward, as `regathered` has them in eager mode (the
        # merge stays outside: made again, it would keep the routes' outputs, R times its own).
        ys = compiled_recomputing(run, *streams)
        return _Merge.apply(ys, plan.order, plan.back, plan.routes, plan.flip)


@dataclass(frozen=True)
class Plan:
    """Scan routes as row gathers: `routes` R, `order` [B * R * T] rows of [B * T] that stack the routes along the
    batch (route-minor), `back` [B * T * R] rows of those [B * R * T] that bring each route back to token order;
    `flip`: the routes are the token order and its reverse (what mmeff.kernels.routes does without the gathers)."""

    routes: int
    order: Tensor
    back: Tensor
    flip: bool = False


def _rows(index: Tensor, batch: int, span: int) -> Tensor:
    """`index` [N] into each of `batch` spans of `span` rows, as flat row indices [batch * N]."""
    return (torch.arange(batch, device=index.device)[:, None] * span + index).flatten()


def _flip_kernels(xs: Sequence[Tensor], flip: bool) -> ModuleType | None:
    """mmeff.kernels.routes where they take streams `xs` of a `flip` plan (CUDA, not while torch.compile traces:
    Inductor fuses the gathers itself), else None."""
    if not flip:
        return None
    fast = [("triton", lambda: next((why for why in map(routes_unsupported, xs) if why), ""))]
    return dispatch.triton_kernels("routes") if dispatch.choose("scan_routes", "auto", fast) == "triton" else None


def routes_unsupported(x: Tensor) -> str:
    """Why mmeff.kernels.routes cannot take stream `x`; "" when they can."""
    return dispatch.eager_triton_unsupported(x, "routes", lambda kernels: kernels.unsupported(x))


def _stack(xs: Sequence[Tensor], order: Tensor, routes: int, flip: bool = False, scale: float = 1.0) -> list[Tensor]:
    """scale * x [B, T, ...] along the routes (a Plan's `order`) -> [B * R, T, ...], for each stream x of `xs`."""
    kernels = _flip_kernels(xs, flip)
    if kernels is not None:
        return kernels.stack(xs, scale)
    # A row gather over [B * T, C] (index_select along dim 0): along dim 1 PyTorch's CUDA index_select runs a
    # generic gather kernel, 13.6 of the 85 GPU ms of a gla-bi ViT step at 1024 px on the H200.
    return [_gathered(x * scale if scale != 1.0 else x, order, routes) for x in xs]


def _gathered(x: Tensor, order: Tensor, routes: int) -> Tensor:
    """x [B, T, ...] gathered along the routes: rows `order` of [B * T, ...] -> [B * R, T, ...]."""
    batch, length = x.shape[:2]
    rows = x.reshape(batch * length, -1).index_select(0, order)
    return rows.view(batch * routes, length, *x.shape[2:])


def _merge(ys: Sequence[Tensor], back: Tensor, routes: int, mean: bool, flip: bool = False) -> list[Tensor]:
    """Route outputs [B * R, T, ...] back in token order (a Plan's `back`): their sum or mean -> [B, T, ...], for each
    stream of `ys`."""
    kernels = _flip_kernels(ys, flip)
    if kernels is not None:
        return kernels.merge(ys, 1.0 / routes if mean else 1.0)
    merged = []
    for y in ys:
        batch, length = y.shape[0] // routes, y.shape[1]
        rows = y.reshape(batch * routes * length, -1).index_select(0, back).view(batch, routes, length, *y.shape[2:])
        merged.append(rows.mean(1) if mean else rows.sum(1))
    return merged


# The two are each other's gradients (index_select's own backward, an index_add with atomics, took 20 of the
# 100 GPU ms of a gla-bi ViT step at 1024 px on the H200). The index tensors go in as inputs and are saved as
# such, so that torch.compile traces the functions too (it failed on a context attribute holding the Plan).
class _Stack(torch.autograd.Function):
    """Every stream along the routes: (order, back, routes, flip, *streams) -> the stacked streams."""

    @staticmethod
    def forward(ctx, order: Tensor, back: Tensor, routes: int, flip: bool, *xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.save_for_backward(back)
        ctx.routes, ctx.flip = routes, flip
        return tuple(_stack(xs, order, routes, flip))

    @staticmethod
    def backward(ctx, *dys: Tensor):  # type: ignore[override]
        (back,) = ctx.saved_tensors
        return None, None, None, None, *_merge(dys, back, ctx.routes, mean=False, flip=ctx.flip)


class _Merge(torch.autograd.Function):
    """The mean over routes of `_merge`."""

    @staticmethod
    def forward(ctx, y: Tensor, order: Tensor, back: Tensor, routes: int, flip: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(order)
        ctx.routes, ctx.flip = routes, flip
        return _merge([y], back, routes, mean=True, flip=flip)[0]

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        (order,) = ctx.saved_tensors
        return _stack([dout], order, ctx.routes, ctx.flip, scale=1.0 / ctx.routes)[0], None, None, None, None


@contextlib.contextmanager
def regathered(stacked: list[Tensor], streams: list[Tensor], plan: Plan, per_read: int = 0) -> Iterator[None]:
    """Inside: a tensor saved for the backward that is (a view of) a route-stacked stream is kept as its source
    stream, and gathered along the routes again when the backward first reads it (`recomputed`: once for all the
    streams and all their views, the recurrence's inputs alike), but the first `per_read` streams, gathered for each
    read (`PerRead`): a short conv's input is read by the recipe of its output before the recurrence's backward and
    by the conv's own backward after it; held between the two, it sat through the recurrence's backward, where the
    step peaks.

    The stacked copies are R times their source (two for `bi`); the recurrence kernels and short convs save them.
    Saved-tensor hooks already in force (activation checkpointing, offloading, benchmarks/saved_memory.py's count)
    get what this keeps: the source stream instead of the stacked copy. Not while torch.compile traces: its
    partitioner picks what to save.
    """

    def again(*sources: Tensor) -> list[Tensor]:
        return _stack(sources, plan.order, plan.routes, plan.flip)

    one = PerRead(lambda source: again(source)[0])
    recipes: list[Recipe] = [(c, one, (s,)) for c, s in zip(stacked[:per_read], streams[:per_read])]
    if len(stacked) > per_read:
        recipes.append((tuple(stacked[per_read:]), again, streams[per_read:]))
    with recomputed(recipes):
        yield


def _indices(route: Route, length: int, device: torch.device) -> Tensor:
    """The token indices [T] that `route` reads in order."""
    if route is None:
        return torch.arange(length, device=device)
    return torch.arange(length - 1, -1, -1, device=device) if isinstance(route, str) else route


class ScanMixer(nn.Module):
    """Base of the linear/SSM token mixers: `project` per token, `mix` along the scan routes, `output` per token.

    Subclasses implement the three steps; `mix` owns the order-dependent state (short conv,
    recurrence) and reads/writes it in the cache. The base checks the scan options (scan, order, chunk_size,
    scan_tokens: see the module docstring), runs the routes and counts the consumed tokens in `cache.offset`.
    """

    supports_global = False  # whether `mix` has a form without a scan (scan: global)

    def __init__(
        self, *, causal: bool = True, scan: ScanKind | None = None, order: Order = "raster", chunk_size: int = 64,
        scan_tokens: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if scan == "global" and not self.supports_global:
            raise ValueError(f"scan: global needs a mixer without decay or delta rule (linear_attn), not {type(self).__name__}")
        self.causal = causal
        self.routes = Routes(causal, scan, order, scan_tokens)
        self.chunk_size = chunk_size
        self.conv: nn.Module | None = None  # a subclass's short conv (mmeff.blocks.conv.ShortConv) on the first stream

    def project(self, x: Tensor) -> tuple[list[Tensor], Any]:
        """x [B, T, D] -> (token streams [B, T, ...] that `mix` scans, per-token extras for `output`)."""
        raise NotImplementedError

    def mix(self, streams: list[Tensor], cache: Cache | None, cu_seqlens: Tensor | None) -> Tensor:
        """The order-dependent part on streams in scan order -> [B, T, ...]; fills `cache` when given.

        `cu_seqlens` (int32 [N+1], or None) bounds the documents over the flattened B*T tokens: the state
        (and the short conv) restarts at each boundary."""
        raise NotImplementedError

    def both_routes(self, streams: list[Tensor], layout: Layout) -> Tensor | None:
        """Hook for `scan: bi` over a plain token order (Routes.flips): the mean over both routes from one op that
        reads both directions, or None (the default): the routes run `mix` on the stacked batch."""
        return None

    def local(self, y: Tensor, streams: list[Tensor], layout: Layout) -> Tensor:
        """Hook after the routes, before `output`: a token-order term from the streams added to `mix`'s output
        (LinearMixer's local_conv); none by default."""
        return y

    def output(self, y: Tensor, extras: Any) -> Tensor:
        """Route-averaged `mix` output and the extras of `project` -> [B, T, D]."""
        raise NotImplementedError

    @staticmethod
    def mode(length: int) -> Literal["chunk", "recurrent"]:
        """The op mode: chunked for training and prefill, the plain recurrence for one-token steps."""
        return "recurrent" if length == 1 else "chunk"

    def forward(self, x: Tensor, cache: Cache | None = None, layout: Layout | None = None) -> Tensor:
        layout = layout or Layout()
        if cache is not None and not self.routes.is_identity:
            raise ValueError(
                f"{type(self).__name__} scans {self.routes.scan!r} (causal={self.causal}): decoding with a cache needs causal=true"
            )
        if cache is not None and layout.docs is not None:
            raise ValueError("layout.docs (packed documents) is for training and evaluation; decoding takes one sequence per row")
        streams, extras = self.project(x)
        mixed = None
        if cache is None and self.routes.flips(x.shape[1], layout):
            mixed = self.both_routes(streams, layout)
        if mixed is None:
            mixed = self.routes(lambda s, cu: self.mix(s, cache, cu), streams, layout, per_read=int(self.conv is not None))
        y = self.local(mixed, streams, layout)
        if cache is not None:
            cache.offset += x.shape[1]
        return self.output(y, extras)


def packed(x: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """[B, T, ...] as the one packed row [1, B*T, ...] that `cu_seqlens` bounds (unchanged without it)."""
    return x if cu_seqlens is None else x.flatten(0, 1).unsqueeze(0)


class GroupedNorm(nn.Module):
    """RMS or layer norm over each of `groups` equal slices of the last dim, optionally gated by silu(z).

    groups = heads gives the per-head (group) norm of RetNet/GLA/DeltaNet; `gate_first` = True is
    Mamba-2's gated RMSNorm, norm(y * silu(z)); otherwise the gate follows: norm(y) * silu(z).
    """

    def __init__(self, width: int, groups: int = 1, kind: str = "rms", gate_first: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        if kind not in ("rms", "group", "none"):
            raise ValueError(f"norm must be 'rms', 'group' or 'none', got {kind!r}")
        if width % groups:
            raise ValueError(f"norm width {width} must divide by groups {groups}")
        self.groups, self.kind, self.gate_first, self.eps = groups, kind, gate_first, eps
        self.weight = nn.Parameter(torch.ones(width)) if kind != "none" else None
        self.bias = nn.Parameter(torch.zeros(width)) if kind == "group" else None

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "none":
            return y if z is None else y * F.silu(z)
        kind = "rms" if self.kind == "rms" else "layer"
        return ops.norm(y, self.weight, self.bias, self.eps, kind, self.groups, gate=z, gate_first=self.gate_first)

    def projected(
        self, out: nn.Module, y: Tensor, z: Tensor | None = None, keep_gate_view: bool = False,
        gate: nn.Module | None = None,
    ) -> Tensor:  # fmt: skip
        """out(self(y, z)), with the norm's output made again from y and z in the backward (where `out` reads it)
        instead of kept: the norm's own backward keeps y and z already, so this keeps a [tokens, width] tensor less
        per block (benchmarks/saved_memory.py). `keep_gate_view`: z, a view of a wider tensor the backward keeps
        anyway, is read and kept in place rather than copied. `gate` (only while torch.compile traces): z is the
        input of gate, which is made inside the region and so again in the backward, its matmul too (what eager
        mode's `remake_gate` recipe does; the partitioner would keep a matmul's output)."""
        # Contiguous first, so that the norm keeps these very tensors: a view (Mamba-2's z is a slice of in_proj's
        # output) would keep its whole base alive here, unless that is kept anyway.
        inputs = (y.contiguous(),) if z is None else (y.contiguous(), z if keep_gate_view or gate else z.contiguous())

        def run(*inputs: Tensor) -> Tensor:
            if gate is not None:
                inputs = (inputs[0], gate(inputs[1]))
            normed = self(*inputs)
            with recomputed([(normed, under_autocast_now(self, y.device.type), inputs)]):
                return out(normed)

        # compiled, the same through the partitioner
        return compiled_recomputing(run, *inputs, keep_products=gate is None)


def dt_bias_init(size: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's time-step bias: softplus(bias) log-uniform in [dt_min, dt_max] (Gu & Dao, 2023)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


def no_decay_parameter(value: torch.Tensor) -> nn.Parameter:
    """A parameter marked `_no_weight_decay` (mamba-ssm's convention for A_log, D and dt_bias)."""
    p = nn.Parameter(value)
    p._no_weight_decay = True  # type: ignore[attr-defined]
    return p
