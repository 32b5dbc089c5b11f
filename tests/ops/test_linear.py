"""Linear-attention wrappers: hand-computed tiny cases, closed-form parallel formulas, argument checks.

Tolerances: hand cases rtol 1e-6, atol 1e-6; closed forms (fp64 reference) rtol 1e-4, atol 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff.ops import delta_rule, gated_delta_rule, gated_linear_attention, linear_attention, retention

MODES = ["chunk", "recurrent"]


def _t(values: list) -> Tensor:
    """[T, K] nested list -> [B=1, T, H=1, K] tensor."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None, :]


def _check(out: tuple, o_expected: list, s_expected: list) -> None:
    o, s = out
    torch.testing.assert_close(o[0, :, 0, 0], torch.tensor(o_expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s[0, 0, :, 0], torch.tensor(s_expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_linear_attention_by_hand(mode: str) -> None:
    # K=2, default scale 1/sqrt(2): S1 = [1,2]*3 = [3,6], o1 = (3+6)/sqrt2; S2 = S1 + [0,1]*(-1) = [3,5], o2 = 2*3/sqrt2
    out = linear_attention(
        _t([[1, 1], [2, 0]]), _t([[1, 2], [0, 1]]), _t([[3], [-1]]), mode=mode, output_final_state=True
    )
    _check(out, [9 / math.sqrt(2), 6 / math.sqrt(2)], [3, 5])


@pytest.mark.parametrize("mode", MODES)
def test_retention_by_hand(mode: str) -> None:
    # decay 0.5, S0 = 4: S1 = 0.5*4 + 2*1 = 4, o1 = 4; S2 = 0.5*4 + 1*4 = 6, o2 = 6
    out = retention(
        _t([[1], [1]]),
        _t([[2], [1]]),
        _t([[1], [4]]),
        torch.tensor([math.log(0.5)]),
        mode=mode,
        initial_state=torch.full((1, 1, 1, 1), 4.0),
        output_final_state=True,
    )
    _check(out, [4, 6], [6])


@pytest.mark.parametrize("mode", MODES)
def test_gated_linear_attention_by_hand(mode: str) -> None:
    # S0 = [2,4]; g1 = [.5, 1]: S1 = [1,4] + [1,1]*2 = [3,6], o1 = q1.S1 = 3
    # g2 = [1, .25]: S2 = [3, 1.5] + [0,1]*(-4) = [3,-2.5], o2 = 3 - 2.5 = 0.5
    out = gated_linear_attention(
        _t([[1, 0], [1, 1]]),
        _t([[1, 1], [0, 1]]),
        _t([[2], [-4]]),
        _t([[0.5, 1.0], [1.0, 0.25]]).log(),
        mode=mode,
        initial_state=torch.tensor([2.0, 4.0]).view(1, 1, 2, 1),
        output_final_state=True,
        scale=1.0,
    )
    _check(out, [3, 0.5], [3, -2.5])


@pytest.mark.parametrize("mode", MODES)
def test_delta_rule_by_hand(mode: str) -> None:
    # k1 = [1,0], beta 1, v 5: S1 = [5,0], o1 = 5
    # k2 = [.6,.8], beta .5, v 1: S1^T k2 = 3, u = .5*(1-3) = -1, S2 = [5-.6, -.8], o2 = 4.4 - .8 = 3.6
    out = delta_rule(
        _t([[1, 1], [1, 1]]),
        _t([[1, 0], [0.6, 0.8]]),
        _t([[5], [1]]),
        torch.tensor([[[1.0], [0.5]]]),
        mode=mode,
        output_final_state=True,
        scale=1.0,
    )
    _check(out, [5, 3.6], [4.4, -0.8])


@pytest.mark.parametrize("mode", MODES)
def test_gated_delta_rule_by_hand(mode: str) -> None:
    # S0 = [1,1]; g .5, k [1,0], beta 1, v 3: (I - kk^T) S0 = [0,1], *.5 = [0,.5], + [3,0] -> S1 = [3,.5], o1 = .5
    # g 1, k [0,1], beta .5, v 1.5: S2 = [3, .5 - .5*.5] + [0, .75] = [3, 1], o2 = 4
    out = gated_delta_rule(
        _t([[0, 1], [1, 1]]),
        _t([[1, 0], [0, 1]]),
        _t([[3], [1.5]]),
        torch.tensor([[[math.log(0.5)], [0.0]]]),
        torch.tensor([[[1.0], [0.5]]]),
        mode=mode,
        initial_state=torch.ones(1, 1, 2, 1),
        output_final_state=True,
        scale=1.0,
    )
    _check(out, [0.5, 4], [3, 1])


def _closed_form(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, s0: Tensor, scale: float) -> Tensor:
    """o_t = scale q_t^T (diag(exp(c_t)) S0 + sum_{s<=t} diag(exp(c_t - c_s)) k_s v_s^T), c = cumsum(log_g); fp64."""
    q, k, v, log_g, s0 = (x.double() for x in (q, k, v, log_g, s0))
    c = log_g.cumsum(dim=1)  # [B,T,H,K]
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    decay = (c[:, :, None] - c[:, None, :]).masked_fill(~causal[None, :, :, None, None], -math.inf).exp()
    scores = torch.einsum("bthk,bshk,btshk->bhts", q, k, decay)
    o = torch.einsum("bhts,bshv->bthv", scores, v) + torch.einsum("bthk,bhkv->bthv", q * c.exp(), s0)
    return scale * o


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["linear_attention", "retention", "gated_linear_attention"])
def test_additive_ops_match_closed_form(op: str, mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 50, 2, 8, 4
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v, s0 = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    common = dict(mode=mode, chunk_size=16, initial_state=s0)
    if op == "linear_attention":
        log_g = torch.zeros(B, T, H, K)
        o, _ = linear_attention(q, k, v, **common)
    elif op == "retention":
        log_decay = F.logsigmoid(torch.randn(H, generator=gen) + 2)
        log_g = log_decay[:, None].expand(B, T, H, K)
        o, _ = retention(q, k, v, log_decay, **common)
    else:
        log_g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen))
        o, _ = gated_linear_attention(q, k, v, log_g, **common)
    torch.testing.assert_close(o.double(), _closed_form(q, k, v, log_g, s0, K**-0.5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_special_cases_agree(mode: str) -> None:
    # gated delta with log_g = 0 is the delta rule; GLA with a channel-constant gate is the scalar-gated form.
    gen = torch.Generator().manual_seed(1)
    B, T, H, K = 1, 40, 2, 8
    q, v = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    o_delta, _ = delta_rule(q, k, v, beta, mode=mode, chunk_size=16)
    o_gated, _ = gated_delta_rule(q, k, v, torch.zeros(B, T, H), beta, mode=mode, chunk_size=16)
    torch.testing.assert_close(o_gated, o_delta, rtol=1e-5, atol=1e-6)
    log_decay = F.logsigmoid(torch.randn(H, generator=gen))
    o_ret, _ = retention(q, k, v, log_decay, mode=mode, chunk_size=16)
    o_gla, _ = gated_linear_attention(q, k, v, log_decay[:, None].expand(B, T, H, K), mode=mode, chunk_size=16)
    torch.testing.assert_close(o_gla, o_ret, rtol=1e-5, atol=1e-6)


def test_shape_errors() -> None:
    x = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="log_decay"):
        retention(x, x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="log_g"):
        gated_linear_attention(x, x, x, torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="log_g"):
        gated_delta_rule(x, x, x, torch.zeros(1, 3, 2, 4), torch.ones(1, 3, 2))
