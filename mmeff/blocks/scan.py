"""Scan orders for the linear-attention and SSM mixers, and the base class they share.

A recurrent mixer reads tokens in one order. For causal models that is the token order. For
bidirectional inputs (vision, audio) the recurrence runs along several routes and the outputs,
mapped back to token order, are averaged:

- ``scan: forward``: one route (``order: raster`` = token order, or ``column``: column-major over `grid`);
- ``scan: bi``: that route and its reverse (Vision Mamba, Zhu et al., 2024) - the default when causal=false;
- ``scan: cross``: VMamba's four routes (Liu et al., 2024): raster, column-major and both reversed.

``grid: [h, w]`` gives the image token layout (needed by ``column`` and ``cross``); ``prefix_tokens``
leading tokens (class tokens) are not part of the grid: every route reads them last, so each
route's state has seen the whole sequence when it reaches them.

Routes are stacked along the batch dimension, so the recurrence runs once for all of them, with
shared weights. Only the order-dependent part of a mixer (short conv + recurrence, `mix`) runs per
route; projections, gates and output norms are per token and run once (`project`, `output`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmeff.blocks.cache import Cache

ScanKind = Literal["forward", "bi", "cross"]
Order = Literal["raster", "column"]


class Routes:
    """The token orders a mixer scans along, and how route outputs go back to token order."""

    def __init__(
        self,
        causal: bool,
        scan: ScanKind | None = None,
        order: Order = "raster",
        grid: Sequence[int] | None = None,
        prefix_tokens: int = 0,
    ) -> None:
        scan = scan or ("forward" if causal else "bi")
        if scan not in ("forward", "bi", "cross"):
            raise ValueError(f"scan must be 'forward', 'bi' or 'cross', got {scan!r}")
        if order not in ("raster", "column"):
            raise ValueError(f"order must be 'raster' or 'column', got {order!r}")
        if causal and (scan != "forward" or order != "raster" or prefix_tokens):
            raise ValueError("a causal mixer scans forward in token order; scan/order/prefix_tokens need causal=false")
        if grid is not None and (len(grid) != 2 or min(grid) < 1):
            raise ValueError(f"grid must be [h, w], got {grid!r}")
        if grid is None and (scan == "cross" or order == "column"):
            raise ValueError(f"scan={scan!r}, order={order!r} needs the token grid: grid: [h, w]")
        if prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be >= 0, got {prefix_tokens}")
        self.scan, self.order, self.prefix = scan, order, prefix_tokens
        self.grid = tuple(grid) if grid is not None else None
        self._perms: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor] | None]] = {}

    @property
    def is_identity(self) -> bool:
        """True when the only route is the token order itself (what decoding with a cache needs)."""
        return self.scan == "forward" and self.order == "raster" and self.prefix == 0

    def permutations(self, length: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per route: (gather indices, inverse indices) over `length` tokens, or None for token order."""
        key = (length, str(device))
        if key not in self._perms:
            self._perms[key] = [self._inverse(p) for p in self._routes(length, device)]
        return self._perms[key]

    def _routes(self, length: int, device: torch.device) -> list[torch.Tensor | None]:
        body = length - self.prefix
        if body < 0 or (self.grid is not None and body != self.grid[0] * self.grid[1]):
            expect = f"{self.prefix} + {self.grid[0]}*{self.grid[1]}" if self.grid else f">= {self.prefix}"
            raise ValueError(f"scan over {length} tokens, expected prefix_tokens + grid = {expect}")
        raster = torch.arange(body, device=device)
        column = raster.view(*self.grid).t().reshape(-1) if self.grid is not None else None
        if self.scan == "cross":
            bodies = [raster, column, raster.flip(0), column.flip(0)]
        else:
            first = column if self.order == "column" else raster
            bodies = [first] + ([first.flip(0)] if self.scan == "bi" else [])
        prefix = torch.arange(self.prefix, device=device)
        routes: list[torch.Tensor | None] = []
        for b in bodies:
            perm = torch.cat([b + self.prefix, prefix])
            routes.append(None if torch.equal(perm, torch.arange(length, device=device)) else perm)
        return routes

    @staticmethod
    def _inverse(perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if perm is None else (perm, torch.argsort(perm))

    def __call__(self, fn: Callable[[list[torch.Tensor]], torch.Tensor], streams: list[torch.Tensor]) -> torch.Tensor:
        """Run `fn` on the token streams [B, T, ...] along every route; mean of the outputs in token order."""
        batch, length = streams[0].shape[:2]
        perms = self.permutations(length, streams[0].device)
        if len(perms) == 1 and perms[0] is None:
            return fn(streams)
        stacked = [torch.cat([s if p is None else s.index_select(1, p[0]) for p in perms]) for s in streams]
        ys = fn(stacked).unflatten(0, (len(perms), batch))
        out = [ys[r] if p is None else ys[r].index_select(1, p[1]) for r, p in enumerate(perms)]
        return torch.stack(out).mean(0)


class ScanMixer(nn.Module):
    """Base of the linear/SSM token mixers: `project` per token, `mix` along the scan routes, `output` per token.

    Subclasses implement the three steps; `mix` owns the order-dependent state (short conv,
    recurrence) and reads/writes it in the cache. The base checks the scan options, runs the
    routes and counts the consumed tokens in `cache.offset`.
    """

    def __init__(
        self,
        *,
        causal: bool = True,
        scan: ScanKind | None = None,
        order: Order = "raster",
        grid: Sequence[int] | None = None,
        prefix_tokens: int = 0,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.routes = Routes(causal, scan, order, grid, prefix_tokens)
        self.chunk_size = chunk_size

    def project(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        """x [B, T, D] -> (token streams [B, T, ...] that `mix` scans, per-token extras for `output`)."""
        raise NotImplementedError

    def mix(self, streams: list[torch.Tensor], cache: Cache | None) -> torch.Tensor:
        """The order-dependent part on streams in scan order -> [B, T, ...]; fills `cache` when given."""
        raise NotImplementedError

    def output(self, y: torch.Tensor, extras: Any) -> torch.Tensor:
        """Route-averaged `mix` output and the extras of `project` -> [B, T, D]."""
        raise NotImplementedError

    @staticmethod
    def mode(length: int) -> Literal["chunk", "recurrent"]:
        """The op mode: chunked for training and prefill, the plain recurrence for one-token steps."""
        return "recurrent" if length == 1 else "chunk"

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if cache is not None and not self.routes.is_identity:
            raise ValueError(
                f"{type(self).__name__} scans {self.routes.scan!r} (causal={self.causal}): "
                "decoding with a cache needs causal=true"
            )
        streams, extras = self.project(x)
        y = self.routes(lambda s: self.mix(s, cache), streams)
        if cache is not None:
            cache.offset += x.shape[1]
        return self.output(y, extras)


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
        if z is not None and self.gate_first:
            y = y * F.silu(z)
        if self.kind != "none":
            # PyTorch's norm ops (fp32 statistics inside, fused on CUDA) rather than a chain of elementwise ops.
            g = y.unflatten(-1, (self.groups, -1))
            norm = F.rms_norm if self.kind == "rms" else F.layer_norm
            y = norm(g, g.shape[-1:], eps=self.eps).flatten(-2).to(y.dtype) * self.weight
            if self.bias is not None:
                y = y + self.bias
        if z is not None and not self.gate_first:
            y = y * F.silu(z)
        return y


def dt_bias_init(size: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's time-step bias: softplus(bias) log-uniform in [dt_min, dt_max] (Gu & Dao, 2023)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


def no_decay_parameter(value: torch.Tensor) -> nn.Parameter:
    """A parameter marked `_no_weight_decay` (mamba-ssm's convention for A_log, D and dt_bias)."""
    p = nn.Parameter(value)
    p._no_weight_decay = True  # type: ignore[attr-defined]
    return p
