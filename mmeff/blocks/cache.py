"""Decoding state a token mixer fills on prefill and reuses step by step."""

from __future__ import annotations

import torch


class Cache(dict):
    """Per-layer decoding state: tensors by name (KV, recurrent state, conv state) plus `offset`.

    `offset` counts the tokens already consumed, so positions (RoPE, windows) continue correctly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0

    def nbytes(self) -> int:
        """Bytes held by the tensors of this cache, including those of nested caches (hybrid mixers)."""
        return sum(
            v.numel() * v.element_size() if isinstance(v, torch.Tensor) else v.nbytes()
            for v in self.values()
            if isinstance(v, (torch.Tensor, Cache))
        )
