"""The token layout: what travels with tokens [B, T, D] from the tokenizer through every mixer.

Encoders emit `Tokens(x, layout)`; the backbone hands `layout` to each token mixer, which reads what
it needs: document boundaries of packed sequences, the prefix-LM prefix, the token grid of images
and audio, the position of the first token. Nothing of it is copied into mixer options or kept on a
module between calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from mmeff.ops.varlen import check_bounds, cu_seqlens_from_docs, cu_seqlens_to, host_bounds

T = TypeVar("T")


class cached_property(Generic[T]):  # noqa: N801 (named as the functools descriptor it replaces)
    """functools.cached_property without its lock, as Python 3.12 made it.

    On Python 3.11 functools' version enters an RLock that torch.compile cannot trace: a Layout made inside a
    compiled model (every encoder makes one) broke the graph in every mixer that read `cu_seqlens`, and the resumed
    frames recompiled at every step until dynamo gave up on them. Under tracing the value is computed, not stored.
    """

    def __init__(self, fn: Callable[[Any], T]) -> None:
        self.fn, self.__doc__ = fn, fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> T:
        if obj is None:
            return self  # type: ignore[return-value]
        if torch.compiler.is_compiling():  # dynamo cannot store into a frozen dataclass; the graph reuses the ops
            return self.fn(obj)
        value = obj.__dict__[self.name] = self.fn(obj)  # the instance's own value from now on (no __set__ here)
        return value


@dataclass(frozen=True, eq=False)
class Layout:
    """Per-batch token layout.

    - `docs` [B, T]: document id per token of packed sequences; a document is a run of equal ids
      along a row, and packed documents never see each other in any mixer (None: one document per row).
    - `prefix`: leading tokens that see each other both ways in a causal model (prefix LM).
    - `grid` (t, h, w): tokens `special .. special + t*h*w` are this grid in raster order (images,
      spectrogram patches, video); `special` leading tokens (class tokens) are not part of it.
    - `offset`: position of the first token (RoPE and windows continue from it).
    - `bounds`: the documents' boundaries over the flattened B*T tokens as host integers (`doc_bounds` of `docs`
      while they are still on the CPU): with them no mixer reads the boundaries back from the GPU, a host sync
      that stalls the step (None: found from `docs` once per layout).
    """

    docs: Tensor | None = None
    prefix: int = 0
    grid: tuple[int, int, int] | None = None
    special: int = 0
    offset: int = 0
    bounds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.docs is not None and self.docs.dim() != 2:
            raise ValueError(f"Layout.docs must be [B, T], got {tuple(self.docs.shape)}")
        if self.grid is not None and (len(self.grid) != 3 or min(self.grid) < 1):
            raise ValueError(f"Layout.grid must be (t, h, w) of positive sizes, got {self.grid!r}")
        if self.grid is not None:  # a tuple whatever sequence was given: the scan routes key their plans on it
            object.__setattr__(self, "grid", tuple(self.grid))
        if min(self.prefix, self.special, self.offset) < 0:
            raise ValueError(f"Layout prefix, special and offset must be >= 0, got {self.prefix}, {self.special}, {self.offset}")
        if self.bounds is not None:
            if self.docs is None:
                raise ValueError("Layout.bounds describe the documents of Layout.docs, which is None")
            object.__setattr__(self, "bounds", tuple(check_bounds(self.bounds)))
            if not self.bounds or self.bounds[-1] != self.docs.numel():
                raise ValueError(f"Layout.bounds must end at the {self.docs.numel()} tokens of docs {tuple(self.docs.shape)}, "
                                 f"got {len(self.bounds)} bounds ending at {self.bounds[-1] if self.bounds else None}")  # fmt: skip

    def replace(self, **changes: object) -> Layout:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def check(self, batch: int, length: int) -> None:
        """Raise a ValueError naming the mismatch unless this layout describes tokens [batch, length, ...]."""
        if self.docs is not None and tuple(self.docs.shape) != (batch, length):
            raise ValueError(f"layout docs must be [B, T] = {(batch, length)}, got {tuple(self.docs.shape)}")
        if self.grid is not None and self.special + self.grid_tokens > length:
            raise ValueError(f"layout grid {self.grid} after {self.special} special tokens needs {self.special + self.grid_tokens} tokens, got {length}")

    @property
    def grid_tokens(self) -> int:
        """Number of grid tokens (0 without a grid)."""
        return 0 if self.grid is None else self.grid[0] * self.grid[1] * self.grid[2]

    @cached_property
    def starts(self) -> Tensor | None:
        """[B, T] bool: the first token of each document (None without `docs`)."""
        if self.docs is None:
            return None
        first = torch.ones_like(self.docs[:, :1], dtype=torch.bool)
        return torch.cat([first, self.docs[:, 1:] != self.docs[:, :-1]], dim=1)

    def positions(self, length: int, device: torch.device) -> Tensor:
        """Positions of the tokens: [T] from `offset`, or [B, T] restarting at each document (a packed document
        sits at the positions it would have alone)."""
        if self.docs is None:
            return torch.arange(self.offset, self.offset + length, device=device)
        index = torch.arange(length, device=device).expand_as(self.docs)
        first = torch.where(self.starts, index, torch.zeros_like(index)).cummax(dim=1).values
        return self.offset + index - first

    @cached_property
    def cu_seqlens(self) -> Tensor | None:
        """int32 [N + 1]: document boundaries over the flattened B*T tokens (None without `docs`)."""
        if self.docs is None:
            return None
        if self.bounds is None or torch.compiler.is_compiling():
            return cu_seqlens_from_docs(self.docs)
        return cu_seqlens_to(self.bounds, self.docs.device)

    @cached_property
    def host_bounds(self) -> tuple[int, ...]:
        """`cu_seqlens` as host integers: `bounds`, else read back from the GPU once (a host sync; needs `docs`)."""
        if self.docs is None:
            raise ValueError("Layout.host_bounds needs docs")
        return self.bounds or tuple(host_bounds(self.cu_seqlens))


@dataclass
class Tokens:
    """Token embeddings [B, T, D] and their layout: what an encoder hands the backbone."""

    x: Tensor
    layout: Layout = field(default_factory=Layout)
