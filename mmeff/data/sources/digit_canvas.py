"""Multi-label canvases: 1-6 real handwritten digit scans at random places and scales; held-out canvases use held-out scans."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.data.sources import SOURCES
from mmeff.data.sources.digit_scenes import SPLITS, compose, digit_pools

CLASSES = 10
LABELS = "labels.npy"  # the multi-hot field: uint8 [10], 1 where that digit class is on the canvas
_TRIES = 100  # placements tried per canvas before its digit sizes are drawn again


def scaled_scan(scan: np.ndarray, side: int) -> np.ndarray:
    """An 8x8 scan (values 0-16) as a side x side uint8 tile, upsampled bilinearly as the `digits` source does."""
    import torch
    import torch.nn.functional as F

    scan_ = torch.from_numpy(scan).float()[None, None]
    tile = F.interpolate(scan_, size=(side, side), mode="bilinear", align_corners=False)
    # The rest in numpy: torch's elementwise ops on one small tile cost milliseconds of thread-pool overhead each.
    return np.rint(tile[0, 0].numpy() * (255 / 16)).clip(0, 255).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image at zlib level 1: 40% faster to write than the default level 6 (10-20% larger)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def boxes(rng: np.random.Generator, sides: np.ndarray, size: int) -> list[tuple[int, int, int]] | None:
    """Disjoint (x, y, side) squares of the given sides at random positions on a size x size canvas, or None if a
    square found no free place in `_TRIES` draws."""
    placed: list[tuple[int, int, int]] = []
    for side in sides.tolist():
        for _ in range(_TRIES):
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if all(x + side <= px or px + ps <= x or y + side <= py or py + ps <= y for px, py, ps in placed):
                placed.append((x, y, side))
                break
        else:
            return None
    return placed


def canvases(
    split: str,
    count: int,
    pool: np.ndarray,
    scans: np.ndarray,
    labels: np.ndarray,
    size: int,
    digits: tuple[int, int],
    sides: tuple[int, int],
    seed: int,
) -> Iterator[dict[str, Any]]:
    """`count` samples of `split`, drawn (seeded by split) from the digit images `pool` only."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    for i in range(count):
        placed = None
        while placed is None:  # sides too large to fit together: draw them again
            n = int(rng.integers(digits[0], digits[1] + 1))
            placed = boxes(rng, rng.integers(sides[0], sides[1] + 1, size=n), size)
        chosen = rng.choice(pool, size=n, replace=False)
        classes = [int(labels[j]) for j in chosen]
        hot = np.zeros(CLASSES, dtype=np.uint8)
        hot[classes] = 1
        tiles = [scaled_scan(scans[j], side) for j, (_, _, side) in zip(chosen, placed)]
        layout = {"digits": classes, "sources": [int(j) for j in chosen], "boxes": [list(b) for b in placed]}
        yield {
            "__key__": f"{split}{i:06d}",
            "png": png(compose(tiles, [(x, y) for x, y, _ in placed], size, size)),
            LABELS: hot,
            "json": json.dumps(layout).encode(),
        }


@SOURCES.register("digit-canvas", summary=__doc__)
def build(
    out_dir: Path,
    size: int = 256,
    min_digits: int = 1,
    max_digits: int = 6,
    min_scale: float = 0.1,
    max_scale: float = 0.25,
    train: int = 20000,
    val: int = 1000,
    test: int = 2000,
    seed: int = 0,
    maxcount: int = 2000,
) -> dict[str, int]:
    """Write `png` (size x size grayscale) + `labels.npy` (multi-hot over the 10 digit classes) + `json` layout
    (digits, source image indices, boxes [x, y, side]) canvases. Each digit is a square of side `min_scale` to
    `max_scale` of the canvas, no two overlap; the 1,797 digit images are split first (stratified, as the
    `digits` source), so each split's canvases use only its own images."""
    from sklearn.datasets import load_digits

    from mmeff.data import write_shards

    if size < 16:
        raise ValueError(f"digit-canvas size {size}: use at least 16 px")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"digit-canvas digits {min_digits}..{max_digits}: need 1 <= min_digits <= max_digits")
    if not 0 < min_scale <= max_scale <= 0.5:
        raise ValueError(f"digit-canvas scales {min_scale}..{max_scale}: need 0 < min_scale <= max_scale <= 0.5")
    if max_digits * max_scale**2 > 0.5:  # rejection sampling needs room: at most half the canvas covered
        raise ValueError(
            f"digit-canvas: {max_digits} digits of up to {max_scale} of the side cover more than half the canvas; "
            "lower max_digits or max_scale"
        )
    sides = (max(1, round(min_scale * size)), round(max_scale * size))
    data = load_digits()
    pools = digit_pools(seed)
    meta = {
        "classes": [str(c) for c in range(CLASSES)],
        "multilabel": True,
        "canvas": [size, size],
        "digits": [min_digits, max_digits],
        "digit_sides": list(sides),
    }
    counts = {}
    for split, count in (("train", train), ("val", val), ("test", test)):
        if count <= 0:
            continue
        digits = (min_digits, max_digits)
        samples = canvases(split, count, pools[split], data.images, data.target, size, digits, sides, seed)
        write_shards(samples, out_dir, split, maxcount=maxcount, meta=meta, total=count)
        counts[split] = count
    return counts
