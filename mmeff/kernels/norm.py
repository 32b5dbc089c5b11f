"""Triton kernels of layer norm and RMS norm over the last dim (mmeff.ops.norm's reference semantics).

    y = (x - mean) * rstd * w + b    (layer norm; RMS norm: mean = 0, no b), rstd = 1 / sqrt(var + eps)

With `groups` > 1 the last dim holds `groups` slices of width N, each normalised on its own with its slice of
w and b (the per-head norm of the linear mixers). Statistics are fp32; y is written in the dtype asked for
(under autocast, the autocast dtype: the bf16 that the next matmul reads, where PyTorch's layer_norm writes
fp32 and the matmul casts it again). The backward recomputes x_hat from the saved mean and rstd and writes dx
plus per-program partial sums of dw and db, which the host adds up: no atomics, deterministic.

A residual r (x's shape) may be added first: s = x + r is written (in torch's dtype of the sum) and normalised, and
the backward adds the gradient s carries on to the norm's and writes it for x and, in r's dtype, for r (`AddNorm`,
a pre-norm layer's residual add).

L2 normalisation (the `l2` feature map of q and k: y = x / max(||x||, eps) over the last dim) has its own pair of
kernels below: it keeps y and the norms for its backward, dx = (dy - y <dy, y>) / max(||x||, eps).

An optional swish gate z (same shape as x) is fused in: norm(x) * silu(z) (GATE_AFTER, the gated output norm of
GLA, RetNet, Gated DeltaNet) or norm(x * silu(z)) (GATE_BEFORE, Mamba-2's gated RMSNorm). The backward recomputes
silu(z) and the gated input, so a gated norm keeps x and z only, and writes dz beside dx.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmeff.kernels.launch import jit
from mmeff.kernels.utils import cdiv, empty, last_dim_contiguous, next_pow2, rows_of, sm_count

ROWS = 16  # most rows per forward program (a [ROWS, N] tile of at most 4,096 values)
# Gate modes (constexpr GATE): none, norm(x) * silu(z), norm(x * silu(z)).
NO_GATE, GATE_AFTER, GATE_BEFORE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
MAX_WIDTH = 16384  # one row is one register tile


def _warps(width: int) -> int:
    return 1 if width <= 256 else 2 if width <= 1024 else 4 if width <= 4096 else 8


@triton.jit
def _gate_offsets(rows, cols, N, G, SZ):
    """Offsets in the gate z of columns `cols` of normalised rows `rows` (G of N a token row, token rows SZ apart)."""
    return ((rows // G) * SZ + (rows % G) * N)[:, None] + cols[None, :]


@jit
def _norm_fwd_kernel(x, r, s, z, w, b, y, mean, rstd, M, N, G, SZ, eps, RMS: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, GATE: tl.constexpr, HAS_R: tl.constexpr, BR: tl.constexpr,
                     BN: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BN)
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    off = rows[:, None] * N + cols[None, :]
    xv = tl.load(x + off, mask=inside, other=0.0).to(tl.float32)
    if HAS_R:  # s = x + r in s's dtype (as torch adds them), normalised as stored
        sv = (xv + tl.load(r + off, mask=inside, other=0.0).to(tl.float32)).to(s.dtype.element_ty)
        tl.store(s + off, sv, mask=inside)
        xv = sv.to(tl.float32)
    if GATE != NO_GATE:
        zv = tl.load(z + _gate_offsets(rows, cols, N, G, SZ), mask=inside, other=0.0).to(tl.float32)
        silu = zv * tl.sigmoid(zv)
    if GATE == GATE_BEFORE:
        xv *= silu
    if RMS:
        xc = xv
    else:
        mu = tl.sum(xv, axis=1) / N
        xc = tl.where(inside, xv - mu[:, None], 0.0)
        tl.store(mean + rows, mu, mask=rows < M)
    r = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(rstd + rows, r, mask=rows < M)
    out = xc * r[:, None]
    woff = (rows % G)[:, None] * N + cols[None, :]
    if HAS_W:
        out *= tl.load(w + woff, mask=inside, other=0.0).to(tl.float32)
    if HAS_B:
        out += tl.load(b + woff, mask=inside, other=0.0).to(tl.float32)
    if GATE == GATE_AFTER:
        out *= silu
    tl.store(y + off, out.to(y.dtype.element_ty), mask=inside)


@jit
def _norm_bwd_kernel(x, z, w, b, dy, ds, mean, rstd, dx, dr, dz, dw_part, db_part, M, N, G, SZ, rows_per_program,
                     RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, GATE: tl.constexpr,
                     HAS_DS: tl.constexpr, HAS_DR: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    # Program p takes the rows of group p % G among rows [start, start + rows_per_program * G), BR at a time,
    # keeping that group's dw and db partial sums in registers.
    pid = tl.program_id(0)
    g = pid % G
    start = (pid // G).to(tl.int64) * rows_per_program * G + g
    cols = tl.arange(0, BN)
    inside = (cols < N)[None, :]
    if HAS_W:
        wv = tl.load(w + g * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GATE == GATE_AFTER and HAS_B:
        bv = tl.load(b + g * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([BN], dtype=tl.float32)
    db_acc = tl.zeros([BN], dtype=tl.float32)
    for i in range(0, rows_per_program, BR):
        idx = i + tl.arange(0, BR)
        row = start + idx * G
        ok = (idx < rows_per_program) & (row < M)
        keep = ok[:, None] & inside
        off = row[:, None] * N + cols[None, :]
        xv = tl.load(x + off, mask=keep, other=0.0).to(tl.float32)
        dyv = tl.load(dy + off, mask=keep, other=0.0).to(tl.float32)
        if GATE != NO_GATE:
            zv = tl.load(z + _gate_offsets(row, cols, N, G, SZ), mask=keep, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            silu = zv * sig
            dsilu = sig * (1.0 + zv * (1.0 - sig))
        if GATE == GATE_BEFORE:
            x_in = xv
            xv *= silu
        r = tl.load(rstd + row, mask=ok, other=0.0)[:, None]
        if RMS:
            xhat = xv * r
        else:
            xhat = tl.where(keep, (xv - tl.load(mean + row, mask=ok, other=0.0)[:, None]) * r, 0.0)
        if GATE == GATE_AFTER:  # y = n * silu(z), n = xhat * w + b
            n = xhat
            if HAS_W:
                n = n * wv
            if HAS_B:
                n += bv
            tl.store(dz + off, (dyv * n * dsilu).to(dz.dtype.element_ty), mask=keep)
            dyv *= silu
        if HAS_W:
            dw_acc += tl.sum(dyv * xhat, axis=0)
            wdy = dyv * wv
        else:
            wdy = dyv
        if HAS_B:
            db_acc += tl.sum(dyv, axis=0)
        c1 = tl.sum(xhat * wdy, axis=1)[:, None] / N
        if RMS:
            dxv = (wdy - xhat * c1) * r
        else:
            dxv = (wdy - xhat * c1 - tl.sum(wdy, axis=1)[:, None] / N) * r
        if GATE == GATE_BEFORE:  # x_in * silu(z) was normalised
            tl.store(dz + off, (dxv * x_in * dsilu).to(dz.dtype.element_ty), mask=keep)
            dxv *= silu
        if HAS_DS:  # the gradient the residual stream x carries past the norm
            dxv += tl.load(ds + off, mask=keep, other=0.0).to(tl.float32)
        tl.store(dx + off, dxv.to(dx.dtype.element_ty), mask=keep)
        if HAS_DR:  # the residual branch's gradient, in its own dtype
            tl.store(dr + off, dxv.to(dr.dtype.element_ty), mask=keep)
    if HAS_W:
        tl.store(dw_part + pid * N + cols, dw_acc, mask=cols < N)
    if HAS_B:
        tl.store(db_part + pid * N + cols, db_acc, mask=cols < N)


def unsupported(x: Tensor, width: int) -> str:
    """Why the kernels cannot take `x` normalised over slices of `width`; "" when they can."""
    if width > MAX_WIDTH:
        return f"normalised width {width} > {MAX_WIDTH}"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {x.dtype}"
    return ""


def norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool, groups: int,
             out_dtype: torch.dtype, z: Optional[Tensor] = None, gate: int = 0,
             r: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """x [M, G * N] contiguous (and the gate z, its shape, rows one stride apart, if `gate`; a residual r, its shape,
    contiguous, added to x first) ->
    (y [M, G * N] in out_dtype, mean [M * G] fp32 (empty for RMS), rstd [M * G] fp32, the normalised input: x, or
    x + r in torch's dtype of that sum)."""
    width = x.shape[-1] // groups
    rows = x.numel() // width
    y = empty(x.shape, out_dtype, x.device)
    mean = empty((0 if rms else rows,), torch.float32, x.device)
    rstd = empty((rows,), torch.float32, x.device)
    s = x if r is None else empty(x.shape, torch.result_type(x, r), x.device)
    zr = None if z is None else rows_of(z)  # the gate's token rows, one stride apart (z itself where they are)
    BN = next_pow2(width)
    BR = max(1, min(ROWS, 4096 // BN))
    _norm_fwd_kernel[(cdiv(rows, BR),)](
        x, r, s, zr, weight, bias, y, mean, rstd, rows, width, groups, 0 if zr is None else zr.stride(0), eps, RMS=rms, HAS_W=weight is not None,
        HAS_B=bias is not None, GATE=gate, HAS_R=r is not None, BR=BR, BN=BN, num_warps=_warps(BR * BN),
    )  # fmt: skip
    return y, mean, rstd, s


def norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
             rms: bool, groups: int, z: Optional[Tensor] = None, gate: int = 0, ds: Optional[Tensor] = None,
             r_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """Gradients of x (x's dtype; plus `ds`, a gradient x has besides the norm's), weight and bias (fp32 sums, cast
    to their dtypes), of the gate z (z's dtype, None without a gate) and, given the dtype of a residual added into
    x, of that residual (dx itself where the dtypes match, else written beside it; None without) from dy [M, G * N]."""
    width = x.shape[-1] // groups
    rows = x.numel() // width
    # About 8 programs per SM, each at least 32 rows: enough to hide latency, few partial sums to add.
    programs = max(1, min(8 * sm_count(x.device), cdiv(rows, 32)))
    chunks = max(1, cdiv(programs, groups))
    per_program = cdiv(cdiv(rows, groups), chunks)
    grid = chunks * groups
    dx = empty(x.shape, x.dtype, x.device)
    dr = empty(x.shape, r_dtype, x.device) if r_dtype not in (None, x.dtype) else None
    dz = empty(z.shape, z.dtype, z.device) if gate else None  # contiguous, as x
    # The weight's and the bias's partial sums in one buffer: one reduction launch for both.
    parts = empty(((weight is not None) + (bias is not None), grid, width), torch.float32, x.device)
    dw_part = parts[0] if weight is not None else None
    db_part = parts[-1] if bias is not None else None
    BN = next_pow2(width)
    # Tiles and warps from sweeps on the H200 (kernel time a call): rows up to 512 wide on 2 warps. ViT-S's layer norm
    # (50k tokens of 384, x fp32, dy bf16) 191 -> 58 us from 4 warps; RetNet's gated group norm at the LM size (16k
    # tokens, 16 heads of 128, bf16) 198 -> 129 us on [8, 128] tiles from [16, 128] and 4 warps, GLA's (8 heads)
    # 70 -> 60 us. The LM's RMS norm (16k tokens of 1024) was fastest as it was, [2, 1024] on 4 warps (48 us).
    BR = max(1, min(16, (1024 if BN <= 128 else 2048) // BN))
    zr = None if z is None else rows_of(z)
    _norm_bwd_kernel[(grid,)](
        x, zr, weight, bias, dy, ds, mean, rstd, dx, dr, dz, dw_part, db_part, rows, width, groups,
        0 if zr is None else zr.stride(0), per_program,
        RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, GATE=gate, HAS_DS=ds is not None,
        HAS_DR=dr is not None, BR=BR, BN=BN, num_warps=2 if BN <= 512 else _warps(BR * BN),
    )  # fmt: skip
    # Program p wrote group p % G's partial sums: [chunks, G, N] summed over chunks is [G * N], w's layout.
    sums = parts.view(len(parts), chunks, -1).sum(1) if len(parts) else parts
    dw = sums[0].to(weight.dtype) if weight is not None else None
    db = sums[-1].to(bias.dtype) if bias is not None else None
    return dx, dw, db, dz, dx if r_dtype == x.dtype else dr


@jit
def _l2_fwd_kernel(x, y, norm, M, H, N, sxm, sxh, eps, BR: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BN)
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    src = ((rows // H) * sxm + (rows % H) * sxh)[:, None] + cols[None, :]
    xv = tl.load(x + src, mask=inside, other=0.0).to(tl.float32)
    n = tl.sqrt(tl.sum(xv * xv, axis=1))
    tl.store(norm + rows, n, mask=rows < M)
    tl.store(y + rows[:, None] * N + cols[None, :], (xv / tl.maximum(n, eps)[:, None]).to(y.dtype.element_ty), mask=inside)


@jit
def _l2_bwd_kernel(y, dy, norm, dx, M, N, eps, BR: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BN)
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    off = rows[:, None] * N + cols[None, :]
    yv = tl.load(y + off, mask=inside, other=0.0).to(tl.float32)
    dyv = tl.load(dy + off, mask=inside, other=0.0).to(tl.float32)
    n = tl.load(norm + rows, mask=rows < M, other=1.0)
    along = tl.where(n > eps, tl.sum(yv * dyv, axis=1), 0.0)  # below eps the divisor is the constant eps
    tl.store(dx + off, ((dyv - yv * along[:, None]) / tl.maximum(n, eps)[:, None]).to(dx.dtype.element_ty), mask=inside)


def _l2_tiles(width: int) -> tuple[int, int]:
    BN = next_pow2(width)
    return max(1, min(ROWS, 4096 // BN)), BN


class L2Normalize(torch.autograd.Function):
    """x / max(||x||, eps) over the last dim (fp32 inside), in x's dtype: one kernel each way, y and the norms kept for
    the backward (mmeff.ops.features' `l2` semantics). x [..., H, N] is read through its strides where its leading
    dims merge (a slice of a fused stream is not copied)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        width = x.shape[-1]
        x2 = last_dim_contiguous(x if x.dim() > 1 else x[None])
        try:
            x3 = x2.view(-1, *x2.shape[-2:])
        except RuntimeError:  # leading dims that do not merge into one stride
            x3 = x2.contiguous().view(-1, *x2.shape[-2:])
        rows = x3.shape[0] * x3.shape[1]
        y = empty(x.shape, x.dtype, x.device)
        norm = empty((rows,), torch.float32, x.device)
        BR, BN = _l2_tiles(width)
        if rows:
            _l2_fwd_kernel[(cdiv(rows, BR),)](
                x3, y, norm, rows, x3.shape[1], width, x3.stride(0), x3.stride(1), eps, BR=BR, BN=BN,
                num_warps=_warps(BR * BN),
            )  # fmt: skip
        ctx.save_for_backward(y, norm)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        y, norm = ctx.saved_tensors
        dy = dy.contiguous()
        dx = empty(y.shape, dy.dtype, dy.device)
        BR, BN = _l2_tiles(y.shape[-1])
        if norm.numel():
            _l2_bwd_kernel[(cdiv(norm.numel(), BR),)](
                y, dy, norm, dx, norm.numel(), y.shape[-1], ctx.eps, BR=BR, BN=BN, num_warps=_warps(BR * BN)
            )  # fmt: skip
        return dx, None


class Norm(torch.autograd.Function):
    """Layer / RMS norm over the last dim of x (in `groups` slices), y in `out_dtype`, optionally gated by silu(z)
    (`gate`: GATE_AFTER or GATE_BEFORE, z of x's shape); the kernels above."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool,  # type: ignore[override]
                groups: int, out_dtype: torch.dtype, z: Optional[Tensor] = None, gate: int = 0) -> Tensor:  # fmt: skip
        x2 = x.contiguous()
        # The gate is read (and kept) in place where its rows are one stride apart (mmeff.blocks.scan.GroupedNorm
        # .projected decides whether a view of a wider tensor may be kept).
        z2 = rows_of(z).view(z.shape) if gate else None
        y, mean, rstd, _ = norm_fwd(x2, weight, bias, eps, rms, groups, out_dtype, z2, gate)
        ctx.save_for_backward(x2, weight, bias, mean, rstd, z2)
        ctx.rms, ctx.groups, ctx.gate = rms, groups, gate
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, weight, bias, mean, rstd, z = ctx.saved_tensors
        dx, dw, db, dz, _ = norm_bwd(dy.contiguous(), x, weight, bias, mean, rstd, ctx.rms, ctx.groups, z, ctx.gate)
        return dx, dw, db, None, None, None, None, dz, None


class AddNorm(torch.autograd.Function):
    """(s, y) = (x + r, norm(x + r)) over the last dim, y in `out_dtype`: a residual add and the pre-norm after it in
    one kernel each way. The backward adds the gradient s carries on (the residual stream's) to the norm's and
    writes it for x and, in r's dtype, for r: no separate add, gradient sum or cast."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,  # type: ignore[override]
                rms: bool, out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:  # fmt: skip
        y, mean, rstd, s = norm_fwd(x.contiguous(), weight, bias, eps, rms, 1, out_dtype, r=r.contiguous())
        ctx.save_for_backward(s, weight, bias, mean, rstd)
        ctx.rms, ctx.dtypes = rms, (x.dtype, r.dtype)
        ctx.set_materialize_grads(False)
        return s, y

    @staticmethod
    def backward(ctx, ds: Optional[Tensor], dy: Optional[Tensor]):  # type: ignore[override]
        s, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the sum was used
            return ds.to(ctx.dtypes[0]), ds.to(ctx.dtypes[1]), None, None, None, None, None
        ds = None if ds is None else ds.contiguous()
        dx, dw, db, _, dr = norm_bwd(dy.contiguous(), s, weight, bias, mean, rstd, ctx.rms, 1, ds=ds, r_dtype=ctx.dtypes[1])
        return dx.to(ctx.dtypes[0]), dr, dw, db, None, None, None
