"""State-space token mixers: the Mamba and Mamba-2 blocks over `mmeff.ops.selective_scan` / `ssd`.

The module designs and initialisations follow mamba-ssm's `Mamba` (mamba_simple.py) and `Mamba2`
(mamba2.py): dt bias so that softplus(dt) is log-uniform in [dt_min, dt_max], S4D-real A = -[1..N]
for Mamba, A ~ U(A_init_range) per head for Mamba-2, D = 1. Scan routes for bidirectional inputs
come from `ScanMixer` (mmeff/blocks/scan.py); decoding keeps the conv state and the SSM state.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mmeff import ops
from mmeff.blocks.cache import Cache
from mmeff.blocks.conv import ShortConv
from mmeff.blocks.registry import register
from mmeff.blocks.scan import GroupedNorm, ScanMixer, dt_bias_init, no_decay_parameter, packed


@register("mamba")
class Mamba(ScanMixer):
    """Mamba selective SSM block (Gu & Dao, 2023 'Mamba: Linear-Time Sequence Modeling with Selective State Spaces').

    in_proj -> (x, z); x: causal depthwise conv + silu -> x_proj -> (dt, B, C); dt_proj (rank
    `dt_rank`) -> selective scan with per-channel A [d_inner, d_state], skip D and silu(z) gating -> out_proj.
    `backend` picks the scan's implementation (mmeff.ops.selective_scan: auto, torch = PyTorch, triton = mmeff's
    kernels, mamba_ssm).
    """

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = True,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
        **scan_options: Any,
    ) -> None:
        super().__init__(causal=causal, **scan_options)
        inner = int(expand * dim)
        ops.ssm.check_backend(backend)
        self.d_state, self.backend = d_state, backend
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=bias)
        self.conv = ShortConv(inner, d_conv, bias=conv_bias)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt_bias_init(inner, dt_min, dt_max, dt_init_floor))
        # S4D-real initialisation A_n = -(n + 1), kept as log in fp32.
        self.A_log = no_decay_parameter(torch.arange(1, d_state + 1, dtype=torch.float32).log().repeat(inner, 1))
        self.D = no_decay_parameter(torch.ones(inner))
        self.out = nn.Linear(inner, dim, bias=bias)

    def project(self, x: Tensor) -> tuple[list[Tensor], None]:
        return list(self.in_proj(x).chunk(2, dim=-1)), None

    def mix(self, streams: list[Tensor], cache: Cache | None, cu_seqlens: Tensor | None) -> Tensor:
        batch, length = streams[0].shape[:2]
        x, z = (packed(s, cu_seqlens) for s in streams)
        # x_proj and the scan keep the conv's output: kept as the conv's input instead, made again in the backward.
        x, kept_as_input = self.conv.made_again(x, cache, cu_seqlens)
        with kept_as_input:
            dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = dt @ self.dt_proj.weight.t()  # the bias is added (in fp32) by the scan
            y = ops.selective_scan(
                x.transpose(1, 2),
                dt.transpose(1, 2),
                -self.A_log.float().exp(),
                B.transpose(1, 2),
                C.transpose(1, 2),
                D=self.D.float(),
                z=z.transpose(1, 2),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
                return_last_state=cache is not None,
                mode=self.mode(x.shape[1]),
                chunk_size=self.chunk_size,
                initial_state=cache.get("state") if cache is not None else None,
                backend=self.backend,
                cu_seqlens=cu_seqlens,
            )
        if cache is not None:
            y, cache["state"] = y
        return y.transpose(1, 2).reshape(batch, length, -1)

    def output(self, y: Tensor, extras: None) -> Tensor:
        return self.out(y)


@register("mamba2")
class Mamba2(ScanMixer):
    """Mamba-2 SSD block (Dao & Gu, 2024 'Transformers are SSMs: Generalized Models and Efficient Algorithms').

    in_proj -> (z, xBC, dt); xBC: causal depthwise conv + silu -> (x [heads x head_dim], B, C
    [ngroups x d_state]); SSD with scalar A per head, dt_bias, skip D -> gated RMSNorm
    norm(y * silu(z)) per group -> out_proj. `backend` picks SSD's implementation (mmeff.ops.ssd: auto,
    torch = PyTorch, triton = mmeff's Triton kernels, mamba_ssm).
    """

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = True,
        d_state: int = 128,
        d_conv: int = 4,
        expand: float = 2,
        head_dim: int = 64,
        ngroups: int = 1,
        A_init_range: Sequence[float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
        **scan_options: Any,
    ) -> None:
        super().__init__(causal=causal, **scan_options)
        inner = int(expand * dim)
        ops.ssm.check_backend(backend)
        self.backend = backend
        if inner % head_dim:
            raise ValueError(f"expand * dim = {inner} must divide by head_dim={head_dim}")
        self.heads, self.head_dim = inner // head_dim, head_dim
        if self.heads % ngroups:
            raise ValueError(f"heads={self.heads} must divide by ngroups={ngroups}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must be 0 < low <= high, got {A_init_range}")
        self.inner, self.d_state, self.ngroups = inner, d_state, ngroups
        conv_width = inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(dim, inner + conv_width + self.heads, bias=bias)
        self.conv = ShortConv(conv_width, d_conv, bias=conv_bias)
        self.dt_bias = no_decay_parameter(dt_bias_init(self.heads, dt_min, dt_max, dt_init_floor))
        self.A_log = no_decay_parameter(torch.empty(self.heads).uniform_(*A_init_range).log())
        self.D = no_decay_parameter(torch.ones(self.heads))
        self.norm = GroupedNorm(inner, ngroups, "rms" if rmsnorm else "none", gate_first=not norm_before_gate)
        self.out = nn.Linear(inner, dim, bias=bias)

    def project(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        z, xBC, dt = self.in_proj(x).split([self.inner, self.inner + 2 * self.ngroups * self.d_state, self.heads], -1)
        if self.routes.is_identity:
            return [xBC, dt], z
        # Copies: a scan along routes keeps its streams' sources for the backward (`regathered`), and views would keep
        # all of in_proj's output, z with it, which the gated norm then keeps a copy of.
        return [xBC.contiguous(), dt.contiguous()], z

    def mix(self, streams: list[Tensor], cache: Cache | None, cu_seqlens: Tensor | None) -> Tensor:
        batch, length = streams[0].shape[:2]
        xBC, dt = (packed(s, cu_seqlens) for s in streams)
        # SSD keeps x, B and C, views of the conv's output: kept as the conv's input instead, made again in the backward.
        # Without routes that input is a view of in_proj's output, kept whole anyway (z by the gated norm, below).
        xBC, kept_as_input = self.conv.made_again(xBC, cache, cu_seqlens, keep_view=True)
        x, B, C = xBC.split([self.inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        with kept_as_input:
            y = ops.ssd(
                x.unflatten(-1, (self.heads, self.head_dim)),
                dt,
                -self.A_log.float().exp(),
                B.unflatten(-1, (self.ngroups, self.d_state)),
                C.unflatten(-1, (self.ngroups, self.d_state)),
                D=self.D,
                dt_bias=self.dt_bias,
                dt_softplus=True,
                chunk_size=self.chunk_size,
                initial_states=cache.get("state") if cache is not None else None,
                return_final_states=cache is not None,
                mode=self.mode(x.shape[1]),
                backend=self.backend,
                cu_seqlens=cu_seqlens,
            )
        if cache is not None:
            y, cache["state"] = y
        return y.flatten(-2).view(batch, length, -1)

    def output(self, y: Tensor, z: Tensor) -> Tensor:
        # Without routes, z and the conv's input (views) keep all of in_proj's output: no copy of either is made.
        return self.norm.projected(self.out, y, z, keep_gate_view=self.routes.is_identity)
