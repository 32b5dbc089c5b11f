"""The `moe` channel mixer against a naive per-token loop, plus balancing, capacity, upcycling and checkpoints.

Tolerances: float32 paths compare at rtol 1e-5 / atol 1e-5 (the same products summed in another order);
the bfloat16 grouped kernel against the bfloat16 loop at 2e-2. The upcycled model matches the dense one at
1e-4 (float32 rounding of the segment sums and of the scaled-by-run-length down projections).
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mmeff
from mmeff import blocks, checkpoint, config
from mmeff.backbone import Backbone
from mmeff.blocks.moe import MoE, upcycle_state
from mmeff.config import BackboneConfig, ConfigError
from mmeff.ops import routing as rt
from mmeff.tasks import build_model, build_task

TOL = dict(rtol=1e-5, atol=1e-5)


def moe(**options) -> MoE:
    torch.manual_seed(0)
    return blocks.build("moe", 16, **{"num_experts": 4, "top_k": 2, "hidden": 8, "aux_loss_coef": 0.0, **options})


def one_expert(block: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x @ block.w_in[e]
    if block.gated:
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) * up) @ block.w_out[e]
    return F.gelu(h) @ block.w_out[e]


def naive(block: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """Token by token: the weighted sum of its chosen experts (those `keep[n][j]` allows) plus the shared experts."""
    flat = x.reshape(-1, x.shape[-1])
    scores = rt.router_scores(flat @ block.router.weight.t(), block.score)
    weights, experts = rt.topk_route(scores, block.top_k, block.expert_bias, block.renormalize)
    rows = []
    for n in range(flat.shape[0]):
        chosen = [j for j in range(block.top_k) if keep is None or keep[n][j]]
        terms = [weights[n, j] * one_expert(block, int(experts[n, j]), flat[n]) for j in chosen]
        rows.append(sum(terms, flat.new_zeros(flat.shape[1])))
    y = torch.stack(rows)
    if block.shared is not None:
        y = y + block.shared(flat)
    return y.view(x.shape)


def grads(block: MoE, x: torch.Tensor, fn) -> list[torch.Tensor]:
    block.zero_grad()
    x = x.detach().requires_grad_()
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize(
    "options",
    [{}, {"score": "sigmoid", "shared_experts": 1}, {"expert": "mlp", "top_k": 3, "renormalize": False}, {"top_k": 1}],
)
def test_dropless_matches_naive_loop(options):
    block = moe(**options).eval()
    block.expert_bias.copy_(torch.tensor([0.05, -0.05, 0.0, 0.02]))
    x = torch.randn(3, 7, 16)
    for got, want in zip(grads(block, x, block), grads(block, x, lambda v: naive(block, v))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")
def test_grouped_kernel_matches_loop_bf16():
    loop, fast = moe(impl="loop").bfloat16().eval(), moe(impl="grouped").bfloat16().eval()
    x = torch.randn(4, 9, 16, dtype=torch.bfloat16)
    for got, want in zip(grads(fast, x, fast), grads(loop, x, loop)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_grouped_impl_refuses_unsupported_inputs():
    with pytest.raises(RuntimeError, match="bfloat16"):
        moe(impl="grouped")(torch.randn(2, 3, 16))


def test_capacity_drops_exactly_the_overflow():
    block = moe(capacity_factor=0.5, top_k=2).eval()
    x = torch.randn(2, 12, 16)
    n = x.shape[0] * x.shape[1]
    c = rt.capacity(n, 4, 2, 0.5)
    _, experts = rt.topk_route(rt.router_scores(x.reshape(n, -1) @ block.router.weight.t()), 2)
    used, keep = [0] * 4, [[False, False] for _ in range(n)]
    for j in range(2):  # first choices of every token fill the slots before second choices
        for t in range(n):
            e = int(experts[t, j])
            keep[t][j], used[e] = used[e] < c, used[e] + 1
    overflow = sum(max(0, u - c) for u in used)
    assert overflow > 0
    torch.testing.assert_close(block(x), naive(block, x, keep), **TOL)
    assert block.stats()["dropped"] == overflow


def test_loads_sum_to_tokens_times_k_and_stats():
    block = moe(num_experts=6, top_k=3)
    block(torch.randn(2, 10, 16))
    assert block.load.sum().item() == 20 * 3
    stats = block.stats()
    assert {"load_max_over_mean", "router_entropy", "dropped", "bias_norm", "load_5"} <= set(stats)
    assert sum(stats[f"load_{i}"] for i in range(6)) == pytest.approx(1.0)
    assert stats["load_max_over_mean"] >= 1.0 and stats["dropped"] == 0


def test_aux_free_bias_balances_a_skewed_router():
    block = moe(bias_update_rate=0.001)
    torch.manual_seed(1)
    direction = F.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        block.router.weight[0] += 2 * direction  # expert 0 is first choice for most tokens

        def batch(n: int) -> torch.Tensor:
            return torch.randn(n, 16) + 1.5 * direction

        held_out = batch(4096)
        block.eval()(held_out)
        before = block.stats()["load_max_over_mean"]
        block.train()
        for _ in range(500):
            block(batch(256))
        block.eval()(held_out)
        after = block.stats()["load_max_over_mean"]
    assert before > 1.7 and after < 1.15, (before, after)
    weights, _ = rt.topk_route(rt.router_scores(held_out @ block.router.weight.t()), 2, block.expert_bias)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4096))  # the bias never enters the mixing weights


def test_expert_choice_respects_capacity():
    block = moe(routing="expert", capacity_factor=1.0).eval()
    x = torch.randn(2, 10, 16)
    flat = x.reshape(20, 16)
    c = rt.capacity(20, 4, 2, 1.0)
    scores = rt.router_scores(flat @ block.router.weight.t())
    _, tokens = rt.expert_choice_route(scores, c)
    assert all(len(set(row.tolist())) == c for row in tokens)
    want = torch.stack([
        sum((scores[t, e] * one_expert(block, e, flat[t]) for e in range(4) if t in tokens[e].tolist()), torch.zeros(16))
        for t in range(20)
    ])
    torch.testing.assert_close(block(x), want.view(x.shape), **TOL)
    assert block.load.tolist() == [c] * 4


def test_per_layer_moe_and_errors():
    cfg = BackboneConfig(dim=16, pattern=["attn"], depth=3, ffn="moe", mixers={"attn": {"heads": 2}},
                         ffn_options={"layers": [1], "num_experts": 4, "dense": "mlp", "dense_options": {"ratio": 2.0}})
    bb = Backbone(cfg)
    assert [type(layer.ffn).__name__ for layer in bb.layers] == ["MLP", "MoE", "MLP"]
    cfg.ffn_options = {"layers": [3]}
    with pytest.raises(ConfigError, match="layer indices"):
        Backbone(cfg)
    with pytest.raises(ConfigError, match="routing"):
        blocks.build("moe", 16, routing="both")


def run_config(tmp_path: Path, ffn: str, ffn_options: dict) -> config.RunConfig:
    return config.parse({
        "name": f"{ffn}", "run_dir": str(tmp_path / "${name}"),
        "encoder": {"name": "image", "image_size": 8, "patch_size": 4},
        "backbone": {"dim": 32, "pattern": ["attn"], "depth": 2, "causal": False, "mixers": {"attn": {"heads": 2}},
                     "ffn": ffn, "ffn_options": ffn_options},
        "task": {"name": "classify", "num_classes": 10},
    })


@pytest.mark.parametrize("dense, options", [
    ({"hidden": 64}, {"num_experts": 6, "top_k": 3, "hidden": 16, "shared_experts": 1}),
    ({"hidden": 64}, {"num_experts": 8, "top_k": 4, "hidden": 16, "score": "sigmoid", "layers": [1]}),
    ({"type": "mlp", "hidden": 64, "bias": False}, {"expert": "mlp", "num_experts": 4, "top_k": 2, "hidden": 32}),
])
def test_upcycled_model_starts_at_the_dense_model(tmp_path, dense, options):
    kind = dense.pop("type", "swiglu")
    dense_cfg = run_config(tmp_path, kind, dense)
    torch.manual_seed(0)
    dense_model = build_model(dense_cfg).eval()
    path = checkpoint.export(dense_model, dense_cfg, tmp_path / "dense")
    if "layers" in options:
        options = {**options, "dense_options": dense}
    moe_model = build_model(run_config(tmp_path, "moe", options)).eval()
    checkpoint.init_from(moe_model, path)  # what `fit` does with init_from + upcycle
    moe_model.load_state_dict(upcycle_state(load_file(str(path / checkpoint.WEIGHTS)), moe_model), strict=False)
    images = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(moe_model(images), dense_model(images), rtol=1e-4, atol=1e-4)
    mixed = [m for m in moe_model.modules() if isinstance(m, MoE)]
    assert mixed and all(len({tuple(r.tolist()) for r in m.router.weight}) > 1 for m in mixed)


def test_upcycle_rejects_mismatched_sizes(tmp_path):
    dense_cfg = run_config(tmp_path, "swiglu", {"hidden": 48})
    moe_model = build_model(run_config(tmp_path, "moe", {"hidden": 32}))
    with pytest.raises(ConfigError, match="multiple of hidden"):
        upcycle_state(build_model(dense_cfg).state_dict(), moe_model)


def test_checkpoint_round_trip(tmp_path):
    cfg = run_config(tmp_path, "moe", {"num_experts": 4, "top_k": 2, "shared_experts": 1, "bias_update_rate": 0.1})
    model = build_model(cfg).train()
    model(torch.randn(3, 1, 8, 8))  # steps the balancing bias away from zero
    model.eval()
    path = checkpoint.export(model, cfg, tmp_path / "export")
    loaded = mmeff.load(path)
    images = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded(images), model(images))
    biases = [m.expert_bias for m in loaded.modules() if isinstance(m, MoE)]
    assert biases and all(b.abs().sum() > 0 for b in biases)


def test_aux_loss_reaches_the_training_loss(tmp_path):
    cfg = run_config(tmp_path, "moe", {"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.5, "z_loss_coef": 0.01})
    task = build_task(cfg).train()
    batch = {"input": torch.randn(6, 1, 8, 8), "label": torch.arange(6)}
    total = task.training_step(batch, 0)
    aux = task.aux_loss()
    assert aux is not None and aux.item() > 0.5 * 2  # two MoE layers, Switch loss >= 1 each
    torch.testing.assert_close(total, task.step(batch, "train") + aux)
    total.backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in task.model.modules() if isinstance(m, MoE))


def test_fit_upcycles_a_dense_checkpoint(tiny_config, capsys):
    """`mmeff fit` with init_from + upcycle: with no training step, the exported MoE equals the dense model."""
    from mmeff import trainer

    zero_steps = {"trainer.max_steps": 0, "trainer.logger": "none", "backbone.depth": 2}
    dense = config.load(tiny_config(**zero_steps, **{"name": "dense", "backbone.ffn_options": {"hidden": 64}}))
    trainer.fit(dense)
    sparse = config.load(tiny_config(**zero_steps, **{
        "name": "sparse", "init_from": str(dense.out_dir / "export"), "upcycle": True, "backbone.ffn": "moe",
        "backbone.ffn_options": {"num_experts": 4, "top_k": 2, "hidden": 32},
    }))
    trainer.fit(sparse)
    assert "upcycle: 8 MoE tensors" in capsys.readouterr().out  # router, w_in, w_out, expert_bias in 2 layers
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        want = mmeff.load(dense.out_dir / "export")(images)
        torch.testing.assert_close(mmeff.load(sparse.out_dir / "export")(images), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="init_from"):
        trainer.fit(config.load(tiny_config(**{"upcycle": True})))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [16, 4096])
def test_cuda_kernels_match_reference(tokens, monkeypatch):
    """The dropless layer on CUDA in bf16 at the benchmark's width: the Triton glue (dispatch, combine, SwiGLU)
    against MMEFF_FORCE_REFERENCE=1; output and every gradient within 1% relative L2 (bf16 rounding)."""
    torch.manual_seed(0)
    layer = blocks.build("moe", 1024, num_experts=64, top_k=8, hidden=512, shared_experts=1).cuda().bfloat16()
    x = torch.randn(2, tokens // 2, 1024, device="cuda", dtype=torch.bfloat16)
    results = []
    for force in ("0", "1"):
        monkeypatch.setenv("MMEFF_FORCE_REFERENCE", force)
        layer.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        y = layer(inp)
        y.float().square().mean().backward()
        results.append([t.float() for t in (y, inp.grad, *(p.grad for p in layer.parameters()))])
    for fast, reference in zip(*results):
        assert float((fast - reference).norm() / reference.norm().clamp_min(1e-12)) < 1e-2
