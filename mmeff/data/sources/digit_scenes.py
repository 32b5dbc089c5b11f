"""Captioned scenes of 1-4 real handwritten digits (scikit-learn's) in a row; held-out scenes use only held-out digit images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.data.sources import SOURCES

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("layout", "words")
PLACEMENTS = ("slots", "free")
SPLITS = ("train", "val", "test")


def caption(digits: list[int], style: str = "layout") -> str:
    """The caption of digits read left to right: 'three digits: 4, 1 and 7 from left to right' ('layout'),
    or 'four one seven' ('words')."""
    if style == "words":
        return " ".join(NUMBER_WORDS[d] for d in digits)
    if style != "layout":
        raise ValueError(f"digit-scenes style {style!r}: expected one of {', '.join(STYLES)}")
    n = len(digits)
    if n == 1:
        return f"one digit: {digits[0]}"
    listed = ", ".join(str(d) for d in digits[:-1]) + f" and {digits[-1]}"
    return f"{NUMBER_WORDS[n]} digits: {listed} from left to right"


def digit_pools(seed: int = 0) -> dict[str, np.ndarray]:
    """Indices into `load_digits()` of the digit images each split's scenes are drawn from (a stratified
    72/8/20 split, the same as the `digits` source): no image serves two splits."""
    from sklearn.datasets import load_digits

    from mmeff.data.sources import split_indices

    return split_indices(load_digits().target, seed=seed)


def digit_tiles(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tiles [1797, size, size] uint8, labels [1797]): the 8x8 scans upsampled bilinearly as the `digits` source does."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = torch.from_numpy(digits.images).float()[:, None]
    tiles = F.interpolate(scans, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return (tiles * (255 / 16)).round().clamp(0, 255).to(torch.uint8).numpy(), digits.target


def layout(
    rng: np.random.Generator, n: int, height: int, width: int, size: int, placement: str = "slots"
) -> list[tuple[int, int]]:
    """(x, y) top-left corners of `n` size x size tiles in a row, left to right, never overlapping, at random
    heights. 'slots': in `n` of the width // size columns of tile width (a sorted random choice, so gaps vary);
    'free': at any x."""
    ys = rng.integers(0, height - size + 1, size=n)
    if placement == "slots":
        xs = np.sort(rng.choice(width // size, size=n, replace=False)) * size
    elif placement == "free":
        # sorted offsets into the free space: the i-th tile starts after i tiles + gaps[i]
        xs = np.arange(n) * size + np.sort(rng.integers(0, width - n * size + 1, size=n))
    else:
        raise ValueError(f"digit-scenes placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
    return [(int(x), int(y)) for x, y in zip(xs, ys)]


def compose(tiles: list[np.ndarray], corners: list[tuple[int, int]], height: int, width: int) -> np.ndarray:
    """A height x width uint8 canvas with each tile drawn at its corner (brightest pixel wins)."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    for tile, (x, y) in zip(tiles, corners):
        s = tile.shape[0]
        np.maximum(canvas[y : y + s, x : x + s], tile, out=canvas[y : y + s, x : x + s])
    return canvas


def scenes(
    split: str,
    count: int,
    pool: np.ndarray,
    tiles: np.ndarray,
    labels: np.ndarray,
    height: int,
    width: int,
    min_digits: int,
    max_digits: int,
    style: str,
    seed: int,
    placement: str = "slots",
) -> Any:
    """`count` samples of `split`, drawn (seeded by split) from the digit images `pool` only."""
    rng = np.random.default_rng([seed, SPLITS.index(split) if split in SPLITS else len(split)])
    size = tiles.shape[1]
    for i in range(count):
        n = int(rng.integers(min_digits, max_digits + 1))
        chosen = rng.choice(pool, size=n, replace=False)
        corners = layout(rng, n, height, width, size, placement)
        digits = [int(labels[j]) for j in chosen]
        info = {"digits": digits, "sources": [int(j) for j in chosen], "corners": [list(c) for c in corners]}
        yield {
            "__key__": f"{split}{i:06d}",
            "png": compose([tiles[j] for j in chosen], corners, height, width),
            "txt": caption(digits, style),
            "json": json.dumps(info).encode(),
        }


@SOURCES.register("digit-scenes", summary=__doc__)
def build(
    out_dir: Path,
    height: int = 16,
    width: int = 64,
    digit_size: int = 16,
    min_digits: int = 1,
    max_digits: int = 4,
    train: int = 16000,
    val: int = 500,
    test: int = 1000,
    style: str = "layout",
    placement: str = "slots",
    seed: int = 0,
    maxcount: int = 2000,
) -> dict[str, int]:
    """Write `png` (height x width grayscale) + `txt` caption (+ `json`: digits, source image indices, corners)
    scenes; the 1,797 digit images are split first (stratified), so each split's scenes use only its own images.
    `placement` 'slots' puts the digits in tile-wide columns (gaps of whole columns), 'free' anywhere in the row."""
    from mmeff.data import write_shards

    if style not in STYLES:
        raise ValueError(f"digit-scenes style {style!r}: expected one of {', '.join(STYLES)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"digit-scenes placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
    if not 1 <= min_digits <= max_digits or max_digits * digit_size > width or digit_size > height:
        raise ValueError(
            f"digit-scenes: {min_digits}..{max_digits} digits of {digit_size}px do not fit a {height}x{width} canvas"
        )
    tiles, labels = digit_tiles(digit_size)
    pools = digit_pools(seed)
    meta = {"style": style, "placement": placement, "canvas": [height, width], "digit_size": digit_size, "digits": [min_digits, max_digits]}
    counts = {}
    for split, count in (("train", train), ("val", val), ("test", test)):
        if count <= 0:
            continue
        samples = scenes(split, count, pools[split], tiles, labels, height, width, min_digits, max_digits, style, seed, placement)
        write_shards(samples, out_dir, split, maxcount=maxcount, meta=meta, total=count)
        counts[split] = count
    return counts
