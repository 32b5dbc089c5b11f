"""Generation: cached decoding equals full recomputation for every causal mixer and a hybrid; batching, sampling, stops."""

import pytest
import torch

from mmeff import blocks, config
from mmeff.encoders.text import ByteTokenizer
from mmeff.generate import Sampling, generate
from mmeff.tasks import build_model

SCAN = {"chunk_size": 8}  # several chunks in a prefill, so chunked prefill meets recurrent steps
# Windows and blocks smaller than the prompts, so bounded caches wrap and sparse masks bite.
MIXER_OPTIONS = {
    "attn": {"heads": 2, "kv_heads": 1},
    "sliding": {"heads": 2, "window": 6},
    "longformer": {"heads": 2, "window": 6, "global_tokens": 2},
    "sink": {"heads": 2, "sinks": 2, "window": 6},
    "bigbird": {"heads": 2, "window": 4, "block": 4, "random_blocks": 1},
    "dilated": {"heads": 2, "window": [4, None], "dilation": [1, 3]},
    "block_topk": {"heads": 2, "block": 4, "topk": 1},
    "mla": {"heads": 2, "kv_rank": 8},
    "moh": {"heads": 4, "shared_heads": 1, "active_heads": 2},
    "quant_attn": {"heads": 2, "q_block": 4, "k_block": 4},
    "mamba": SCAN,
    "mamba2": {"d_state": 16, "head_dim": 16, **SCAN},
    "hybrid_heads": {"heads": 2, "ssm_options": {"d_state": 16, "head_dim": 16, **SCAN}},
    "linear_attn": {"heads": 2, **SCAN},
    "retnet": {"heads": 2, **SCAN},
    "gla": {"heads": 2, **SCAN},
    "deltanet": {"heads": 2, **SCAN},
    "gated_deltanet": {"heads": 2, **SCAN},
    "ttt": {"heads": 2, **SCAN},
}
HYBRID = ["gla", "attn", "mamba2"]
TOK = ByteTokenizer()


def tiny_lm(pattern: list[str], seed: int = 0) -> torch.nn.Module:
    """A random 2-layer byte LM of width 32 with the given mixer pattern."""
    torch.manual_seed(seed)
    cfg = config.parse(
        {
            "encoder": {"name": "text"},
            "backbone": {
                "dim": 32, "pattern": pattern, "depth": max(2, len(pattern)), "mixers": {m: MIXER_OPTIONS[m] for m in pattern}
            },
            "task": {"name": "lm", "tie_embeddings": False},
        }
    )
    model = build_model(cfg).eval()
    with torch.no_grad():  # a sharper output distribution than the init's, so greedy choices are not near-ties
        model.head.weight.mul_(20)
    return model


PROMPTS = [TOK.encode("def f(x): return x+1"), TOK.encode("import os"), TOK.encode("xy")]


def test_every_causal_mixer_has_options_here():
    assert sorted(blocks.names("mixer")) == sorted(MIXER_OPTIONS), "add new mixers to MIXER_OPTIONS"


@pytest.mark.parametrize("pattern", [[m] for m in sorted(MIXER_OPTIONS)] + [HYBRID], ids=lambda p: "+".join(p))
def test_cached_greedy_equals_recompute_and_batch_equals_single(pattern):
    model = tiny_lm(pattern)
    greedy = Sampling(max_new_tokens=8, greedy=True)
    cached = generate(model, PROMPTS, greedy)
    assert all(len(t) == 8 for t in cached.tokens)
    assert generate(model, PROMPTS, greedy, use_cache=False).tokens == cached.tokens
    assert [generate(model, [p], greedy).tokens[0] for p in PROMPTS] == cached.tokens


def test_same_length_prompts_share_a_batch_and_equal_single():
    model = tiny_lm(["attn", "gla"])
    prompts = [TOK.encode("abcd"), TOK.encode("wxyz"), TOK.encode("a")]
    greedy = Sampling(max_new_tokens=8, greedy=True)
    assert generate(model, prompts, greedy).tokens == [generate(model, [p], greedy).tokens[0] for p in prompts]


def test_prefix_embeddings_equal_the_tokens_they_embed():
    model = tiny_lm(["attn", "mamba2"])
    head, tail = TOK.encode("def "), TOK.encode("main():")
    greedy = Sampling(max_new_tokens=6, greedy=True)
    with torch.no_grad():
        prefix = model.embed(torch.tensor([head]))
    with_prefix = generate(model, [tail], greedy, prefix_embeds=prefix)
    assert with_prefix.tokens == generate(model, [head + tail], greedy).tokens
    assert with_prefix.prefill_tokens == len(head) + len(tail)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny_lm(["attn"])
    sample = Sampling(max_new_tokens=16, temperature=1.5, top_p=0.95, repetition_penalty=1.3, seed=7)
    first = generate(model, PROMPTS[:2], sample).tokens
    assert generate(model, PROMPTS[:2], sample).tokens == first
    assert generate(model, PROMPTS[:2], Sampling(max_new_tokens=16, temperature=1.5, seed=8)).tokens != first
    top1 = Sampling(max_new_tokens=16, temperature=2.0, top_k=1, seed=3)
    assert generate(model, PROMPTS, top1).tokens == generate(model, PROMPTS, Sampling(max_new_tokens=16, greedy=True)).tokens


class Scripted(torch.nn.Module):
    """A stand-in model that emits a fixed byte string, one token per step, whatever the input."""

    def __init__(self, text: str, eos_id: int) -> None:
        super().__init__()
        self.script = torch.tensor([*text.encode(), eos_id])
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def new_cache(self):
        return [blocks.Cache()]

    def embed(self, ids):
        return ids[..., None].float()

    def hidden(self, x, cache=None, layout=None):
        if cache is None:
            return x
        cache[0].offset += x.shape[1]
        return torch.full_like(x, cache[0].offset)

    def head(self, h):
        step = h[:, 0].long() - 1  # tokens consumed after a one-token prompt
        return torch.nn.functional.one_hot(self.script[step.clamp(max=len(self.script) - 1)], TOK.vocab_size).float()


def test_stop_strings_trim_and_stream_only_final_text():
    model = Scripted("héllo\n\nworld", TOK.eos_id)
    pieces = []
    stops = Sampling(max_new_tokens=50, greedy=True, stop=["\n\n", "zz"])
    out = generate(model, [[1]], stops, TOK, on_text=lambda i, p: pieces.append(p))
    assert out.texts == ["héllo"] and "".join(pieces) == "héllo"
    assert all("\ufffd" not in p for p in pieces)  # the 2-byte 'é' is streamed whole
    full = generate(model, [[1]], Sampling(max_new_tokens=50, greedy=True), TOK)
    assert full.texts == ["héllo\n\nworld"] and TOK.eos_id not in full.tokens[0]  # <eos> ends it
    capped = generate(model, [[1]], Sampling(max_new_tokens=3, greedy=True), TOK)
    assert capped.tokens == [list("hé".encode())] and capped.decode_tokens == 3
