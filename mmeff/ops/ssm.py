"""Mamba-2 SSD and Mamba-1 selective scan on the shared recurrence, with mamba-ssm's kernels on CUDA.

Both follow mamba-ssm's argument names and semantics (`mamba_chunk_scan_combined`,
`selective_scan_fn`). Mapping onto the core: state key = SSM state (B plays k, C plays q), value = x
scaled by dt, decay exp(dt * A) (scalar per head for SSD, per state channel for the selective scan,
whose D channels become heads with value dim 1), scale 1.

Backend: "auto" runs mamba-ssm when the inputs are on CUDA, mode is "chunk" and mamba-ssm imports,
else mmeff's own path; "torch" always runs mmeff's path; "mamba_ssm" insists on mamba-ssm.
MMEFF_FORCE_REFERENCE=1 in the environment makes "auto" behave as "torch".
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from typing import Callable, Literal, Optional, Tuple, Union, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops.fastpath import force_reference
from mmeff.ops.recurrence import Mode, linear_recurrence

__all__ = ["selective_scan", "ssd"]

Backend = Literal["auto", "torch", "mamba_ssm"]

logger = logging.getLogger("mmeff.ops")
_logged: set[str] = set()


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
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Mamba-2 SSD as mamba_chunk_scan_combined: x [B,T,H,P], dt [B,T,H], A [H], B/C [B,T,G,N]."""
    kernel = _mamba_kernel("ssd", backend, mode, x, _load_mamba_ssd)
    if kernel is not None:
        return kernel(
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
            return_final_states=return_final_states,
        )

    heads, groups = x.shape[2], B.shape[2]
    if heads % groups or C.shape[2] != groups:
        raise ValueError(f"groups of B {tuple(B.shape)} / C {tuple(C.shape)} must divide heads {heads}")
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, as mamba-ssm's kernel
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    xf = x.float()
    # q, k, v stay in x's dtype (the PyTorch path computes in fp32 anyway): fp32 would send 16-bit models to
    # the kernels' fp32 build, which for d_state 128 compiles for minutes and runs several times slower.
    y, state = linear_recurrence(
        C.to(x.dtype).repeat_interleave(heads // groups, dim=2),
        B.to(x.dtype).repeat_interleave(heads // groups, dim=2),
        (xf * dt[..., None]).to(x.dtype),
        dt * A.float(),
        scale=1.0,
        initial_state=None if initial_states is None else initial_states.transpose(-1, -2),
        output_final_state=return_final_states,
        mode=mode,
        chunk_size=chunk_size,
    )
    if D is not None and D.dim() == 1:
        D = D[:, None]
    out = _skip_and_gate(y, xf, D, z, x.dtype)
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
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Mamba-1 selective scan as selective_scan_fn: u/delta [B,D,T], A [D,N], B/C [D,N], [B,N,T] or [B,G,N,T]."""
    if A.is_complex():
        raise NotImplementedError("selective_scan supports real A only")
    unsupported = None if initial_state is None else "initial_state is not supported by selective_scan_fn"
    kernel = _mamba_kernel("selective_scan", backend, mode, u, _load_mamba_selective_scan, unsupported)
    if kernel is not None:
        return kernel(
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

    batch, dim, seqlen = u.shape
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta = delta.transpose(1, 2)  # [B,T,D]
    uf = u.float()
    y, state = linear_recurrence(
        _scan_input(C, batch, dim, seqlen),
        _scan_input(B, batch, dim, seqlen),
        (delta * uf.transpose(1, 2))[..., None],
        delta[..., None] * A.float(),
        scale=1.0,
        initial_state=None if initial_state is None else initial_state[..., None],
        output_final_state=return_last_state,
        mode=mode,
        chunk_size=chunk_size,
    )
    out = _skip_and_gate(y[..., 0].transpose(1, 2), uf, None if D is None else D[:, None], z, u.dtype)
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


def _skip_and_gate(y: Tensor, x: Tensor, D: Optional[Tensor], z: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """(y + D * x) * silu(z) in fp32, cast to the output dtype."""
    if D is not None:
        y = y + x * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def check_backend(backend: str) -> None:
    """Raise a ValueError unless `backend` is one of `Backend`'s values."""
    if backend not in get_args(Backend):
        raise ValueError(f"backend must be one of {', '.join(map(repr, get_args(Backend)))}, got {backend!r}")


def _mamba_kernel(
    op: str,
    backend: Backend,
    mode: Mode,
    x: Tensor,
    loader: Callable[[], Optional[Callable]],
    unsupported: Optional[str] = None,
) -> Optional[Callable]:
    """mamba-ssm function to run for this call, or None for mmeff's path; logs each choice once."""
    check_backend(backend)
    kernel, reason = None, None
    if backend == "torch":
        reason = "backend='torch'"
    elif backend == "auto" and force_reference():
        reason = "MMEFF_FORCE_REFERENCE=1"
    elif mode != "chunk":
        reason = f"mode={mode!r}"
    elif not x.is_cuda:
        reason = "inputs not on CUDA"
    elif unsupported is not None:
        reason = unsupported
    else:
        kernel = loader()
        if kernel is None:
            reason = "mamba-ssm not importable"
    if reason is not None and backend == "mamba_ssm":
        raise RuntimeError(f"{op}: backend='mamba_ssm' requested but {reason}")
    message = f"{op}: mamba-ssm kernel" if reason is None else f"{op}: mmeff torch {mode} path ({reason})"
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
    return kernel


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
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
