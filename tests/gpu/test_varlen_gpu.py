"""Packed documents on the GPU without host syncs: torch's varlen_attn against per-document SDPA (forward and every
gradient), and a training step of a packed LM whose layout carries host bounds running under
torch.cuda.set_sync_debug_mode("error") (any op that waits for the GPU raises). Skipped without CUDA (conftest).

Tolerance (bf16 inputs, fp32 reference on the same rounded inputs): ||fast - ref|| / ||ref|| < 1e-2 per tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmeff import config
from mmeff.ops import varlen_attention
from mmeff.ops.varlen import cu_seqlens_to, doc_bounds, per_document
from mmeff.tasks import build_model

pytestmark = pytest.mark.xdist_group("varlen")


def _docs(batch: int, length: int, cuts: list[list[int]]) -> torch.Tensor:
    docs = torch.zeros(batch, length, dtype=torch.long)
    for row, starts in enumerate(cuts):
        for s in starts:
            docs[row, s:] += 1
    return docs


@pytest.mark.skipif(varlen_attention._module() is None, reason="torch < 2.10 has no varlen_attn")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_attention_matches_per_document_sdpa(causal, kv_heads):
    B, H, T, D = 2, 8, 1024, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, D, device="cuda", generator=gen).bfloat16().transpose(1, 2)  # the projections' layout
    k, v = (torch.randn(B, T, kv_heads, D, device="cuda", generator=gen).bfloat16().transpose(1, 2) for _ in range(2))
    bounds = doc_bounds(_docs(B, T, [[1, 300, 301, 777], [512]]))  # a one-token document among them
    cu = cu_seqlens_to(bounds, "cuda")
    assert varlen_attention.wants_varlen(q, k)

    def reference(q, k, v):
        return (F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != H),)

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    fast = varlen_attention.attention(*leaves, cu, causal, scale=None)
    grad = torch.randn(fast.shape, device="cuda", generator=gen)
    fast_grads = torch.autograd.grad(fast.float(), leaves, grad)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = per_document(reference, bounds, *ref_leaves)[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    for name, a, b in [("o", fast, ref), *zip(("dq", "dk", "dv"), fast_grads, ref_grads)]:
        err = ((a.float() - b).norm() / b.norm()).item()
        assert err < 1e-2, f"{name}: {err:.2e}"


def test_packed_lm_step_never_waits_on_the_host():
    cfg = config.parse({
        "encoder": {"name": "text", "seq_len": 2048, "vocab_size": 260},
        "backbone": {"dim": 256, "pattern": ["gla", "attn", "mamba2", "gated_deltanet"],
                     "mixers": {"attn": {"heads": 4}, "gla": {"heads": 4}, "gated_deltanet": {"heads": 4}}},
        "task": {"name": "lm"},
    })  # fmt: skip
    model = build_model(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    B, T = 2, 2048
    docs = _docs(B, T, [[100, 900, 901], [1500]])
    tokens = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))

    def step() -> torch.Tensor:
        bounds = doc_bounds(docs)  # on the host, as the task's on_before_batch_transfer does
        x, d = tokens.cuda(non_blocking=True), docs.cuda(non_blocking=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(model(x, docs=d, bounds=bounds).flatten(0, 1).float(), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first = step()  # compiles and tunes (which synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(first) and torch.isfinite(second)
