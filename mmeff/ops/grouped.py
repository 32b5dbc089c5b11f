"""Expert FFNs on tokens grouped by expert: one grouped matmul per projection, or a per-expert loop reference.

`torch._grouped_mm(x [M, K], w [G, K, N], offs)` (torch 2.8 to 2.11, private) multiplies consecutive row
groups of `x` by their own `w[g]`; `offs` holds the int32 cumulative group ends. It takes bfloat16 operands
whose row strides are 16-byte aligned (K and N multiples of 8) and fewer than 1024 groups; group sizes are
free (zero included). On sm90 it is one CUTLASS kernel without host sync, which `impl='auto'` uses; elsewhere
it may loop internally or be missing, so 'auto' takes the per-expert loop, which reads the group sizes on
the host. `impl` is the matmuls' backend (mmeff.ops.dispatch): 'grouped' insists on torch._grouped_mm,
'loop' is the reference; MMEFF_FORCE_REFERENCE=1 takes the loop whatever `impl` says. The rows of `x`
here always end at offs[-1] (no padding), so no output row is left unwritten.

Around the matmuls, `dispatch` copies each token's row to its k assignments in expert order, `combine` sums
the expert outputs back per token with the routing weights, and `activate` applies SwiGLU: with backend 'auto'
(on CUDA) or 'triton' through the Triton kernels of mmeff.kernels.moe (one pass each, no atomics), else (or
with MMEFF_FORCE_REFERENCE=1) in plain PyTorch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import dispatch as dispatcher
from mmeff.ops.dispatch import Backend

Impl = Literal["auto", "grouped", "loop"]
_IMPL_BACKEND = {"auto": "auto", "grouped": "grouped_mm", "loop": "torch"}


def grouped_mm_unsupported(x: Tensor, w: Tensor) -> str:
    """Why `torch._grouped_mm` cannot take (x [M, K], w [G, K, N]); empty when it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return f"it needs bfloat16 operands, got {x.dtype} and {w.dtype}"
    if w.shape[1] % 8 or w.shape[2] % 8:
        return f"it needs both matrix sizes to be multiples of 8 (16-byte rows), got {tuple(w.shape[1:])}"
    if w.shape[0] >= 1024:
        return f"it takes fewer than 1024 groups, got {w.shape[0]}"
    return ""


def resolve_impl(impl: Impl, x: Tensor, *weights: Tensor) -> Literal["grouped", "loop"]:
    """'auto': the grouped kernel on Hopper for bf16, else the loop; 'grouped' anywhere torch takes it, else an error."""
    if impl not in _IMPL_BACKEND:
        raise ValueError(f"impl must be 'auto', 'grouped' or 'loop', got {impl!r}")

    def check() -> str:
        why = next((r for r in (grouped_mm_unsupported(x, w) for w in weights) if r), "")
        # Hopper only for 'auto': on sm100 the kernel has given experts without tokens non-zero weight
        # gradients (pytorch#172439).
        if not why and impl == "auto" and not (dispatcher.on_cuda(x) and dispatcher.capability(x)[0] == 9):
            why = "not on a Hopper GPU (sm90)"
        return why

    backend = dispatcher.choose("expert_ffn", _IMPL_BACKEND[impl], [("grouped_mm", check)], tuple(_IMPL_BACKEND.values()))
    return "grouped" if backend == "grouped_mm" else "loop"


def _glue(op: str, x: Tensor, backend: Backend) -> bool:
    """Whether the MoE glue op `op` runs mmeff.kernels.moe's Triton kernel on `x`."""
    return dispatcher.choose(op, backend, [("triton", lambda: dispatcher.triton_unsupported(x, "moe"))]) == "triton"


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, impl: Literal["grouped", "loop"]) -> Tensor:
    """Rows of `x` [M, K] in consecutive groups of `counts` [G], group g times `w[g]` [K, N] -> [M, N]."""
    if impl == "grouped":
        return torch._grouped_mm(x, w, offs=counts.cumsum(0, dtype=torch.int32))
    return torch.cat([xg @ wg for xg, wg in zip(x.split(counts.tolist()), w)])


def sort_assignments(experts: Tensor) -> tuple[Tensor, Tensor]:
    """(order, inv) of the assignments `experts` [N, k]: their flat indices n * k + j sorted by expert (stable),
    and the inverse permutation (the sorted row of each assignment)."""
    order = experts.reshape(-1).argsort(stable=True)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, inv


def dispatch(x: Tensor, order: Tensor, inv: Tensor, k: int, backend: Backend = "auto") -> Tensor:
    """Token rows x [N, D] -> one row per assignment, in sorted order [N * k, D]."""
    if _glue("moe_dispatch", x, backend):
        return dispatcher.triton_kernels("moe").Dispatch.apply(x, order, inv, k)
    return x[order // k]


def combine(rows: Tensor, order: Tensor, inv: Tensor, weights: Tensor, backend: Backend = "auto") -> Tensor:
    """Sorted expert outputs rows [N * k, D] -> per-token sums weighted by `weights` [N, k] -> [N, D]."""
    if _glue("moe_combine", rows, backend):
        return dispatcher.triton_kernels("moe").Combine.apply(rows, order, inv, weights)
    n, k = weights.shape
    return torch.bmm(weights.to(rows.dtype).unsqueeze(1), rows[inv].view(n, k, -1)).squeeze(1)


def activate(h: Tensor, gated: bool, backend: Backend = "auto") -> Tensor:
    """SwiGLU on [gate | up] halves of the last dim, else GELU."""
    if gated and _glue("moe_swiglu", h, backend):
        return dispatcher.triton_kernels("moe").SwiGLU.apply(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], h.shape[-1] // 2)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def expert_ffn(x: Tensor, counts: Tensor, w_in: Tensor, w_out: Tensor, gated: bool, impl: Impl = "auto") -> Tensor:
    """Experts on tokens sorted by expert: x [M, D], w_in [E, D, H or 2H], w_out [E, H, D] -> [M, D]."""
    how = resolve_impl(impl, x, w_in, w_out)
    return grouped_mm(activate(grouped_mm(x, w_in, counts, how), gated), w_out, counts, how)


def padded_expert_ffn(x: Tensor, w_in: Tensor, w_out: Tensor, gated: bool) -> Tensor:
    """Experts on fixed-capacity slots: x [E, C, D] -> [E, C, D] with two batched matmuls."""
    return torch.bmm(activate(torch.bmm(x, w_in), gated), w_out)
