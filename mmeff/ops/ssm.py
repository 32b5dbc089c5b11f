"""Mamba-2 SSD and Mamba-1 selective scan on the shared recurrence, with mamba-ssm's kernels on CUDA.

Both follow mamba-ssm's argument names and semantics (`mamba_chunk_scan_combined`,
`selective_scan_fn`). Mapping onto the core: state key = SSM state (B plays k, C plays q), value = x
scaled by dt, decay exp(dt * A) (scalar per head for SSD, per state channel for the selective scan,
whose D channels become heads with value dim 1), scale 1.

`backend` (mmeff.ops.dispatch): "auto" runs SSD on mmeff's Triton kernels when they cover the call, else on
mamba-ssm's, else PyTorch (measured in one process on an H100, the Mamba-2 LM of benchmarks/lm_train_speed.py trained
at 91.1 ms a step on mmeff's SSD against 134.2 on mamba-ssm's at T = 4k, 123.0 against 134.4 at 16k; on a second
H100 110.5 against 95.5 at 4k: both wait on the host, which differs between machines; lm_ssd_h100.md); the selective
scan takes mamba-ssm's kernel first. "mamba_ssm" and "triton" insist on theirs;
"torch" is PyTorch. `cu_seqlens` (int32 [N+1], batch 1) packs N sequences along T, states reset at each start,
initial and final states per sequence; mamba-ssm takes it for SSD as `seq_idx` (and `cu_seqlens` for
the final states), not for the selective scan, whose CUDA kernel has no variable-length form.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import dispatch
from mmeff.ops.dispatch import Backend, check_backend
from mmeff.ops.features import pointwise_unsupported
from mmeff.ops.gates import softplus_decay
from mmeff.ops.recompute import recomputed
from mmeff.ops.recurrence import Mode, check_cu_seqlens, run_recurrence, triton_check
from mmeff.ops.varlen import seq_idx_from_cu_seqlens

__all__ = ["check_backend", "selective_scan", "ssd"]

logger = dispatch.logger


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
    chunk_size: int = 64,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
    mode: Mode = "chunk",
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
    backend: Backend = "auto",
    cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Mamba-2 SSD as mamba_chunk_scan_combined: x [B,T,H,P], dt [B,T,H], A [H], B/C [B,T,G,N]; with
    cu_seqlens [N+1] (B = 1) initial_states and the final states are [N,H,P,N]."""
    heads, groups = x.shape[2], B.shape[2]
    if heads % groups or C.shape[2] != groups:
        raise ValueError(f"groups of B {tuple(B.shape)} / C {tuple(C.shape)} must divide heads {heads}")
    check_cu_seqlens(cu_seqlens, x.shape[0])

    @dispatch.once
    def decays() -> tuple[Tensor, Tensor]:
        return softplus_decay(dt, dt_bias, A.float(), dt_limit, dt_softplus)

    link: dict = {}  # the skip's backward leaves its dx to the scale's (mmeff.kernels.pointwise, on the Triton path)

    @dispatch.once
    def recurrence() -> dict:
        dtf, log_decay = decays()
        # q, k, v stay in x's dtype (the PyTorch path computes in fp32 anyway): fp32 would send 16-bit models to
        # the kernels' fp32 build, which for d_state 128 compiles for minutes and runs several times slower.
        return dict(
            q=C.to(x.dtype),  # each of the G shared by the heads of its group: the kernels read them in place
            k=B.to(x.dtype),
            v=_scaled(x, dtf, link),
            log_decay=log_decay,
            beta=None,
            initial_state=None if initial_states is None else initial_states.transpose(-1, -2),
            cu_seqlens=cu_seqlens,
            mode=mode,
        )

    def mamba() -> str:
        if mode != "chunk":
            return f"mode={mode!r} (its SSD is chunked)"
        if not dispatch.on_cuda(x):
            return "inputs not on CUDA"
        if torch.compiler.is_compiling():
            # Its backward reads its autotuner's best_config, which Dynamo cannot trace (fullgraph failed on the H200).
            return "torch.compile traces: mamba-ssm's backward is not traceable; mmeff's kernels run as a custom op"
        if cu_seqlens is not None and initial_states is not None:
            return "packed sequences with initial states (it starts only the first sequence from a given state)"
        if cu_seqlens is not None and return_final_states and dispatch.needs_grad(x, dt, A, B, C, D, z, dt_bias):
            return "final states of packed sequences with gradients (its varlen states have no backward)"
        return "" if _load_mamba_ssd() is not None else "mamba-ssm not importable"

    impl = dispatch.choose("ssd", backend, [("triton", lambda: triton_check(**recurrence())), ("mamba_ssm", mamba)])
    if impl == "mamba_ssm":
        packed = {}
        if cu_seqlens is not None:
            packed = dict(seq_idx=seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])[None])
            if return_final_states:  # mamba-ssm's per-sequence final states
                packed.update(cu_seqlens=cu_seqlens, return_varlen_states=True)
        return _load_mamba_ssd()(
            x,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            z=z,
            dt_bias=dt_bias,
            initial_states=initial_states,
            dt_softplus=dt_softplus,
            dt_limit=dt_limit,
            return_final_states=return_final_states and cu_seqlens is None,
            **packed,
        )
    args = recurrence()
    # The kernels' backward reads q, k and v again: v made again from x and dt (kept anyway), not kept itself; q and k
    # too where they are copies of C and B in another dtype.
    cast = functools.partial(Tensor.to, dtype=x.dtype)
    recipes = [(args[n], cast, (t,)) for n, t in (("q", C), ("k", B)) if args[n] is not t]
    recipes.append((args["v"], _scaled, (x, decays()[0])))
    with recomputed(recipes if impl == "triton" else ()):
        y, state = run_recurrence(impl, **args, scale=1.0, output_final_state=return_final_states, chunk_size=chunk_size)
    if D is not None and D.dim() == 1:
        D = D[:, None]
    out = _skip_and_gate(y, x, D, z, x.dtype, link)
    return (out, state.transpose(-1, -2).contiguous()) if return_final_states else out


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    initial_state: Optional[Tensor] = None,
    backend: Backend = "auto",
    cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Mamba-1 selective scan as selective_scan_fn: u/delta [B,D,T], A [D,N], B/C [D,N], [B,N,T] or [B,G,N,T];
    with cu_seqlens [N+1] (B = 1) initial_state and the last states are [N,D,N]."""
    if A.is_complex():
        raise NotImplementedError("selective_scan supports real A only")
    batch, dim, seqlen = u.shape
    check_cu_seqlens(cu_seqlens, batch)

    @dispatch.once
    def recurrence() -> dict:
        d = delta.float()
        if delta_bias is not None:
            d = d + delta_bias.float()[:, None]
        if delta_softplus:
            d = F.softplus(d)
        d = d.transpose(1, 2)  # [B,T,D]
        return dict(
            q=_scan_input(C, batch, dim, seqlen),
            k=_scan_input(B, batch, dim, seqlen),
            v=(d * u.float().transpose(1, 2))[..., None],
            log_decay=d[..., None] * A.float(),
            beta=None,
            initial_state=None if initial_state is None else initial_state[..., None],
            cu_seqlens=cu_seqlens,
            mode=mode,
        )

    def mamba() -> str:
        if mode != "chunk":
            return f"mode={mode!r} (its scan is chunked)"
        if not dispatch.on_cuda(u):
            return "inputs not on CUDA"
        if initial_state is not None:
            return "initial_state (selective_scan_fn takes none)"
        if cu_seqlens is not None:
            return "packed sequences (selective_scan_fn has no variable-length form)"
        return "" if _load_mamba_selective_scan() is not None else "mamba-ssm's CUDA selective scan not importable"

    impl = dispatch.choose(
        "selective_scan", backend, [("mamba_ssm", mamba), ("triton", lambda: triton_check(**recurrence()))]
    )
    if impl == "mamba_ssm":
        return _load_mamba_selective_scan()(
            u,
            delta,
            A,
            B,
            C,
            D=D,
            z=z,
            delta_bias=delta_bias,
            delta_softplus=delta_softplus,
            return_last_state=return_last_state,
        )
    y, state = run_recurrence(
        impl, **recurrence(), scale=1.0, output_final_state=return_last_state, chunk_size=chunk_size
    )
    out = _skip_and_gate(y[..., 0].transpose(1, 2), u, None if D is None else D[:, None], z, u.dtype)
    return (out, state[..., 0]) if return_last_state else out


def _scan_input(m: Tensor, batch: int, dim: int, seqlen: int) -> Tensor:
    """Selective-scan B or C ([D,N], [B,N,T] or [B,G,N,T]) as per-channel keys/queries [B,T,D,N]."""
    m = m.float()
    if m.dim() == 2:
        return m.expand(batch, seqlen, *m.shape)
    if m.dim() == 3:
        return m.transpose(1, 2)[:, :, None, :].expand(batch, seqlen, dim, m.shape[1])
    if dim % m.shape[1]:
        raise ValueError(f"groups {m.shape[1]} must divide channels {dim}")
    return m.permute(0, 3, 1, 2).repeat_interleave(dim // m.shape[1], dim=2)


def _per_head_unsupported(x: Tensor, *others: Tensor) -> str:
    """Why mmeff.kernels.pointwise's per-head maps (HeadScale, HeadSkip) cannot take x [..., H, P]; "" when they can."""
    heads, width = x.shape[-2:]
    if width & (width - 1) or (1 << (heads - 1).bit_length()) * width > 16384:
        return f"x {tuple(x.shape)}: head width not a power of two, or over 16384 elements a token"
    if any(t.dtype != torch.float32 for t in others):
        return f"dtypes {[t.dtype for t in others]} (dt, D in float32)"
    return pointwise_unsupported(x)


def _scaled(x: Tensor, dtf: Tensor, link: Optional[dict] = None) -> Tensor:
    """SSD's value x * dt [B,T,H,P] in x's dtype (promoted to fp32 in the product; autograd keeps x as it is); on CUDA
    one Triton kernel each way (mmeff.kernels.pointwise.HeadScale, bit for bit the plain ops' forward), `link` shared
    with the skip's of the same x."""
    if dispatch.choose("ssd_scale", "auto", [("triton", lambda: _per_head_unsupported(x, dtf))]) == "triton":
        return dispatch.triton_kernels("pointwise").HeadScale.apply(x, dtf, link)
    return (x * dtf[..., None]).to(x.dtype)


def _skip_and_gate(y: Tensor, x: Tensor, D: Optional[Tensor], z: Optional[Tensor], dtype: torch.dtype,
                   link: Optional[dict] = None) -> Tensor:  # fmt: skip
    """(y + D * x) * silu(z) in fp32, cast to the output dtype. x stays in its dtype: D * x promotes to fp32, and
    autograd keeps x instead of a fp32 copy (two such copies were 12 of the 40 KiB per token and layer that a
    mamba2-bi ViT kept, benchmarks/saved_memory.py)."""
    skip = D is not None and z is None and D.shape == (x.shape[-2], 1) and y.dtype == dtype and y.shape == x.shape
    if skip and dispatch.choose("ssd_skip", "auto", [("triton", lambda: _per_head_unsupported(x, D))]) == "triton":
        return dispatch.triton_kernels("pointwise").HeadSkip.apply(y, x, D.reshape(-1), link)  # one kernel each way
    if D is not None:
        y = y + x * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


@dispatch.preload
@dispatch.once
def _load_mamba_ssd() -> Optional[Callable]:
    """mamba-ssm's Triton mamba_chunk_scan_combined, or None."""
    placeholder = None
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        # PyPI mamba-ssm imports its CUDA extension in mamba_ssm/__init__ although the Triton SSD
        # kernels do not use it; a placeholder lets the import through.
        placeholder = sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as exc:  # a broken install fails in many ways (ImportError, OSError, RuntimeError)
        logger.info("mamba-ssm SSD kernel unavailable: %r", exc)
        return None
    finally:
        # Do not leave the fake module behind for others' `import selective_scan_cuda`.
        if placeholder is not None and sys.modules.get("selective_scan_cuda") is placeholder:
            del sys.modules["selective_scan_cuda"]
    return mamba_chunk_scan_combined


@dispatch.preload
@dispatch.once
def _load_mamba_selective_scan() -> Optional[Callable]:
    """mamba-ssm's CUDA selective_scan_fn if its real extension is present, or None."""
    try:
        import selective_scan_cuda

        if not hasattr(selective_scan_cuda, "fwd"):
            raise ImportError("selective_scan_cuda is a placeholder module")
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # see _load_mamba_ssd
        logger.info("mamba-ssm selective-scan kernel unavailable: %r", exc)
        return None
    return selective_scan_fn
