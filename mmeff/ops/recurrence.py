"""Shared core of the linear-sequence ops: one gated (delta-)linear recurrence, recurrent and chunked.

Per batch and head, with state S_t of shape [K, V]:

    S'_t = diag(exp(g_t)) S_{t-1}                      (g_t: scalar or per key channel; none = 0)
    S_t  = S'_t + k_t v_t^T                            (additive rule)
    S_t  = S'_t + beta_t k_t (v_t - S'^T_t k_t)^T      (delta rule)
    o_t  = scale * S_t^T q_t

"recurrent" runs this step by step (the reference); "chunk" is the equivalent chunked parallel form:
within a chunk every position is expressed through the chunk's entry state S_0 plus the chunk's own
contribution, computed with decay-masked score matrices (the delta rule through the UT transform
(I + M)^{-1}) or, for per-channel decay with a narrow value, by stepping through all chunks at once;
S_0 is passed chunk to chunk.

`mode` names the algorithm, `backend` the implementation (mmeff.ops.dispatch): "triton" runs mmeff's
kernels (mmeff.kernels, CUDA; their parity suite is tests/gpu/test_kernels_gpu.py) - the chunked kernels,
or for mode "recurrent" (no gradients) the fused step-by-step one -, "torch" the PyTorch forms below,
"auto" the kernels when they cover the call. While torch.compile traces, the chunked kernels run as the custom
op mmeff::linear_recurrence (mmeff.ops.custom_ops): no graph break.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
from torch import Tensor
from torch._higher_order_ops.scan import scan

from mmeff.ops import dispatch
from mmeff.ops.custom_ops import linear_recurrence_op
from mmeff.ops.dispatch import Backend
from mmeff.ops.varlen import host_bounds

Mode = Literal["chunk", "recurrent"]

# Sub-chunk length for per-key-channel decay scores; bounds the exact [c, c, K] pairwise-decay tensor.
_SUBCHUNK = 16
# Value width up to which per-channel-decay chunks are stepped through rather than scored pairwise.
_NARROW_VALUE = 4


def linear_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    *,
    scale: float = 1.0,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    cu_seqlens: Optional[Tensor] = None,
    backend: Backend = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Run the recurrence on q, k [B,T,H,K], v [B,T,H,V], log_decay [B,T,H] or [B,T,H,K], beta [B,T,H].

    q and k may have fewer heads G (a divisor of H), shared by groups of H / G heads in order, as grouped-query
    attention shares keys: Mamba-2's B and C. The kernels read them shared under a scalar gate or none; per-key
    decay and the delta rule get them repeated.

    cu_seqlens (int32 [N+1], B = 1) packs N independent sequences along T, each starting from its own
    initial_state [N,H,K,V] (zeros if none) and giving its own final state [N,H,K,V]. backend: auto, torch
    or triton (mmeff.ops.dispatch).
    """
    if mode not in ("chunk", "recurrent"):
        raise ValueError(f"mode must be 'chunk' or 'recurrent', got {mode!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, seqlen, heads, dk = *v.shape[:3], q.shape[3]
    if k.shape != q.shape or v.shape[:2] != q.shape[:2] or heads % q.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
            "(q and k alike; their heads dividing v's)"
        )
    if log_decay is not None and log_decay.shape not in ((batch, seqlen, heads), (batch, seqlen, heads, dk)):
        raise ValueError(f"log_decay must be [B,T,H] or [B,T,H,K], got {tuple(log_decay.shape)}")
    if beta is not None and beta.shape != (batch, seqlen, heads):
        raise ValueError(f"beta must be [B,T,H], got {tuple(beta.shape)}")
    check_cu_seqlens(cu_seqlens, batch)
    if q.shape[2] != heads and (beta is not None or (log_decay is not None and log_decay.dim() == 4)):
        q, k = (_repeat_heads(x, heads) for x in (q, k))

    def triton() -> str:
        return triton_check(q, k, v, log_decay, beta, initial_state, cu_seqlens, mode)

    impl = dispatch.choose("linear_recurrence", backend, [("triton", triton)])
    return run_recurrence(
        impl, q, k, v, log_decay, beta, scale, initial_state, output_final_state, mode, chunk_size, cu_seqlens
    )


def check_cu_seqlens(cu_seqlens: Optional[Tensor], batch: int) -> None:
    """Raise a ValueError unless cu_seqlens is None or [N+1] with batch size 1."""
    if cu_seqlens is not None and (batch != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2):
        raise ValueError(f"cu_seqlens must be [N+1] with batch size 1, got {tuple(cu_seqlens.shape)}, B={batch}")


def triton_check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor],
    beta: Optional[Tensor],
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    mode: Mode,
) -> str:
    """Why mmeff's Triton kernels cannot run this recurrence, "" when they can (a dispatch.Check)."""
    return dispatch.triton_unsupported(
        q, ask=lambda kernels: kernels.unsupported(q, k, v, log_decay, beta, initial_state, cu_seqlens, mode)
    )


def run_recurrence(
    impl: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor],
    beta: Optional[Tensor],
    scale: float,
    initial_state: Optional[Tensor],
    output_final_state: bool,
    mode: Mode,
    chunk_size: int,
    cu_seqlens: Optional[Tensor],
) -> Tuple[Tensor, Optional[Tensor]]:
    """The recurrence by `impl` ("triton" or "torch"), on arguments linear_recurrence has checked."""
    if impl == "torch":
        q, k = (_repeat_heads(x, v.shape[2]) for x in (q, k))
    if impl == "triton" and mode == "chunk" and torch.compiler.is_compiling():  # no graph break on the kernels
        return linear_recurrence_op(q, k, v, log_decay, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    if impl == "triton":
        return dispatch.triton_kernels().linear_recurrence_triton(
            q, k, v, log_decay, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size, mode
        )
    if cu_seqlens is None:
        o, state = _torch_recurrence(q, k, v, log_decay, beta, scale, initial_state, mode, chunk_size)
        return o, (state if output_final_state else None)
    outs, states = [], []
    bounds = host_bounds(cu_seqlens)
    if initial_state is not None and initial_state.shape[0] != len(bounds) - 1:
        raise ValueError(f"initial_state must be [N,H,K,V] with N = {len(bounds) - 1} sequences, "
                         f"got {tuple(initial_state.shape)}")  # fmt: skip
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = (None if x is None else x[:, start:end] for x in (q, k, v, log_decay, beta))
        s0 = None if initial_state is None else initial_state[n : n + 1]
        o, state = _torch_recurrence(*part, scale, s0, mode, chunk_size)
        outs.append(o)
        states.append(state)
    return torch.cat(outs, dim=1), (torch.cat(states) if output_final_state else None)


def _repeat_heads(x: Tensor, heads: int) -> Tensor:
    """q or k [B,T,G,K] repeated over the heads of each group: [B,T,heads,K] (x itself where G = heads)."""
    return x if x.shape[2] == heads else x.repeat_interleave(heads // x.shape[2], dim=2)


def _torch_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor],
    beta: Optional[Tensor],
    scale: float,
    initial_state: Optional[Tensor],
    mode: Mode,
    chunk_size: int,
) -> Tuple[Tensor, Tensor]:
    """The PyTorch recurrence of one batch: (o [B,T,H,V] in v's dtype, final state fp32)."""
    batch, seqlen, heads, dk = q.shape
    out_dtype = v.dtype
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    q = q * scale
    # No decay is a zero scalar log-decay: one code path, negligible cost.
    if log_decay is None:
        g = q.new_zeros(batch, heads, seqlen, 1)
    else:
        g = log_decay.float()
        g = (g.unsqueeze(-1) if g.dim() == 3 else g).transpose(1, 2)
    if beta is not None:
        beta = beta.transpose(1, 2).float().unsqueeze(-1)
    if initial_state is None:
        state = q.new_zeros(batch, heads, dk, v.shape[-1])
    else:
        state = initial_state.float()

    if seqlen == 0:
        o = v
    elif mode == "recurrent":
        o, state = _recurrent(q, k, v, g, beta, state)
    else:
        o, state = _chunked(q, k, v, g, beta, state, chunk_size)
    return o.transpose(1, 2).to(out_dtype), state


def _recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Optional[Tensor], state: Tensor
) -> Tuple[Tensor, Tensor]:
    """Step-by-step definition on [B,H,T,*] fp32 tensors."""
    outs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, :, None].exp()
        k_t = k[:, :, t]
        u = v[:, :, t]
        if beta is not None:
            u = beta[:, :, t] * (u - torch.einsum("bhkv,bhk->bhv", state, k_t))
        state = state + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(outs, dim=2), state


def _chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Optional[Tensor], state: Tensor, chunk_size: int
) -> Tuple[Tensor, Tensor]:
    """Chunked parallel form on [B,H,T,*] fp32 tensors; T is zero-padded to a whole number of chunks.

    While torch.export traces (one graph for every length T), chunks are always chunk_size long and the
    chunk-to-chunk loop is one scan op over their dynamic number; eager runs the same steps in a loop.
    """
    seqlen = q.shape[2]
    exporting = dispatch.exporting()
    size = chunk_size if exporting else min(chunk_size, seqlen)
    nchunks = (seqlen + size - 1) // size
    if exporting:  # at least two chunks: a count export can prove is never 1 (no specialising on it)
        nchunks = (seqlen + 2 * size - 1) // size

    def split(x: Tensor) -> Tensor:
        # Padded steps have k = v = beta = 0 and no decay, so they leave the state unchanged. Zeros and a copy, not
        # F.pad: with a symbolic pad (a dynamic-shape torch.compile) the traced pad and its backward are contiguous
        # (torch._refs.constant_pad_nd) while the eager kernel keeps x's (transposed) strides, so the views that
        # einsum and matmul record on them fail at run time.
        padded = x.new_zeros(*x.shape[:2], nchunks * size, x.shape[-1])
        padded[:, :, :seqlen] = x
        return padded.unflatten(2, (nchunks, size))

    q, k, v, g = (split(x) for x in (q, k, v, g))
    b = g.cumsum(dim=-2)  # log decay from the chunk start, inclusive: [B,H,N,C,1 or K]
    q_in = q * b.exp()  # reads the chunk's entry state
    chunk_decay = b[..., -1, :, None].exp()  # [B,H,N,1 or K,1]

    # Per chunk: o = q_in S_0 + local_o and S_C = chunk_decay * S_0 + local_s (- k_out^T w S_0 for the
    # delta rule), where local_o / local_s are the outputs and exit state of the chunk run from S_0 = 0.
    w = None
    if beta is None and b.shape[-1] > 1 and v.shape[-1] <= _NARROW_VALUE:
        # Per-channel decay with a narrow value (the selective scan): states are smaller than the
        # [c, c, K] pairwise decays, so step through all chunks at once instead.
        heads, nchunks = q.shape[1:3]
        local_o, local_s = _recurrent(
            *(x.flatten(1, 2) for x in (q, k, v, g)),
            None,
            q.new_zeros(q.shape[0], heads * nchunks, k.shape[-1], v.shape[-1]),
        )
        local_o, local_s = local_o.unflatten(1, (heads, nchunks)), local_s.unflatten(1, (heads, nchunks))
    else:
        scores = _decayed_scores(q, k, b, strict=False)
        k_out = k * (b[..., -1:, :] - b).exp()  # writes into the chunk's exit state
        u = v
        if beta is not None:
            beta = split(beta)
            # Delta rule within a chunk: U = (I + M)^{-1} (beta V - beta (K * exp(b)) S_0) = u - w S_0 with
            # M_ts = beta_t <k_t, k_s>_decayed for s < t; the unit diagonal is implied by unitriangular.
            m = beta * _decayed_scores(k, k, b, strict=True)
            rhs = torch.cat([beta * v, beta * k * b.exp()], dim=-1)
            sol = _solve_unit_lower(m, rhs)
            u, w = sol.split([v.shape[-1], k.shape[-1]], dim=-1)
            q_in = q_in - scores @ w
        local_o, local_s = scores @ u, k_out.transpose(-1, -2) @ u

    chunks = (q_in, local_o, chunk_decay, local_s, *(() if w is None else (k_out, w)))
    if exporting:
        state, o = scan(_next_chunk, state.contiguous(), chunks, dim=2)  # an expanded state (TTT's W0) has stride 0
        o = o.movedim(0, 2)
    else:
        outs = []
        for n in range(nchunks):
            state, o_n = _next_chunk(state, tuple(x[:, :, n] for x in chunks))
            outs.append(o_n)
        o = torch.stack(outs, dim=2)
    return o.flatten(2, 3)[:, :, :seqlen], state


def _next_chunk(state: Tensor, chunk: Tuple[Tensor, ...]) -> Tuple[Tensor, Tensor]:
    """(exit state, output) of one chunk from its entry state: chunk = (q_in, local_o, chunk_decay, local_s[, k_out, w])."""
    q_in, local_o, chunk_decay, local_s, *delta = chunk
    exit_state = chunk_decay * state + local_s
    if delta:
        k_out, w = delta
        exit_state = exit_state - k_out.transpose(-1, -2) @ (w @ state)
    return exit_state, q_in @ state + local_o


def _solve_unit_lower(m: Tensor, rhs: Tensor) -> Tensor:
    """(I + m)^{-1} rhs for strictly lower-triangular m [..., C, C]: torch's triangular solve, or while exporting
    `unit_lower_inverse(m) @ rhs` (ONNX has no triangular solve; torch.onnx cannot translate it)."""
    if dispatch.exporting():
        return unit_lower_inverse(m) @ rhs
    return torch.linalg.solve_triangular(m, rhs, upper=False, unitriangular=True)


def unit_lower_inverse(m: Tensor) -> Tensor:
    """(I + m)^{-1} for strictly lower-triangular m [..., C, C] (entries above the diagonal ignored) by matmuls only.

    Recursive block inversion in ceil(log2 C) steps: `inv` holds the inverse of the diagonal blocks of size w of I + m;
    those of size 2w are inv - inv E inv, E the entries (t, s) of m in a 2w block but not in a w block, i.e. with
    w <= t xor s < 2w (exact: (inv E)^2 = 0). Its error stays that of a triangular solve, unlike the nilpotent series
    (I + N)(I + N^2)(I + N^4)... = (I - N)^{-1}, whose powers of N cancel catastrophically in fp32 once keys are alike.
    """
    size = m.shape[-1]
    pos = torch.arange(size, device=m.device)
    differ = pos[:, None] ^ pos[None, :]
    m = m.tril(-1)
    inv = torch.eye(size, dtype=m.dtype, device=m.device).expand_as(m)
    width = 1
    while width < size:
        e = m * ((differ >= width) & (differ < 2 * width))
        inv = inv - inv @ e @ inv
        width *= 2
    return inv


def _masked_exp(x: Tensor, keep: Tensor) -> Tensor:
    """exp(x) where keep, else 0; masking before exp avoids overflow and inf * 0 in the backward."""
    return x.masked_fill(~keep, float("-inf")).exp()


def _decayed_scores(x: Tensor, y: Tensor, b: Tensor, strict: bool) -> Tensor:
    """S_ts = sum_k x_tk y_sk exp(b_tk - b_sk) for s <= t (s < t if strict), else 0; x, y, b: [..., C, K|1]."""
    size = x.shape[-2]
    causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    if b.shape[-1] == 1:
        return (x @ y.transpose(-1, -2)) * _masked_exp(b - b.transpose(-1, -2), causal)

    # Per-key-channel decay: exp(b_t - b_s) does not factor stably, so sub-chunk: exact pairwise
    # exponents inside each diagonal block, and for earlier blocks a reference point r between s and t
    # (the position just before t's sub-chunk), exp(b_t - b_s) = exp(b_t - b_r) exp(b_r - b_s), both <= 1.
    sub = _SUBCHUNK if size % _SUBCHUNK == 0 else size
    nsub = size // sub
    xs, ys, bs = (a.unflatten(-2, (nsub, sub)) for a in (x, y, b))
    diag_decay = _masked_exp(bs[..., :, None, :] - bs[..., None, :, :], causal[:sub, :sub, None])
    diag = torch.einsum("...itk,...isk,...itsk->...its", xs, ys, diag_decay)

    b_ref = torch.cat([torch.zeros_like(b[..., :1, :]), b[..., sub - 1 : size - 1 : sub, :]], dim=-2)
    before = torch.arange(size, device=x.device) < torch.arange(0, size, sub, device=x.device)[:, None]
    x_ref = xs * (bs - b_ref[..., :, None, :]).exp()
    y_ref = y[..., None, :, :] * _masked_exp(b_ref[..., :, None, :] - b[..., None, :, :], before[..., None])
    off = (x_ref @ y_ref.transpose(-1, -2)).unflatten(-1, (nsub, sub))  # [..., i, t, j, s]
    block_eye = torch.eye(nsub, dtype=x.dtype, device=x.device)[:, None, :, None]
    full = off + diag[..., :, :, None, :] * block_eye
    return full.reshape(*full.shape[:-4], size, size)
