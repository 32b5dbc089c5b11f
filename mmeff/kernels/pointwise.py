"""Triton kernels of the pointwise maps on the recurrent mixers' inputs (mmeff.ops.gates and mmeff.ops.features):

    log-sigmoid gate   y = logsigmoid(x) / n     (fp32)         dx = dy * (1 - exp(n y)) / n   (x's dtype)
    elu + 1            y = elu(x) + 1            (x's dtype)    dx = dy * min(y, 1)            (dy's dtype)
    scaled sigmoid     y = n sigmoid(x)          (fp32)         dx = dy * y * (1 - y / n)      (x's dtype)

The backwards read the output only, which the recurrence keeps anyway. One kernel each way, over the flat elements
(the forward reads rows of a wider tensor in place: a bidirectional mixer's q and k, one slice of its qkv output);
PyTorch's are three launches forward and six backward for the gate, two and two for elu + 1 and for the sigmoid.

Mamba's time step and log decay per head (`Decay`: Mamba-2's and Gated DeltaNet's), from x [N, H] read through its
row stride, a bias b [H] and A [H] (< 0):

    dt = clamp(softplus(x + b), lo, hi)   (fp32; softplus as torch's: x past 20 stays x)      log_decay = A dt (fp32)

in one kernel each way, where PyTorch launched 5 forward and 10 backward (the clamp's mask alone 5). The backward
reads x again (the forward keeps x, b and A only; x's own copy, written by the forward, where x is a slice of a wider
tensor), writes dx and per-program partial sums of db and dA.

Mamba-2's SSD around its recurrence, per head h of x [N, H, P] (x read through its token stride: a slice of the short
conv's output), dt [N, H] and D [H] fp32 (`HeadScale`, `HeadSkip`):

    v = x dt                 (x's dtype; fp32 product)     dx = dv dt (x's dtype), ddt = sum_p dv x (fp32)
    out = y + D x            (y's dtype; fp32 sum)         dy = dout, dx = D dout (x's dtype), dD = sum dout x

one kernel each way (the skip's backward adds the sum of its per-program partials of dD), where PyTorch launched 2
forward and 5 backward for v (fp32 copies of dv and dx between them) and 3 forward and 6 backward for the skip. The
two of one x share a `link` (a dict): the skip's backward then leaves its dx to the scale's, which adds D dout to
dv dt in the same pass. Autograd otherwise held the skip's dx, [N, H, P], through the whole recurrence backward
between them, waiting for the other term (mamba2-bi's step peak, benchmarks/saved_memory.py --peak); dout is alive
there anyway, as the recurrence backward's input.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton.language as tl
from torch import Tensor

from mmeff.kernels.launch import jit
from mmeff.kernels.utils import cdiv, empty, next_pow2, rows_of

BLOCK = 2048
LOG_SIGMOID, ELU_PLUS_ONE, SIGMOID = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
ROWS = 64  # rows of a Decay program


@jit
def _fwd_kernel(x, y, n, width, sx, scale, MAP: tl.constexpr, STRIDED: tl.constexpr, BLOCK: tl.constexpr):
    # x: rows of `width` elements `sx` apart (STRIDED: a slice of a wider tensor, read in place), else contiguous.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    at = (i // width) * sx + i % width if STRIDED else i
    v = tl.load(x + at, mask=inside, other=0.0).to(tl.float32)
    if MAP == LOG_SIGMOID:
        out = (tl.minimum(v, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(v)))) / scale
    elif MAP == SIGMOID:
        out = scale * tl.sigmoid(v)
    else:
        out = tl.where(v > 0, v + 1.0, tl.exp(v))
    tl.store(y + i, out.to(y.dtype.element_ty), mask=inside)


@jit
def _bwd_kernel(y, dy, dx, n, scale, MAP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    v = tl.load(y + i, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(dy + i, mask=inside, other=0.0).to(tl.float32)
    if MAP == LOG_SIGMOID:
        out = g * (1.0 - tl.exp(v * scale)) / scale
    elif MAP == SIGMOID:
        out = g * v * (1.0 - v / scale)
    else:
        out = g * tl.minimum(v, 1.0)
    tl.store(dx + i, out.to(dx.dtype.element_ty), mask=inside)


def _rows(x: Tensor) -> Optional[Tensor]:
    """x as [rows, width] with width its longest trailing contiguous run and one stride between rows (a view), or
    None where x has no such view."""
    width = 1
    for size, stride in zip(reversed(x.shape), reversed(x.stride())):
        if stride != width and size != 1:
            break
        width *= size
    try:
        return x.view(-1, width) if x.numel() else None
    except RuntimeError:
        return None


class Pointwise(torch.autograd.Function):
    """y = map(x) (`kind` LOG_SIGMOID or SIGMOID with `scale` n, in `out_dtype`; or ELU_PLUS_ONE) and its gradient
    from y."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: int, scale: float, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        rows = _rows(x)  # a slice of a projection's output (q and k together) read in place, not copied first
        if rows is None:
            x = x.contiguous()
            rows = x.view(1, -1)
        y = empty(x.shape, out_dtype, x.device)
        if n := x.numel():
            _fwd_kernel[(cdiv(n, BLOCK),)](rows, y, n, rows.shape[1], rows.stride(0), scale, MAP=kind,
                                           STRIDED=not x.is_contiguous(), BLOCK=BLOCK)  # fmt: skip
        ctx.save_for_backward(y)
        ctx.kind, ctx.scale, ctx.x_dtype = kind, scale, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = empty(y.shape, dy.dtype if ctx.kind == ELU_PLUS_ONE.value else ctx.x_dtype, y.device)
        if n := y.numel():
            _bwd_kernel[(cdiv(n, BLOCK),)](y, dy, dx, n, ctx.scale, MAP=ctx.kind, BLOCK=BLOCK)
        return dx, None, None, None


@jit
def _decay_fwd_kernel(x, b, A, dt, log_decay, kept, N, H, sx, lo, hi, HAS_B: tl.constexpr, SOFTPLUS: tl.constexpr,
                      CLAMP: tl.constexpr, KEEP: tl.constexpr, A_LOG: tl.constexpr, BR: tl.constexpr,
                      BH: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BH)
    inside = (rows < N)[:, None] & (cols < H)[None, :]
    raw = tl.load(x + rows[:, None] * sx + cols[None, :], mask=inside, other=0.0)
    if KEEP:  # x's own copy for the backward
        tl.store(kept + rows[:, None] * H + cols[None, :], raw, mask=inside)
    v = raw.to(tl.float32)
    if HAS_B:
        v += tl.load(b + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        v = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(v)))
    if CLAMP:
        v = tl.minimum(tl.maximum(v, lo), hi)
    a = tl.load(A + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    if A_LOG:  # A given as Mamba's A_log
        a = -tl.exp(a)
    off = rows[:, None] * H + cols[None, :]
    tl.store(dt + off, v, mask=inside)
    tl.store(log_decay + off, v * a, mask=inside)


@jit
def _decay_bwd_kernel(x, b, A, ddt, dlog, dx, db_part, dA_part, N, H, sx, lo, hi, HAS_B: tl.constexpr,
                      SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, HAS_DDT: tl.constexpr, HAS_DLOG: tl.constexpr,
                      A_LOG: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BH)
    inside = (rows < N)[:, None] & (cols < H)[None, :]
    u = tl.load(x + rows[:, None] * sx + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_B:
        u += tl.load(b + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    v = u
    if SOFTPLUS:
        v = tl.where(u > 20.0, u, tl.log(1.0 + tl.exp(u)))
    a1 = tl.load(A + cols, mask=cols < H, other=0.0).to(tl.float32)
    if A_LOG:  # A = -exp(A_log), whose derivative is A itself
        a1 = -tl.exp(a1)
    a = a1[None, :]
    off = rows[:, None] * H + cols[None, :]
    g = tl.zeros([BR, BH], dtype=tl.float32)
    if HAS_DDT:
        g += tl.load(ddt + off, mask=inside, other=0.0).to(tl.float32)
    if HAS_DLOG:
        gl = tl.load(dlog + off, mask=inside, other=0.0).to(tl.float32)
        g += gl * a
    if CLAMP:  # torch's clamp passes the gradient where lo <= v <= hi
        g = tl.where((v >= lo) & (v <= hi), g, 0.0)
        v = tl.minimum(tl.maximum(v, lo), hi)
    if HAS_DLOG:
        dA = tl.sum(gl * v, 0)
        if A_LOG:
            dA = dA * a1
        tl.store(dA_part + pid * H + cols, dA, mask=cols < H)
    if SOFTPLUS:
        g = tl.where(u > 20.0, g, g * tl.sigmoid(u))
    tl.store(dx + rows[:, None] * H + cols[None, :], g.to(dx.dtype.element_ty), mask=inside)
    if HAS_B:
        tl.store(db_part + pid * H + cols, tl.sum(g, 0), mask=cols < H)


class Decay(torch.autograd.Function):
    """(dt, A dt) with dt = clamp(softplus(x + b), lo, hi), both fp32 [..., H] (see the module's docstring); b may be
    None, softplus and the clamp off (`clamp` False: no clamp, as where softplus cannot leave [lo, hi]); `A_log`: A
    is given as Mamba's A_log, the kernels take A = -exp(A_log) (and its gradient) themselves."""

    @staticmethod
    def forward(ctx, x: Tensor, b: Optional[Tensor], A: Tensor, lo: float, hi: float, softplus: bool,  # type: ignore[override]
                clamp: bool, A_log: bool = False) -> Tuple[Tensor, Tensor]:  # fmt: skip
        flat = x.reshape(-1, x.shape[-1])
        flat = flat if flat.stride(-1) == 1 else flat.contiguous()
        n, h = flat.shape
        dt = empty(x.shape, torch.float32, x.device)
        log_decay = empty(x.shape, torch.float32, x.device)
        # A slice of a wider tensor (Mamba-2's dt, of its in_proj output) would keep all of that alive for the
        # backward (8.3 KiB per token and layer of the Mamba-2 LM, benchmarks/saved_memory.py): the kernel writes x's
        # own copy, kept instead.
        own = x.is_contiguous() and x.untyped_storage().nbytes() == x.numel() * x.element_size()
        kept = x if own else empty(x.shape, x.dtype, x.device)
        if n:
            _decay_fwd_kernel[(cdiv(n, ROWS),)](flat, b, A, dt, log_decay, kept, n, h, flat.stride(0), lo, hi,
                                                HAS_B=b is not None, SOFTPLUS=softplus, CLAMP=clamp, KEEP=not own,
                                                A_LOG=A_log, BR=ROWS, BH=next_pow2(h))  # fmt: skip
        ctx.save_for_backward(kept, b, A)
        ctx.options = (lo, hi, softplus, clamp, A_log)
        ctx.set_materialize_grads(False)
        return dt, log_decay

    @staticmethod
    def backward(ctx, ddt: Optional[Tensor], dlog: Optional[Tensor]):  # type: ignore[override]
        x, b, A = ctx.saved_tensors
        lo, hi, softplus, clamp, A_log = ctx.options
        flat = x.reshape(-1, x.shape[-1])
        n, h = flat.shape
        programs = cdiv(n, ROWS)
        dx = empty(x.shape, x.dtype, x.device)
        db_part = empty((programs, h), torch.float32, x.device) if b is not None else None
        dA_part = empty((programs, h), torch.float32, x.device) if dlog is not None else None
        if n:
            _decay_bwd_kernel[(programs,)](
                flat, b, A, None if ddt is None else ddt.contiguous(), None if dlog is None else dlog.contiguous(), dx, db_part,
                dA_part, n, h, flat.stride(0), lo, hi, HAS_B=b is not None, SOFTPLUS=softplus, CLAMP=clamp,
                HAS_DDT=ddt is not None, HAS_DLOG=dlog is not None, A_LOG=A_log, BR=ROWS, BH=next_pow2(h),
            )  # fmt: skip
        db = None if b is None else db_part.sum(0).to(b.dtype)
        dA = None if dlog is None else dA_part.sum(0).to(A.dtype)
        return dx, db, dA, None, None, None, None, None


HEAD_TILE = 4096  # elements of a HeadScale / HeadSkip program: tokens x (heads x head width)


@jit
def _head_fwd_kernel(x, w, y, out, N, H, P, sx, SKIP: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
                     BP: tl.constexpr):  # fmt: skip
    # SKIP: out = y + w[h] x (w = D [H]), else out = w[n, h] x (w = dt [N, H]); x rows `sx` apart, the rest contiguous.
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BH * BP)
    inside = (rows < N)[:, None] & (cols < H * P)[None, :]
    v = tl.load(x + rows[:, None] * sx + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    head = cols // BP
    off = rows[:, None] * (H * P) + cols[None, :]
    if SKIP:
        d = tl.load(w + head, mask=cols < H * P, other=0.0)[None, :]
        v = tl.load(y + off, mask=inside, other=0.0).to(tl.float32) + d * v
    else:
        v = v * tl.load(w + rows[:, None] * H + head[None, :], mask=inside, other=0.0)
    tl.store(out + off, v.to(out.dtype.element_ty), mask=inside)


@jit
def _head_bwd_kernel(x, w, dout, dx, dw, skip_dout, d, N, H, P, sx, SKIP: tl.constexpr, DX: tl.constexpr,
                     ADD: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    # dx = w dout (DX false: none), ADD: plus d[h] skip_dout (the skip's term for the same x); SKIP: dw [programs, H]
    # partial sums of dout x over the program's tokens, else dw [N, H] = sum_p.
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BH * BP)
    inside = (rows < N)[:, None] & (cols < H * P)[None, :]
    v = tl.load(x + rows[:, None] * sx + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    off = rows[:, None] * (H * P) + cols[None, :]
    g = tl.load(dout + off, mask=inside, other=0.0).to(tl.float32)
    head = cols // BP
    if SKIP:
        scale = tl.load(w + head, mask=cols < H * P, other=0.0)[None, :]
    else:
        scale = tl.load(w + rows[:, None] * H + head[None, :], mask=inside, other=0.0)
    if DX:
        gx = g * scale
        if ADD:
            skip = tl.load(skip_dout + off, mask=inside, other=0.0).to(tl.float32)
            gx += tl.load(d + head, mask=cols < H * P, other=0.0)[None, :] * skip
        tl.store(dx + off, gx.to(dx.dtype.element_ty), mask=inside)
    per_head = tl.sum(tl.reshape(g * v, (BT, BH, BP)), 2)  # [BT, BH]
    heads = tl.arange(0, BH)
    if SKIP:
        tl.store(dw + pid * H + heads, tl.sum(per_head, 0), mask=heads < H)
    else:
        tl.store(dw + rows[:, None] * H + heads[None, :], per_head, mask=(rows < N)[:, None] & (heads < H)[None, :])


def _head_tiling(x: Tensor) -> tuple[Tensor, int, int]:
    """x [..., H, P] (P a power of two) as [N, H * P] rows (read in place where its heads and head channels are
    contiguous, else copied), the tokens a program takes and the programs."""
    heads, width = x.shape[-2:]
    rows = rows_of(x.reshape(*x.shape[:-2], heads * width))
    tokens = max(1, HEAD_TILE // (next_pow2(heads) * width))
    return rows, tokens, cdiv(rows.shape[0], tokens)


def _head_launch(kernel: Callable, x: Tensor, *tensors: Optional[Tensor], skip: bool, **flags: bool) -> None:
    """Launch a head kernel over x's [N, H, P] with the tensors between x and the sizes (`flags`: the backward's DX
    and ADD)."""
    rows, tokens, programs = _head_tiling(x)
    heads, width = x.shape[-2:]
    if programs:
        kernel[(programs,)](rows, *tensors, rows.shape[0], heads, width, rows.stride(0), SKIP=skip, **flags, BT=tokens,
                            BH=next_pow2(heads), BP=width)  # fmt: skip


class HeadScale(torch.autograd.Function):
    """v = x dt per head (x [..., H, P], dt [..., H] fp32; v in x's dtype) and its gradients (see the docstring);
    `link` (a dict or None) shared with the HeadSkip of the same x, whose term of dx this backward then adds."""

    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, link: Optional[dict] = None) -> Tensor:  # type: ignore[override]
        dt = dt.contiguous()
        v = empty(x.shape, x.dtype, x.device)
        _head_launch(_head_fwd_kernel, x, dt, None, v, skip=False)
        ctx.save_for_backward(x, dt)
        ctx.link = link
        if link is not None and ctx.needs_input_grad[0]:
            link["armed"] = True  # a backward that makes dx will run after the skip's
        return v

    @staticmethod
    def backward(ctx, dv: Tensor):  # type: ignore[override]
        x, dt = ctx.saved_tensors
        link = ctx.link if ctx.link is not None else {}
        skip_dout, D = link.pop("dout", None), link.pop("D", None)
        dx = empty(x.shape, x.dtype, x.device)
        ddt = empty(dt.shape, torch.float32, x.device)
        _head_launch(_head_bwd_kernel, x, dt, dv.contiguous(), dx, ddt, skip_dout, D, skip=False, DX=True,
                     ADD=skip_dout is not None)  # fmt: skip
        return dx, ddt, None


class HeadSkip(torch.autograd.Function):
    """out = y + D x per head (y [..., H, P] contiguous, x [..., H, P], D [H] fp32; out in y's dtype) and its
    gradients (see the docstring); with the `link` of x's HeadScale, dx is left to that one's backward."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, D: Tensor, link: Optional[dict] = None) -> Tensor:  # type: ignore[override]
        out = empty(y.shape, y.dtype, y.device)
        _head_launch(_head_fwd_kernel, x, D, y.contiguous(), out, skip=True)
        ctx.save_for_backward(x, D)
        ctx.y_dtype, ctx.link = y.dtype, link
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        x, D = ctx.saved_tensors
        dout = dout.contiguous()
        left = ctx.link is not None and ctx.link.get("armed", False) and ctx.needs_input_grad[1]
        dx = None if left else empty(x.shape, x.dtype, x.device)
        parts = empty((_head_tiling(x)[2], x.shape[-2]), torch.float32, x.device)
        _head_launch(_head_bwd_kernel, x, D, dout, dx, parts, None, None, skip=True, DX=not left, ADD=False)
        if left:
            ctx.link.update(dout=dout, D=D)
        return dout.to(ctx.y_dtype), dx, parts.sum(0).to(D.dtype), None
