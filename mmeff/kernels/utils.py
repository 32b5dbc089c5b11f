"""Shared pieces of the linear-recurrence kernels: packed-sequence chunk metadata, launch configs, tile helpers.

Every kernel works on the packed layout [1, T_total, H, D] with `cu_seqlens` marking sequence starts
(a fixed-length batch [B, T] is B sequences of length T), so one code path serves both.

Hopper note: Triton 3.4 to 3.7.0 miscompiles `tl.dot(tl.trans(x), y)` when x is itself the result of a
`tl.dot` (fla issues #640, #984). The kernels therefore never transpose a computed tile: a transposed
operand is either loaded transposed from memory or computed directly in transposed form.
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.autotuner import Autotuner

from mmeff.kernels import launch
from mmeff.kernels.launch import INTERPRET, Launcher, jit
from mmeff.ops.varlen import host_bounds, to_device, version

# Gate kinds (constexpr GATE): no decay, one log decay per head and step, one per key channel. Compiled
# kernels may read globals only as tl.constexpr; the host passes and compares their plain `.value`.
NO_GATE, SCALAR_GATE, KEY_GATE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# Sub-chunk length inside a chunk (GLA's pairwise decays).
SUB = 16
# Tests set this: every buffer the kernels allocate starts as NaN, so an element left unwritten shows.
POISON = False


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A new buffer for a kernel to fill (NaN-filled when POISON is set)."""
    if POISON:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def last_dim_contiguous(x: Tensor) -> Tensor:
    """x itself if its last dimension is contiguous (a view the kernels read through its other strides), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def key_stride(k: Tensor) -> int:
    """Stride between the token rows of packed keys or queries [1, T, HK, K] (see kernels.pack)."""
    return k.stride(1)


def rows_of(x: Tensor) -> Tensor:
    """x seen as rows [-1, x.shape[-1]] with a dense last dimension and one row stride (a view of a wider tensor's
    columns, as Mamba-2's slices of its in_proj output, stays a view), else a contiguous copy of it."""
    try:
        rows = x.view(-1, x.shape[-1])
    except RuntimeError:  # leading dimensions that do not merge
        return x.contiguous().view(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def pinning_requested() -> bool:
    """Whether MMEFF_TRITON_PIN=1 asks every autotuned kernel to run its first config only (see autotune)."""
    return os.environ.get("MMEFF_TRITON_PIN") == "1"


# Every autotuned kernel of the package with its full config list and whether it prunes, for pin_configs.
_TUNED: list[tuple[Autotuner, list[triton.Config], bool]] = []
_PINNED = [pinning_requested()]


def autotune(configs: Sequence[triton.Config], key: list[str], prune: Optional[Callable[..., list]] = None):
    """triton.autotune over `configs`, whose first one that `prune` keeps is the pinned config. MMEFF_TRITON_PIN=1
    at import (or pin_configs) runs that one only: one compile per shape, no choice among builds (tests,
    compile-bound runs); the interpreter, which cannot benchmark, runs the first config. `prune(configs,
    named_args, **constexprs)` drops the configs a launch must not use (Hopper miscompiles), pinned or not. The tuner
    is launched through a Launcher (mmeff.kernels.launch): its compiled kernel per call key is launched directly."""
    configs = list(configs)

    def select(candidates: list, named_args: dict, **constexprs: object) -> list:
        kept = prune(candidates, named_args, **constexprs) if prune else candidates
        return kept[:1] if _PINNED[0] else kept

    def wrap(fn: Callable) -> Launcher:
        tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": select})(fn)
        _TUNED.append((tuner, configs, prune is not None))
        _set(tuner, configs, prune is not None)
        return Launcher(tuner)

    return wrap


def _set(tuner: Autotuner, configs: list[triton.Config], prunes: bool) -> None:
    # Triton prunes only kernels with several configs: a pruning kernel keeps them all and `select` pins.
    tuner.configs = configs[:1] if INTERPRET or (_PINNED[0] and not prunes) else configs


def pin_configs(pinned: bool) -> None:
    """Run every autotuned kernel on its first safe config only (True) or tune over all of them again (False).
    Each kernel forgets the configs it chose so far: its choices per launch key were made under the other mode."""
    _PINNED[0] = pinned
    for tuner, configs, prunes in _TUNED:
        _set(tuner, configs, prunes)
        tuner.cache.clear()
    launch.clear()  # the compiled kernels kept for direct launches were chosen in the other mode


def warps(*choices: int) -> list[triton.Config]:
    """One config per (num_warps, num_stages) choice, given as num_warps * 10 + num_stages."""
    return [triton.Config({}, num_warps=c // 10, num_stages=c % 10) for c in choices]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host integers. triton.cdiv is a constexpr_function, whose wrapper costs about 2 us a call on
    the host (against 0.03 us here, on this repository's CPU machine); a training step computes hundreds of grids."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n >= 1 (triton.next_power_of_2 without its constexpr_function wrapper, see cdiv)."""
    return 1 << (n - 1).bit_length()


def pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= n and >= floor (tl.dot needs every dimension >= 16)."""
    return max(floor, next_pow2(n))


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 for fp32 inputs (parity), tensor-core default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class Chunks:
    """Chunk layout of a packed batch: sequence bounds and, per global chunk, its sequence and index."""

    cu_seqlens: Tensor  # int32 [N+1]
    indices: Tensor  # int32 [NT, 2]: (sequence, chunk within the sequence)
    offsets: Tensor  # int32 [N]: global index of each sequence's first chunk
    num_seqs: int
    num_chunks: int
    size: int
    max_len: int


def _device_key(device: torch.device) -> torch.device:
    """Cache key of the device (its index made explicit)."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device())


# One thread that makes the cached layouts of CUDA calls (see _made_for_cache).
_LAYOUTS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmeff-layouts")


def _made_for_cache(build: Callable[..., Chunks], *args: object, device: torch.device, shared: bool) -> Chunks:
    """build(*args, device), for a cache that later calls read. On CUDA it runs on a thread of its own, on that
    thread's default stream after the calling stream's work so far, and the calling stream waits for it (`shared`:
    the host too, as the entry may be read from any stream). So the entry is not allocated where the calling
    thread's allocations go: Inductor's CUDA graph trees (torch.compile mode "reduce-overhead") send those into a
    graph's private pool while they warm it up, and refuse live tensors there that the graph does not output
    ("Detected 3 tensor(s) in the cudagraph pool not tracked as outputs": a fixed layout's three on an H100,
    tests/gpu/test_cuda_graphs_gpu.py)."""
    if device.type != "cuda":
        return build(*args, device)
    caller = torch.cuda.current_stream(device)
    ready = torch.cuda.Event()
    ready.record(caller)

    def made() -> tuple[Chunks, torch.cuda.Event]:
        with torch.cuda.device(device):
            torch.cuda.current_stream().wait_event(ready)  # cu_seqlens as the calling stream leaves it
            chunks = build(*args, device)
            done = torch.cuda.Event()
            done.record()
            if shared:
                done.synchronize()
            return chunks, done

    chunks, done = _LAYOUTS.submit(made).result()
    caller.wait_event(done)
    return chunks


def _build_fixed_chunks(batch: int, seqlen: int, size: int, device: torch.device) -> Chunks:
    """Chunk layout of `batch` sequences of `seqlen` steps."""
    per = cdiv(seqlen, size)
    seq = torch.arange(batch + 1, dtype=torch.int32, device=device)
    idx = torch.arange(per, dtype=torch.int32, device=device)
    return Chunks(
        cu_seqlens=seq * seqlen,
        indices=torch.stack([seq[:-1].repeat_interleave(per), idx.repeat(batch)], dim=1).contiguous(),
        offsets=seq[:-1] * per,
        num_seqs=batch,
        num_chunks=batch * per,
        size=size,
        max_len=seqlen,
    )


@lru_cache(maxsize=64)
def _cached_fixed_chunks(batch: int, seqlen: int, size: int, device: torch.device) -> Chunks:
    return _made_for_cache(_build_fixed_chunks, batch, seqlen, size, device=device, shared=True)


def make_chunks(cu_seqlens: Optional[Tensor], batch: int, seqlen: int, size: int, device: torch.device) -> Chunks:
    """Chunk layout for `batch` sequences of `seqlen` steps, or for the packed sequences of `cu_seqlens`,
    which must bound all `batch * seqlen` tokens (a bound past them would send the kernels out of bounds).
    Layouts are cached per shape and device (they cost host time on every call otherwise), except while a CUDA
    graph is captured: its tensors would hold nothing until a replay."""
    capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
    if cu_seqlens is None:
        if capturing:
            return _build_fixed_chunks(batch, seqlen, size, device)
        return _cached_fixed_chunks(batch, seqlen, size, _device_key(device))
    if capturing:
        return _build_packed_chunks(cu_seqlens, batch, seqlen, size, device)
    # Every layer of a model gets the same cu_seqlens tensor (the token layout's): build its layout once, not once
    # per layer and pass, each a host sync. Kept while the tensor lives and is not written in place.
    key = (batch, seqlen, size, _device_key(device), version(cu_seqlens))
    held = _PACKED.get(id(cu_seqlens))
    if held is None or held[0]() is not cu_seqlens:
        held = _PACKED[id(cu_seqlens)] = (weakref.ref(cu_seqlens), {})
        weakref.finalize(cu_seqlens, _PACKED.pop, id(cu_seqlens), None)
    if key not in held[1]:
        built = _made_for_cache(_build_packed_chunks, cu_seqlens, batch, seqlen, size, device=key[3], shared=False)
        held[1][key] = built
    return held[1][key]


# Packed layouts by the id of their cu_seqlens tensor, with a weak reference to it: an entry goes with its tensor.
# (Not a WeakKeyDictionary: its lookups compare tensors with ==, which is elementwise.)
_PACKED: dict[int, tuple[weakref.ref, dict]] = {}


def _build_packed_chunks(cu_seqlens: Tensor, batch: int, seqlen: int, size: int, device: torch.device) -> Chunks:
    """Chunk layout of the packed sequences of `cu_seqlens` (checked to bound all `batch * seqlen` tokens)."""
    bounds = host_bounds(cu_seqlens)  # the grids need the chunk count (a host sync unless the host made them)
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if cu_seqlens.dim() != 1 or not bounds or bounds[0] != 0 or bounds[-1] != batch * seqlen or min(lengths, default=0) < 0:
        shown = bounds if len(bounds) <= 8 else [*bounds[:4], "...", *bounds[-3:]]
        raise ValueError(
            f"cu_seqlens must be a 1-d tensor rising from 0 to the {batch * seqlen} tokens of the batch, got "
            f"{shown} (shape {tuple(cu_seqlens.shape)})"
        )
    counts = [cdiv(n, size) for n in lengths]
    pairs = [(n, c) for n, count in enumerate(counts) for c in range(count)]
    return Chunks(
        cu_seqlens=cu_seqlens.to(device=device, dtype=torch.int32).contiguous(),
        indices=to_device([i for pair in pairs for i in pair], torch.int32, device).view(-1, 2),
        offsets=to_device([0, *accumulate(counts)][:-1], torch.int32, device),
        num_seqs=len(lengths),
        num_chunks=len(pairs),
        size=size,
        max_len=max(lengths, default=0),
    )


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (0 elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def seq_bounds(cu_seqlens, i_n):
    """(first token as int64, length) of sequence i_n."""
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    return bos, (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)


@triton.jit
def chunk_bounds(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """For global chunk i_c: (sequence, chunk within it, first token as int64, valid rows in the chunk)."""
    i_n = tl.load(chunk_indices + i_c * 2)
    i_t = tl.load(chunk_indices + i_c * 2 + 1)
    bos, T = seq_bounds(cu_seqlens, i_n)
    return i_n, i_t, bos + i_t * BT, T - i_t * BT


@triton.jit
def key_row(tok, i_h, H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, SK):
    """Offset of token tok's key (or query) for head i_h of H, in [T, HK, K] keys shared by groups of H / HK heads,
    their token rows SK apart (HK * K where contiguous; a view of a wider tensor's columns: Mamba-2's B and C)."""
    return tok * SK + (i_h // (H // HK)) * K


@triton.jit
def load_tile(ptr, r0, nr, sr, c0, nc, BR: tl.constexpr, BC: tl.constexpr):
    """[BR, BC] tile at (r0, c0) of an [nr, nc] matrix with row stride sr; zero outside it."""
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    return tl.load(ptr + r[:, None] * sr + c[None, :], mask=(r[:, None] < nr) & (c[None, :] < nc), other=0.0)


@triton.jit
def load_tile_t(ptr, r0, nr, sr, c0, nc, BR: tl.constexpr, BC: tl.constexpr):
    """The same tile as load_tile, loaded transposed: [BC, BR]."""
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    return tl.load(ptr + r[None, :] * sr + c[:, None], mask=(r[None, :] < nr) & (c[:, None] < nc), other=0.0)


@triton.jit
def store_tile(ptr, x, r0, nr, sr, c0, nc, BR: tl.constexpr, BC: tl.constexpr):
    """Store the [BR, BC] tile x at (r0, c0) of an [nr, nc] matrix with row stride sr, cast to ptr's type."""
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    tl.store(ptr + r[:, None] * sr + c[None, :], x.to(ptr.dtype.element_ty), mask=(r[:, None] < nr) & (c[None, :] < nc))


@triton.jit
def load_vec(ptr, r0, nr, sr, BR: tl.constexpr):
    """[BR] vector at r0 of an [nr] vector with stride sr; zero outside it."""
    r = r0 + tl.arange(0, BR)
    return tl.load(ptr + r * sr, mask=r < nr, other=0.0)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """fp32-accumulated a @ b with both operands in a's dtype."""
    return tl.dot(a, b.to(a.dtype), input_precision=PREC)


@triton.jit
def masked_exp(x, keep):
    """exp(x) where keep, else 0; selecting (not multiplying) keeps inf * 0 out."""
    return tl.where(keep, tl.exp(tl.where(keep, x, 0.0)), 0.0)


@triton.jit
def rev_cumsum(x, axis: tl.constexpr):
    """Inclusive reverse cumulative sum along axis."""
    return tl.sum(x, axis, keep_dims=True) - tl.cumsum(x, axis) + x


@triton.jit
def ref_row(nr, BT: tl.constexpr):
    """Reference step of a chunk for GLA's factored scores: the middle of its valid steps."""
    return (tl.minimum(nr, BT) - 1) // 2


@jit
def _cumsum_kernel(g, b, span, cu_seqlens, chunk_indices,
                   H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, SPAN: tl.constexpr):  # fmt: skip
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, _, tok, nr = chunk_bounds(cu_seqlens, chunk_indices, i_c, BT)
    off = (tok * H + i_h) * D
    cum = tl.cumsum(load_tile(g + off, 0, nr, H * D, 0, D, BT, BD).to(tl.float32), 0)
    store_tile(b + off, cum, 0, nr, H * D, 0, D, BT, BD)
    if SPAN:
        rows = tl.arange(0, BT)
        ref = tl.sum(tl.where((rows == ref_row(nr, BT))[:, None], cum, 0.0), 0)
        keep = (rows < nr)[:, None] & (tl.arange(0, BD) < D)[None, :]
        tl.store(span + i_c.to(tl.int64) * H + i_h, tl.max(tl.max(tl.where(keep, tl.abs(cum - ref[None, :]), 0.0), 1), 0))


def chunk_cumsum(g: Tensor, chunks: Chunks) -> Tuple[Tensor, Optional[Tensor]]:
    """Chunk-local inclusive cumulative sum b of a log decay g [1, T, H] or [1, T, H, K], fp32; for per-key
    decays also each chunk's span [NT, H]: max |b_t - b_ref| over its steps and channels (see ref_row)."""
    heads, dim = g.shape[2], (g.shape[3] if g.dim() == 4 else 1)
    b = empty(g.shape, torch.float32, g.device)
    span = empty((chunks.num_chunks, heads), torch.float32, g.device) if g.dim() == 4 else None
    if chunks.num_chunks:
        _cumsum_kernel[(chunks.num_chunks, heads)](
            g, b, span, chunks.cu_seqlens, chunks.indices, heads, dim, chunks.size, pow2(dim, 1), span is not None
        )
    return b, span


def span_limit(dtype: torch.dtype) -> float:
    """Largest chunk span (chunk_cumsum) for which GLA's scores are taken as one factored matmul: the factors
    exp(b_t - b_ref) and exp(b_ref - b_s) stay below exp(limit) in the dtype the matmul reads."""
    return 4.0 if dtype == torch.float16 else 30.0
