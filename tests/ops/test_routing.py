"""MoE routing functions: selection, loads, slot ranks, capacity, balancing losses and bias steps."""

import math

import pytest
import torch

from mmeff.ops import routing as rt


def test_topk_renormalises_and_bias_moves_selection_only():
    torch.manual_seed(0)
    scores = rt.router_scores(torch.randn(50, 6), "softmax")
    weights, experts = rt.topk_route(scores, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    assert (experts == scores.topk(2, dim=-1).indices).all()
    bias = torch.tensor([10.0, 0, 0, 0, 0, 0])
    weights, experts = rt.topk_route(scores, 2, bias=bias, renormalize=False)
    assert (experts[:, 0] == 0).all()
    torch.testing.assert_close(weights, scores.gather(-1, experts))


def test_sigmoid_scores_are_independent():
    logits = torch.randn(4, 3)
    torch.testing.assert_close(rt.router_scores(logits, "sigmoid"), logits.sigmoid())
    with pytest.raises(ValueError, match="softmax"):
        rt.router_scores(logits, "relu")


def test_load_and_slot_positions():
    experts = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    load = rt.expert_load(experts, 4)
    assert load.tolist() == [4, 3, 1, 0] and load.sum() == experts.numel()
    pos = rt.slot_positions(experts, 4)
    # first choices rank before second choices: expert 0 gets tokens 0, 1, 3 as first choice, then token 2
    assert pos.tolist() == [[0, 1], [1, 0], [0, 3], [2, 2]]


def test_capacity_bounds():
    assert rt.capacity(100, 8, 2, 1.0) == 25
    assert rt.capacity(100, 8, 2, 1.25) == math.ceil(1.25 * 200 / 8)
    assert rt.capacity(3, 8, 1, 0.1) == 1
    assert rt.capacity(10, 2, 2, 4.0) == 10


def test_expert_choice_takes_best_tokens():
    torch.manual_seed(0)
    scores = torch.rand(20, 4)
    weights, tokens = rt.expert_choice_route(scores, 5)
    assert tokens.shape == (4, 5)
    for e in range(4):
        assert set(tokens[e].tolist()) == set(scores[:, e].topk(5).indices.tolist())
        torch.testing.assert_close(weights[e], scores[tokens[e], e])


def test_switch_loss_uniform_and_collapsed():
    n, e = 64, 4
    uniform = torch.full((n, e), 1 / e)
    spread = torch.arange(n).remainder(e)[:, None]
    assert rt.switch_aux_loss(uniform, spread).item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1
    assert rt.switch_aux_loss(collapsed, torch.zeros(n, 1, dtype=torch.long)).item() == pytest.approx(e)


def test_z_loss_and_entropy():
    logits = torch.randn(8, 5)
    assert rt.z_loss(logits).item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item(), rel=1e-6)
    assert rt.router_entropy(torch.full((3, 5), 0.2)).item() == pytest.approx(math.log(5), rel=1e-6)


def test_bias_update_direction():
    bias = rt.balance_bias_update(torch.zeros(3), torch.tensor([10, 5, 0]), 0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.0, 0.1])


def test_jitter_off_and_bounded():
    x = torch.ones(1000)
    assert rt.jitter(x, 0.0) is x
    y = rt.jitter(x, 0.1)
    assert (y >= 0.9).all() and (y <= 1.1).all() and not torch.equal(x, y)
