"""Every mask predicate against a mask built literally from its definition, in both engines' forms."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from mmeff.ops import flex, masks

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
CPU = torch.device("cpu")


def brute(rule: Callable[[int, int, int, int], bool], B: int, H: int, q_pos: list[int], kv_pos: list[int]) -> torch.Tensor:
    """The mask [B, H, Tq, Tk] from a plain-Python rule, one pair at a time."""
    return torch.tensor(
        [[[[rule(b, h, q, kv) for kv in kv_pos] for q in q_pos] for h in range(H)] for b in range(B)], dtype=torch.bool
    )


def dense(mask: masks.MaskMod, B: int, H: int, q_pos: list[int], kv_pos: list[int]) -> torch.Tensor:
    out = masks.dense(mask, torch.tensor(q_pos), torch.tensor(kv_pos), B, H)
    return out.expand(B, H, len(q_pos), len(kv_pos))


def window_rule(w: int, causal: bool) -> Callable[[int, int, int, int], bool]:
    if causal:
        return lambda b, h, q, kv: 0 <= q - kv < w
    return lambda b, h, q, kv: abs(q - kv) <= w // 2


def global_rule(g: int, causal: bool) -> Callable[[int, int, int, int], bool]:
    if causal:
        return lambda b, h, q, kv: kv < g and kv <= q
    return lambda b, h, q, kv: kv < g or q < g


ALIGNED = (list(range(37)), list(range(37)))
DECODING = ([40, 41, 42], [0, 1, 2, 39, 33, 34, 35, 36, 37, 38, 40, 41, 42])  # a ring buffer's slot order


def static_cases() -> list[tuple[str, masks.MaskMod, Callable, int]]:
    windows, dilations = (4, 3, 2, masks.UNBOUNDED), (1, 2, 3, 5)
    cases = [("causal", masks.causal(), lambda b, h, q, kv: kv <= q, 1)]
    for causal in (True, False):
        tag = "causal" if causal else "bidir"
        for w in (1, 5, 8):
            cases.append((f"sliding{w}-{tag}", masks.sliding_window(w, causal), window_rule(w, causal), 1))
        cases.append((
            f"longformer-{tag}",
            masks.longformer(5, 2, causal),
            lambda b, h, q, kv, c=causal: window_rule(5, c)(b, h, q, kv) or global_rule(2, c)(b, h, q, kv),
            1,
        ))

        def dilated_rule(b: int, h: int, q: int, kv: int, c: bool = causal) -> bool:
            d, w, s = q - kv, windows[h], dilations[h]
            return d % s == 0 and (0 <= d < w * s if c else abs(d) <= (w // 2) * s)

        cases.append((f"dilated-{tag}", masks.dilated(windows, dilations, causal, CPU), dilated_rule, 4))
    cases.append(("sink", masks.sink(3, 6), lambda b, h, q, kv: 0 <= q - kv < 6 or (kv < 3 and kv <= q), 1))
    return cases


@pytest.mark.parametrize(
    "case, positions",
    [pytest.param(c, ALIGNED, id=f"{c[0]}-aligned") for c in static_cases()]
    + [pytest.param(c, DECODING, id=f"{c[0]}-decoding") for c in static_cases() if not c[0].endswith("bidir")],
)
def test_static_mask_matches_definition(case, positions):
    _, mask, rule, heads = case
    q_pos, kv_pos = positions
    assert torch.equal(dense(mask, 2, heads, q_pos, kv_pos), brute(rule, 2, heads, q_pos, kv_pos))


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_matches_definition(causal):
    block, count, seed, n_blocks = 4, 2, 7, 12
    table = masks.random_blocks(n_blocks, count, seed, causal)
    mask = masks.bigbird(5, 2, block, count, seed, causal, n_blocks, CPU)

    def rule(b: int, h: int, q: int, kv: int) -> bool:
        base = window_rule(5, causal)(b, h, q, kv) or global_rule(2, causal)(b, h, q, kv)
        return base or bool(table[q // block, kv // block])

    q_pos = kv_pos = list(range(45))
    assert torch.equal(dense(mask, 1, 1, q_pos, kv_pos), brute(rule, 1, 1, q_pos, kv_pos))


@pytest.mark.parametrize("causal", [True, False])
def test_random_blocks_are_seeded_and_counted(causal):
    table = masks.random_blocks(10, 3, 0, causal)
    for i, row in enumerate(table):
        pool = i if causal else 10
        assert int(row.sum()) == min(3, pool)
        if causal:
            assert not row[i:].any()  # only earlier blocks
    assert torch.equal(table, masks.random_blocks(10, 3, 0, causal))
    assert not torch.equal(table, masks.random_blocks(10, 3, 1, causal))
    if causal:  # rows never depend on the length: decoding sees what training saw
        assert torch.equal(masks.random_blocks(16, 3, 0, causal)[:10, :10], table)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_selected_blocks_matches_definition(causal, group):
    torch.manual_seed(0)
    B, H, block, q_start = 2, 3, 4, 5
    q_pos, kv_pos = list(range(q_start, q_start + 9)), list(range(14))
    first = q_start // group
    selected = torch.rand(B, H, (q_pos[-1] // group) - first + 1, 4) < 0.5

    def rule(b: int, h: int, q: int, kv: int) -> bool:
        return bool(selected[b, h, q // group - first, kv // block]) and (kv <= q or not causal)

    mask = masks.selected_blocks(selected, block, causal, group, first)
    assert torch.equal(dense(mask, B, H, q_pos, kv_pos), brute(rule, B, H, q_pos, kv_pos))


@pytest.mark.parametrize("case", static_cases()[1:], ids=lambda c: c[0])
def test_flex_engine_agrees_with_dense(case):
    """The predicates also trace under FlexAttention (vmap over scalars), not only broadcast."""
    torch.manual_seed(0)
    _, mask, _, heads = case
    q, k, v = (torch.randn(2, heads, 150, 16) for _ in range(3))
    ref = flex.attention(q, k, v, mask, per_head=heads > 1, engine="reference")
    out = flex.attention(q, k, v, mask, per_head=heads > 1, engine="flex")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _tile_table(counts: torch.Tensor, indices: torch.Tensor, kv_tiles: int) -> torch.Tensor:
    """Bool [B, H, q_tiles, kv_tiles] of the tiles a BlockMask lists (counts [B, H, q_tiles], indices [..., n])."""
    listed = torch.arange(indices.shape[-1]) < counts[..., None]
    table = torch.zeros(*counts.shape, kv_tiles + 1, dtype=torch.bool)
    return table.scatter_(-1, torch.where(listed, indices.long(), kv_tiles), True)[..., :kv_tiles]


@pytest.mark.parametrize(
    "block, group, causal, density",
    [(16, 1, False, 0.1), (64, 1, True, 0.1), (200, 1, False, 0.1), (64, 64, True, 0.9), (64, 128, True, 0.5), (32, 48, False, 0.5)],
)
def test_selection_block_mask_visits_exactly_the_selected_tiles(block, group, causal, density):
    # Every tile with an allowed pair is visited; the tiles marked full allow every pair (they skip the predicate).
    torch.manual_seed(0)
    B, H, Tq, Tk = 2, 2, 300, 300
    n_blocks, rows = -(-Tk // block), -(-Tq // group)
    selected = torch.rand(B, H, rows, n_blocks) < density
    padded = torch.nn.functional.pad(selected, (0, 4, 0, 4))
    mask = masks.selected_blocks(padded, block, causal, group)
    bm = flex.selection_block_mask(selected, block, group, mask, Tq, Tk, causal)
    kv_tile = block if block <= 64 else flex.BLOCK  # key blocks of 16, 32 or 64 are tiles themselves
    assert bm.BLOCK_SIZE == (flex.BLOCK, kv_tile)
    q_tiles, kv_tiles = flex.padded(Tq) // flex.BLOCK, -(-Tk // kv_tile)
    tiles = bm.to_dense().bool()[:, :, :q_tiles, :kv_tiles]
    allowed = masks.dense(mask, torch.arange(Tq), torch.arange(Tk), B, H).expand(B, H, Tq, Tk)
    pad = (0, kv_tiles * kv_tile - Tk, 0, flex.padded(Tq) - Tq)

    def per_tile(table: torch.Tensor) -> torch.Tensor:
        return table.unflatten(2, (-1, flex.BLOCK)).unflatten(4, (-1, kv_tile))

    assert torch.equal(tiles, per_tile(torch.nn.functional.pad(allowed, pad)).any(5).any(3))
    full = _tile_table(bm.full_kv_num_blocks, bm.full_kv_indices, kv_tiles)
    everywhere = per_tile(torch.nn.functional.pad(allowed, pad, value=True))
    assert not (full & ~everywhere.all(5).all(3)).any()
    if group == 64 and causal:  # dense selections leave whole tiles below the diagonal to skip the predicate
        assert full.any()


def test_dense_mask_broadcasts_only_where_it_varies():
    assert masks.dense(masks.sliding_window(3), torch.arange(5), torch.arange(5), 4, 8).shape == (1, 1, 5, 5)
    per_head = masks.dilated((2, 2), (1, 2), True, CPU)
    assert masks.dense(per_head, torch.arange(5), torch.arange(5), 4, 2).shape == (1, 2, 5, 5)


def test_factories_are_cached_and_validate():
    assert masks.sliding_window(8, True) is masks.sliding_window(8, True)
    assert masks.per_head([1, None], 4) == (1, masks.UNBOUNDED, 1, masks.UNBOUNDED)
    with pytest.raises(ValueError, match="window must be >= 1"):
        masks.sliding_window(0)
    with pytest.raises(ValueError, match="one window >= 1 and one dilation >= 1 per head"):
        masks.dilated((2,), (0,), True, CPU)
