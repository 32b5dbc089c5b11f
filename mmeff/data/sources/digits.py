"""scikit-learn's 1,797 real 8x8 handwritten digit scans, upsampled to size x size grayscale PNGs."""

from __future__ import annotations

from pathlib import Path

from mmeff.data.shards import write_shards
from mmeff.data.sources import SOURCES, split_indices


@SOURCES.register("digits", summary=__doc__)
def build(out_dir: Path, size: int = 32, maxcount: int = 64, seed: int = 0) -> dict[str, int]:
    """Write the digits as `png` (size x size, uint8) + `cls` shards, split 72/8/20 train/val/test."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = torch.from_numpy(digits.images).float()[:, None]  # [N, 1, 8, 8], intensities 0..16
    images = F.interpolate(scans, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    images = (images * (255 / 16)).round().clamp(0, 255).to(torch.uint8).numpy()
    labels = digits.target
    counts = {}
    for split, indices in split_indices(labels, seed=seed).items():
        samples = ({"__key__": f"digit{i:04d}", "png": images[i], "cls": int(labels[i])} for i in indices)
        meta = {"classes": [str(c) for c in range(10)]}
        write_shards(samples, out_dir, split, maxcount=maxcount, meta=meta)
        counts[split] = len(indices)
    return counts
