"""What the grid tokenizers (image patches, audio spectrogram patches or frames) share."""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

from mmeff.blocks import Layout, Tokens
from mmeff.ops import dispatch


class GridTokens(nn.Module):
    """Learned position embedding on a token grid (resampled to other grids) and optional class token."""

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        pool: Literal["cls", "mean"],
        cls_position: Literal["first", "middle", "last"],
    ) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.cls_position = cls_position
        self.pos = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        trunc_normal_(self.pos, std=0.02)
        if self.cls is not None:
            trunc_normal_(self.cls, std=0.02)

    def add_position(self, x: torch.Tensor) -> torch.Tensor:
        """Grid tokens [B, h, w, D] plus the position embedding, interpolated when (h, w) is not the trained grid."""
        B, h, w, D = x.shape
        # Exporting always resamples (as timm's resample does): a size test would fix the graph to the example's grid.
        same = not dispatch.exporting() and (h, w) == self.grid
        pos = self.pos if same else resample_abs_pos_embed(self.pos, [h, w], list(self.grid), 0)
        return x + pos.view(1, h, w, D)

    def _cls_index(self, n: int) -> int:
        return {"first": 0, "middle": n // 2, "last": n}[self.cls_position]

    def add_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, T, D] with the class token inserted at `cls_position` (unchanged under mean pooling)."""
        if self.cls is None:
            return x
        i = self._cls_index(x.shape[1])
        return torch.cat([x[:, :i], self.cls.expand(x.shape[0], -1, -1), x[:, i:]], dim=1)

    def tokens(self, grid: torch.Tensor) -> Tokens:
        """Grid tokens [B, h, w, D] (position added) -> `Tokens` in raster order with the class token and their layout.

        The layout names the grid unless a class token sits in its middle (then it is one plain sequence)."""
        B, h, w, D = grid.shape
        # Contiguous once here: the patch embedding's NHWC output is a permuted view of the conv's NCHW output, and the
        # residual adds kept that layout through the backbone, so every norm copied its input again (a profile of a
        # gla-bi ViT-S step at 224 px on the H200 had 25 strided copies, one per norm, 3.4 of its 59.7 GPU ms).
        x = self.add_cls(grid.reshape(B, h * w, D)).contiguous()
        if self.cls is not None and self.cls_position == "middle":
            return Tokens(x, Layout())
        first = self.cls is not None and self.cls_position == "first"
        return Tokens(x, Layout(grid=(1, h, w), special=int(first)))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """One vector per sample: the class token's output, or the mean over tokens."""
        if self.cls is None:
            return hidden.mean(dim=1)
        return hidden[:, self._cls_index(hidden.shape[1] - 1)]
