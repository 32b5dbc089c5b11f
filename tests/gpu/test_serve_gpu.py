"""The server's batched decoding step on the GPU: rows at different offsets stepped together under
torch.cuda.set_sync_debug_mode("error") (any op that waits for the GPU raises), with the same logits as each row
decoded alone. Skipped without CUDA (conftest).
"""

from __future__ import annotations

import pytest
import torch

from mmeff import config
from mmeff.serve.rows import step
from mmeff.tasks import build_model

pytestmark = pytest.mark.xdist_group("serve")


@pytest.mark.parametrize("mixer", ["attn", "gla"])
@torch.inference_mode()
def test_row_step_never_waits_on_the_host(mixer):
    cfg = config.parse({
        "encoder": {"name": "text", "seq_len": 512, "vocab_size": 260},
        "backbone": {"dim": 256, "depth": 2, "pattern": [mixer], "mixers": {mixer: {"heads": 4}}},
        "task": {"name": "lm"},
    })  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).cuda().eval()
    together, alone = [], []  # per row: the caches stepped with the others, and a copy decoded by itself
    for n in (5, 17, 40):
        prompt = torch.randint(1, 256, (1, n), device="cuda")
        for caches in (together, alone):
            caches.append(model.new_cache())
            model.hidden(model.embed(prompt), cache=caches[-1])

    def by_itself(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.head(model.hidden(model.embed(t[None]), cache=c)[:, -1]) for t, c in zip(tokens, alone)])

    tokens = torch.tensor([[3], [4], [5]], device="cuda")
    step(model, tokens, together)  # the first step compiles and allocates (which may synchronise)
    by_itself(tokens)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step(model, tokens + 1, together)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, by_itself(tokens + 1), atol=2e-4, rtol=2e-4)
