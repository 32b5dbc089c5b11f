"""SSD and selective scan against literal transcriptions of mamba-ssm's reference semantics; dispatch.

Tolerances: fp32 vs the fp32 transcriptions rtol 1e-4, atol 1e-5 (times the reference magnitude, floored at 1);
hand cases rtol 1e-6, atol 1e-6.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import dispatch, selective_scan, ssd
from mmeff.ops import ssm as ssm_module

MODES = ["chunk", "recurrent"]


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale)


def ssd_loop(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
    initial_states: Optional[Tensor] = None,
    dt_limit: Tuple[float, float] = (0.0, math.inf),
) -> Tuple[Tensor, Tensor]:
    """Step-by-step Mamba-2 semantics of mamba_chunk_scan_combined: h [B,H,P,N]."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    x, B, C, dt = x.float(), B.float(), C.float(), dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    dt = torch.minimum(torch.maximum(dt, torch.tensor(dt_limit[0])), torch.tensor(dt_limit[1]))
    group_of_head = [h // (nheads // ngroups) for h in range(nheads)]
    B, C = B[:, :, group_of_head], C[:, :, group_of_head]
    h = x.new_zeros(batch, nheads, headdim, dstate) if initial_states is None else initial_states.float()
    ys = []
    for t in range(seqlen):
        dA = torch.exp(dt[:, t] * A)  # [B,H]
        dBx = dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]  # [B,H,P,N]
        h = dA[:, :, None, None] * h + dBx
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.float())
    return y, h


def ssd_minimal(x: Tensor, A: Tensor, B: Tensor, C: Tensor, block_len: int) -> Tuple[Tensor, Tensor]:
    """Transcription of mamba-ssm's ssd_minimal_discrete (X = x*dt, A = A*dt per step; G = 1)."""

    def segsum(a: Tensor) -> Tensor:
        T = a.size(-1)
        a = a[..., None].expand(*a.shape, T)
        a = a.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1), 0)
        s = torch.cumsum(a, dim=-2)
        return s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=0), -torch.inf)

    b, T, h, p = x.shape
    X, A, B, C = (t.reshape(b, T // block_len, block_len, *t.shape[2:]) for t in (x, A, B, C))
    A = A.permute(0, 3, 1, 2)  # b h c l
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclgn,bcsgn,bhcls,bcshp->bclhp", C, B, L, X)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclgn,bhcl,bclhp->bcghpn", B, decay_states, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bcghpn->bzghpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    Y_off = torch.einsum("bclgn,bcghpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    return (Y_diag + Y_off).reshape(b, T, h, p), final_state[:, 0]


def selective_scan_loop(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Transcription of mamba-ssm's selective_scan_ref (real A), with an optional initial state."""
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    B, C = B.float(), C.float()
    x = A.new_zeros((batch, dim, dstate)) if initial_state is None else initial_state.float()
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 2:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    if C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if C.dim() == 2:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        ys.append(y)
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return out, x


SSD_CONFIGS = {
    "plain": dict(groups=1, D=None, z=False, bias=False, softplus=False, state=False),
    "groups_D_z": dict(groups=2, D="h", z=True, bias=False, softplus=False, state=False),
    "all": dict(groups=2, D="hp", z=True, bias=True, softplus=True, state=True),
    "heads_eq_groups": dict(groups=4, D="h", z=False, bias=True, softplus=True, state=True),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 17, 64, 200])
@pytest.mark.parametrize("config", list(SSD_CONFIGS))
def test_ssd_matches_mamba_semantics(config: str, T: int, mode: str) -> None:
    cfg = SSD_CONFIGS[config]
    gen = torch.Generator().manual_seed(0)
    batch, H, P, N, G = 2, 4, 8, 8, cfg["groups"]
    x = torch.randn(batch, T, H, P, generator=gen)
    # without softplus dt is used as given (clamped at 0), so feed realistic positive steps
    dt = torch.randn(batch, T, H, generator=gen)
    if not cfg["softplus"]:
        dt = F.softplus(dt - 1)
    kwargs = dict(
        A=-torch.exp(torch.rand(H, generator=gen)),
        B=torch.randn(batch, T, G, N, generator=gen),
        C=torch.randn(batch, T, G, N, generator=gen),
        D={None: None, "h": torch.randn(H, generator=gen), "hp": torch.randn(H, P, generator=gen)}[cfg["D"]],
        z=torch.randn(batch, T, H, P, generator=gen) if cfg["z"] else None,
        dt_bias=torch.randn(H, generator=gen) - 1 if cfg["bias"] else None,
        dt_softplus=cfg["softplus"],
        initial_states=torch.randn(batch, H, P, N, generator=gen) if cfg["state"] else None,
    )
    y_ref, h_ref = ssd_loop(x, dt, **kwargs)
    y, h = ssd(x, dt, **kwargs, chunk_size=32, return_final_states=True, mode=mode)
    assert h.shape == (batch, H, P, N) and h.dtype == torch.float32
    _close(y, y_ref)
    _close(h, h_ref)
    y_only = ssd(x, dt, **kwargs, mode=mode)
    assert isinstance(y_only, Tensor)
    _close(y_only, y_ref)


@pytest.mark.parametrize("mode", MODES)
def test_ssd_matches_ssd_minimal(mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    batch, T, H, P, N = 2, 128, 3, 4, 8
    x = torch.randn(batch, T, H, P, generator=gen)
    dt = F.softplus(torch.randn(batch, T, H, generator=gen) - 2)
    A = -torch.exp(torch.rand(H, generator=gen))
    B, C = torch.randn(batch, T, 1, N, generator=gen), torch.randn(batch, T, 1, N, generator=gen)
    y_ref, h_ref = ssd_minimal(x * dt[..., None], A * dt, B, C, block_len=32)
    y, h = ssd(x, dt, A, B, C, mode=mode, return_final_states=True)
    _close(y, y_ref)
    _close(h, h_ref)


@pytest.mark.parametrize("mode", MODES)
def test_ssd_dt_limit_clamps(mode: str) -> None:
    gen = torch.Generator().manual_seed(2)
    batch, T, H, P, N = 1, 20, 2, 4, 4
    x, dt = torch.randn(batch, T, H, P, generator=gen), torch.randn(batch, T, H, generator=gen)
    A = -torch.rand(H, generator=gen)
    B, C = torch.randn(batch, T, 1, N, generator=gen), torch.randn(batch, T, 1, N, generator=gen)
    for limit in [(0.0, math.inf), (0.05, 0.5)]:
        y_ref, _ = ssd_loop(x, dt, A, B, C, dt_limit=limit)
        _close(ssd(x, dt, A, B, C, mode=mode, dt_limit=limit), y_ref)


@pytest.mark.parametrize("mode", MODES)
def test_ssd_by_hand(mode: str) -> None:
    # H=P=N=1, A=-ln2, dt=1 (decay 0.5): h1 = 1*x1*B1 = 2*3 = 6, y1 = C1 h1 + D x1 = 1*6 + 0.5*2 = 7
    # h2 = 0.5*6 + 1*(-1)*1 = 2, y2 = 2*2 + 0.5*(-1) = 3.5
    x = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    y, h = ssd(
        x,
        torch.ones(1, 2, 1),
        torch.tensor([-math.log(2.0)]),
        torch.tensor([3.0, 1.0]).view(1, 2, 1, 1),
        torch.tensor([1.0, 2.0]).view(1, 2, 1, 1),
        D=torch.tensor([0.5]),
        return_final_states=True,
        mode=mode,
    )
    torch.testing.assert_close(y.flatten(), torch.tensor([7.0, 3.5]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.flatten(), torch.tensor([2.0]), rtol=1e-6, atol=1e-6)


SCAN_BC = {"const": "dn", "variable": "bnt", "grouped": "bgnt"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 17, 200])
@pytest.mark.parametrize("bc", list(SCAN_BC))
@pytest.mark.parametrize("extras", [False, True], ids=["bare", "D_z_bias_softplus_state"])
def test_selective_scan_matches_mamba_semantics(extras: bool, bc: str, T: int, mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, dim, N, G = 2, 4, 8, 2
    shape = {"dn": (dim, N), "bnt": (batch, N, T), "bgnt": (batch, G, N, T)}[SCAN_BC[bc]]
    u = torch.randn(batch, dim, T, generator=gen)
    delta = torch.randn(batch, dim, T, generator=gen)
    kwargs = dict(
        A=-torch.exp(torch.rand(dim, N, generator=gen)),
        B=torch.randn(*shape, generator=gen),
        C=torch.randn(*shape, generator=gen),
    )
    if extras:
        kwargs.update(
            D=torch.randn(dim, generator=gen),
            z=torch.randn(batch, dim, T, generator=gen),
            delta_bias=torch.randn(dim, generator=gen) - 1,
            delta_softplus=True,
            initial_state=torch.randn(batch, dim, N, generator=gen),
        )
    else:
        delta = F.softplus(delta - 1)
    y_ref, h_ref = selective_scan_loop(u, delta, **kwargs)
    y, h = selective_scan(u, delta, **kwargs, return_last_state=True, mode=mode, chunk_size=32)
    assert h.shape == (batch, dim, N) and h.dtype == torch.float32
    _close(y, y_ref)
    _close(h, h_ref)
    assert isinstance(selective_scan(u, delta, **kwargs, mode=mode), Tensor)


@pytest.mark.parametrize("mode", MODES)
def test_selective_scan_by_hand(mode: str) -> None:
    # D=N=1, A=-ln2, delta=1 (decay 0.5): h1 = 1*B1*u1 = 2*1 = 2, y1 = C1 h1 = 3*2 = 6
    # h2 = 0.5*2 + 1*B2*u2 = 1 + 4 = 5, y2 = 1*5 = 5; out *= silu(z) with z = 0 -> 0 at t=2
    y, h = selective_scan(
        torch.tensor([[[1.0, 2.0]]]),
        torch.ones(1, 1, 2),
        torch.tensor([[-math.log(2.0)]]),
        torch.tensor([[[2.0, 2.0]]]),
        torch.tensor([[[3.0, 1.0]]]),
        z=torch.tensor([[[30.0, 0.0]]]),
        return_last_state=True,
        mode=mode,
    )
    torch.testing.assert_close(y.flatten(), torch.tensor([6.0 * F.silu(torch.tensor(30.0)).item(), 0.0]))
    torch.testing.assert_close(h.flatten(), torch.tensor([5.0]))


def test_output_dtype_follows_input() -> None:
    x = torch.randn(1, 9, 2, 4, dtype=torch.bfloat16)
    B = torch.randn(1, 9, 1, 4, dtype=torch.bfloat16)
    y, h = ssd(x, torch.rand(1, 9, 2), -torch.rand(2), B, B, return_final_states=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    u = torch.randn(1, 2, 9, dtype=torch.bfloat16)
    bc = B[:, :, 0].mT
    out, last = selective_scan(u, torch.rand(1, 2, 9), -torch.rand(2, 4), bc, bc, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32


def test_backend_selection_on_cpu(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(1, 5, 2, 4)
    args = (x, torch.rand(1, 5, 2), -torch.rand(2), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4))
    ref = ssd(*args, backend="torch")
    monkeypatch.setattr(dispatch, "_logged", set())  # each choice is logged once per process
    with caplog.at_level("INFO", logger="mmeff.ops"):
        torch.testing.assert_close(ssd(*args), ref)
    assert "ssd: torch (triton: inputs not on CUDA; mamba_ssm: inputs not on CUDA)" in caplog.messages
    for backend in ("mamba_ssm", "triton"):
        with pytest.raises(RuntimeError, match=f"ssd: backend='{backend}' requested but .*inputs not on CUDA"):
            ssd(*args, backend=backend)
    monkeypatch.setenv("MMEFF_FORCE_REFERENCE", "1")  # overrides any backend
    torch.testing.assert_close(ssd(*args, backend="mamba_ssm"), ref)
    with pytest.raises(ValueError, match="backend must be one of"):
        ssd(*args, backend="cuda")  # type: ignore[arg-type]


def test_mamba_loaders_fail_soft_without_leftovers() -> None:
    # Without a working mamba-ssm the loaders return None and leave no placeholder module behind.
    code = (
        "import sys\n"
        "from mmeff.ops import ssm\n"
        "assert 'mamba_ssm' not in sys.modules\n"
        "fn = ssm._load_mamba_ssd()\n"
        "ss = ssm._load_mamba_selective_scan()\n"
        "ext = sys.modules.get('selective_scan_cuda')\n"
        "assert ext is None or hasattr(ext, 'fwd'), ext\n"
        "print(fn is not None, ss is not None)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mamba_kernels_match_torch_path() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    if ssm_module._load_mamba_ssd() is None:
        pytest.skip("mamba-ssm Triton SSD not importable")
    batch, T, H, P, N, G = 2, 100, 4, 16, 16, 2
    x = torch.randn(batch, T, H, P, device=dev, generator=gen)
    args = (x, torch.randn(batch, T, H, device=dev, generator=gen), -torch.rand(H, device=dev, generator=gen) - 0.5)
    bc = tuple(torch.randn(batch, T, G, N, device=dev, generator=gen) for _ in range(2))
    kw = dict(D=torch.randn(H, device=dev, generator=gen), dt_bias=torch.randn(H, device=dev, generator=gen),
              dt_softplus=True, initial_states=torch.randn(batch, H, P, N, device=dev, generator=gen),
              return_final_states=True)
    y_k, h_k = ssd(*args, *bc, **kw, backend="mamba_ssm")
    y_t, h_t = ssd(*args, *bc, **kw, backend="triton")
    _close(y_k, y_t, rtol=1e-3, atol=1e-3)
    _close(h_k, h_t, rtol=1e-3, atol=1e-3)
    if ssm_module._load_mamba_selective_scan() is not None:
        dim = 8
        u = torch.randn(batch, dim, T, device=dev, generator=gen)
        sargs = (u, torch.randn(batch, dim, T, device=dev, generator=gen),
                 -torch.rand(dim, N, device=dev, generator=gen), torch.randn(batch, N, T, device=dev, generator=gen),
                 torch.randn(batch, N, T, device=dev, generator=gen))
        skw = dict(D=torch.randn(dim, device=dev, generator=gen), delta_softplus=True, return_last_state=True)
        out_k, last_k = selective_scan(*sargs, **skw, backend="mamba_ssm")
        out_t, last_t = selective_scan(*sargs, **skw, backend="triton")
        _close(out_k, out_t, rtol=1e-3, atol=1e-3)
        _close(last_k, last_t, rtol=1e-3, atol=1e-3)
