"""The FSDP2 plan of `trainer.strategy: fsdp` in one process (issue 23): one shard unit per backbone layer in a fake
two-rank world, and in a one-rank gloo world the mixers with Triton paths and the grouped-GEMM MoE see whole plain
tensors inside their forward (what their kernels take on one device) and compute what the plain model computes,
with activation checkpointing; the gathered weights load into a plain model."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from mmeff import config
from mmeff.backbone import Backbone
from mmeff.config import FSDPConfig
from mmeff.ops.recompute import saved_storages
from mmeff.strategies import full_state_dict, shard_model
from mmeff.tasks import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

MIXERS = {  # the mixers with Triton or fused CUDA paths, small
    "attn": {"heads": 2},
    "gla": {"heads": 2, "chunk_size": 8},
    "deltanet": {"heads": 2, "chunk_size": 8},
    "gated_deltanet": {"heads": 2, "chunk_size": 8},
    "retnet": {"heads": 2},
    "mamba2": {"d_state": 8, "head_dim": 16, "chunk_size": 8},
    "mamba": {"d_state": 4, "chunk_size": 8},
}
LM = {
    "encoder": {"name": "text", "seq_len": 16},
    "backbone": {"dim": 32, "pattern": ["gla", "attn"], "depth": 4, "mixers": {"gla": {"heads": 2}, "attn": {"heads": 2}}},
    "task": {"name": "lm"},
}


@pytest.fixture
def world(request):
    """A process group of this process alone: `fake` pretends to be rank 0 of 2 (collectives do nothing), `gloo` is a
    real world of one."""
    backend, size = request.param
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=size)
    try:
        yield init_device_mesh("cpu", (size,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [("fake", 2)], indirect=True)
def test_each_layer_is_a_shard_unit(world):
    model = build_model(config.parse(LM))
    shard_model(model, world, FSDPConfig())
    assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in model.backbone.layers)
    assert model.head.weight is model.encoder.embed.weight  # the tied head stays tied, in the root unit
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
        assert p.to_local().shape[0] == (p.shape[0] + 1) // 2, name  # half of the rows on this rank (padded)
    shard_model(model, world, FSDPConfig())  # a second call (fit, then test) changes nothing


@pytest.mark.parametrize("world", [("gloo", 1)], indirect=True)
def test_mixers_and_moe_compute_on_plain_weights(world):
    torch.manual_seed(0)
    cfg = {"dim": 32, "pattern": list(MIXERS), "mixers": MIXERS, "ffn": "moe", "checkpoint": True,
           "ffn_options": {"num_experts": 4, "top_k": 2, "hidden": 16, "impl": "grouped"}}
    plain = Backbone(cfg)
    sharded = copy.deepcopy(plain)
    # bfloat16 weights, as torch._grouped_mm takes (it runs on CPU too); the plain model computes in bfloat16 too.
    shard_model(sharded, world, FSDPConfig(param_dtype="bfloat16", reduce_dtype="float32"))
    for p in plain.parameters():  # weights in bfloat16 as FSDP gathers them; buffers stay float32 as in FSDP
        p.data = p.data.bfloat16()
    seen = []

    def check(module, args):
        seen.extend(type(p).__name__ for p in module.parameters(recurse=False))

    for module in sharded.modules():
        module.register_forward_pre_hook(check)
    x = torch.randn(2, 16, 32)
    y_plain, y = plain(x.bfloat16()), sharded(x)
    assert y.dtype == torch.float32  # the root's output policy
    torch.testing.assert_close(y, y_plain.float())
    y_plain.float().square().mean().backward()
    y.square().mean().backward()
    assert seen and set(seen) == {"Parameter"}  # no DTensor reaches a mixer's or expert's own forward
    grads = dict(plain.named_parameters())
    for name, p in sharded.named_parameters():
        assert p.grad.dtype == torch.float32, name  # reduced in float32 onto the float32 shards
        torch.testing.assert_close(p.grad.full_tensor(), grads[name].grad.float(), msg=name)
    state = full_state_dict(sharded)
    assert Backbone(cfg).load_state_dict(state) and not any(isinstance(t, DTensor) for t in state.values())


@pytest.mark.parametrize("causal", [True, False])  # false: gla scans both ways, its route copies regathered
def test_activation_checkpointing_keeps_outputs_and_gradients(causal):
    # Equal gradients, and fewer bytes kept for the backward: the whole layer recomputed (true) keeps the least, the
    # token mixer only ("mixer") less than no checkpointing, the pre-norms' outputs made again ("norm") less too.
    # mamba2 and gated_deltanet: their short conv's output made again in the backward (ShortConv.made_again), and
    # gated_deltanet's l2-mapped q and k (recomputed_output), inside the recomputed mixer too
    mixers = {"gla": {"heads": 2}, "mamba2": {"d_state": 8, "head_dim": 16}, "gated_deltanet": {"heads": 2}, "attn": {"heads": 2}}
    cfg = {"dim": 32, "pattern": ["gla", "mamba2", "gated_deltanet", "attn"], "mixers": mixers, "causal": causal}
    torch.manual_seed(0)
    weights = Backbone(cfg).state_dict()
    x = torch.randn(2, 16, 32)
    kept, grads = {}, {}
    for setting in (False, "mixer", "norm", True):
        model = Backbone({**cfg, "checkpoint": setting})
        model.load_state_dict(weights)
        with saved_storages() as saved:  # storages: a recipe's input (x, which the norm keeps too) counts once
            loss = model(x).square().mean()
        kept[setting] = sum(t.untyped_storage().nbytes() for t in saved.values())
        del saved
        loss.backward()
        grads[setting] = {name: p.grad for name, p in model.named_parameters()}
    assert kept[True] < kept["mixer"] < kept[False], kept
    assert kept["norm"] < kept[False], kept  # exactly the norms' outputs on the kernel path: test_norm_projection.py
    for setting in ("mixer", "norm", True):
        for name, grad in grads[False].items():
            torch.testing.assert_close(grads[setting][name], grad, msg=f"{setting}: {name}")


def test_checkpointing_refuses_moe_bias_balancing():
    moe = {"ffn": "moe", "ffn_options": {"bias_update_rate": 0.1}}
    with pytest.raises(config.ConfigError, match="backbone.checkpoint: .*bias_update_rate"):
        Backbone({**moe, "checkpoint": True})
    Backbone({**moe, "checkpoint": "mixer"})  # the MoE layer is not recomputed
    Backbone(moe)
    with pytest.raises(config.ConfigError, match="backbone.checkpoint: got 'ffn'"):
        Backbone({"checkpoint": "ffn"})


def test_fsdp_strategy_from_the_config(tiny_config):
    from mmeff.strategies import FSDP
    from mmeff.trainer import build_trainer

    cfg = config.load(tiny_config(**{"trainer.strategy": "fsdp", "trainer.fsdp": {"cpu_offload": True}}))
    strategy = build_trainer(cfg).strategy
    assert isinstance(strategy, FSDP) and strategy.fsdp.cpu_offload and strategy.fsdp.param_dtype == "bfloat16"
    with pytest.raises(config.ConfigError, match="trainer.fsdp.param_dtype: got 'bf16'"):
        config.load(tiny_config(**{"trainer.strategy": "fsdp", "trainer.fsdp": {"param_dtype": "bf16"}}))


def test_sharded_checkpoint_folders_are_replaced_whole_and_recovered(tmp_path):
    from mmeff.strategies import replace_folder
    from mmeff.trainer import _remove_partial_checkpoints

    def folder(name: str, tag: str):
        path = tmp_path / name
        path.mkdir()
        for file in (".metadata", "meta.pt", "__0_0.distcp"):
            (path / file).write_text(tag)
        return path

    last = folder("last.ckpt", "old")
    replace_folder(folder(".last.ckpt.partial", "new"), last)
    assert (last / "meta.pt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # A kill between replace_folder's two renames: the old checkpoint aside, the new one still partial.
    last.rename(tmp_path / ".last.ckpt.old")
    folder(".last.ckpt.partial", "newer")
    _remove_partial_checkpoints(tmp_path)
    assert (last / "meta.pt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_1b_fsdp_config_is_the_benchmark_model():
    cfg = config.load(Path(__file__).parents[2] / "configs" / "text" / "gpu_1b_hybrid_fsdp.yaml")
    assert cfg.trainer.strategy == "fsdp" and cfg.backbone.checkpoint and cfg.data.resampled
    with torch.device("meta"):  # counted without allocating 4 GB
        params = sum(p.numel() for p in build_model(cfg).parameters())
    assert 1.1e9 < params < 1.3e9  # 1.2B
