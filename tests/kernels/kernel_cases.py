"""Helpers of the kernel tests: random inputs for every kind of linear recurrence, a forward+backward
runner and error measures (shared with the GPU tests), and mmeff.kernels built for the Triton interpreter.

TRITON_INTERPRET must be set when the kernels are decorated, i.e. when mmeff.kernels is imported, so
`interpreted_kernels` imports the package with it set, on a private import of Triton: Triton's own jit
functions (tl.sum, tl.zeros, ...) are decorated when triton.language is imported, and the interpreter
patches triton.language in place, which would break compiling real kernels later in the same process.
On exit the process's own modules and environment are restored, so the rest of the suite (GPU tests
included) runs as if the interpreter had not.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# kind -> (log decay: none, per head or per key channel; delta rule)
KINDS: Dict[str, Tuple[Optional[str], bool]] = {
    "linear_attention": (None, False),
    "scalar_decay": ("head", False),
    "gla": ("key", False),
    "delta_rule": (None, True),
    "gated_delta_rule": ("head", True),
}


def make_inputs(
    kind: str,
    batch: int,
    seqlen: int,
    heads: int,
    dk: int,
    dv: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    num_states: Optional[int] = None,
    gates: str = "strong",
) -> Dict[str, Optional[Tensor]]:
    """q, k, v (and beta) in dtype, log_decay and initial_state ([num_states or batch, H, K, V]) in fp32.

    Log decays, x standard normal: "strong": logsigmoid(4 x), from about -20 to ~0, and -100 (state wiped)
    at one step in ten, so a chunk's gate cumsum reaches -1000s, far past exp's fp32 range; "mild":
    logsigmoid(x) / 16 as in GLA (every chunk within the kernels' span limit); "mixed": mild, with the wipes
    of "strong" in the second half of the steps only (chunks on both of GLA's paths in one call).
    """
    decay, delta = KINDS[kind]
    if gates not in ("strong", "mild", "mixed"):
        raise ValueError(f"gates must be 'strong', 'mild' or 'mixed', got {gates!r}")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    k = randn(batch, seqlen, heads, dk)
    inputs: Dict[str, Optional[Tensor]] = {
        "q": randn(batch, seqlen, heads, dk),
        "k": F.normalize(k, dim=-1) if delta else k,
        "v": randn(batch, seqlen, heads, dv),
        "log_decay": None,
        "beta": torch.sigmoid(randn(batch, seqlen, heads)) if delta else None,
    }
    if decay is not None:
        shape = (batch, seqlen, heads) if decay == "head" else (batch, seqlen, heads, dk)
        wipe = torch.rand(*shape, generator=gen) < 0.1
        if gates == "strong":
            inputs["log_decay"] = F.logsigmoid(4 * randn(*shape)).masked_fill(wipe, -100.0)
        else:
            wipe[:, : seqlen // 2] = False
            inputs["log_decay"] = (F.logsigmoid(randn(*shape)) / 16).masked_fill(wipe & (gates == "mixed"), -100.0)
    inputs["initial_state"] = randn(num_states or batch, heads, dk, dv)
    low = {"q", "k", "v", "beta"}
    return {
        n: None if t is None else t.to(device=device, dtype=dtype if n in low else torch.float32)
        for n, t in inputs.items()
    }


def forward_backward(
    fn: Callable[..., Tuple[Tensor, Optional[Tensor]]],
    inputs: Dict[str, Optional[Tensor]],
    *,
    scale: float = 0.5,
    upcast: bool = False,
    **kwargs: object,
) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """Output, final state and the gradients of every input of a fixed random loss of both; upcast runs
    fn on fp32 copies (for a reference)."""
    leaves = {
        n: (t.float() if upcast else t).detach().clone().requires_grad_() for n, t in inputs.items() if t is not None
    }
    o, state = fn(**{**dict.fromkeys(inputs), **leaves}, scale=scale, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=gen).to(state.device)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, state, dict(zip(leaves, grads))


@contextmanager
def saved_bytes() -> Iterator[Dict[int, int]]:
    """Inside: at exit {data pointer: bytes} of every storage autograd keeps a tensor of for the backward
    (mmeff.ops.recompute.saved_storages)."""
    from mmeff.ops.recompute import saved_storages

    kept: Dict[int, int] = {}
    with saved_storages() as found:
        yield kept
    kept.update((ptr, t.untyped_storage().nbytes()) for ptr, t in found.items())


def _mixer_step(mixer: torch.nn.Module, x0: Tensor, layout: Any) -> Tuple[Tensor, list, int]:
    """(output, gradients of x and every parameter, bytes of the storages autograd kept) of one forward (bf16 autocast)
    and backward of a token mixer on x0 laid out as `layout`."""
    x = x0.clone().requires_grad_()
    with saved_bytes() as kept, torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x, layout=layout)
    y.float().square().sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in mixer.parameters())]
    mixer.zero_grad(set_to_none=True)
    return y.detach(), grads, sum(kept.values())


def bytes_made_again(monkeypatch: Any, mixer: torch.nn.Module, x0: Tensor, layout: Any, *recomputed_at: str) -> int:
    """Bytes a mixer's step keeps fewer with its `recomputed` / `recomputed_output` (imported as each of
    `recomputed_at`) than with stand-ins that make nothing again, on the Triton path (interpreted); its output and
    every gradient checked bit for bit equal."""
    from mmeff.ops import dispatch, recompute

    keeping = {
        recompute.recomputed: lambda recipes: contextlib.nullcontext(),
        recompute.recomputed_output: lambda make, inputs: (make(*inputs), None),
    }
    monkeypatch.setattr(dispatch, "on_cuda", lambda x: True)
    made = _mixer_step(mixer, x0, layout)
    with monkeypatch.context() as m:
        for name in recomputed_at:
            module, attr = name.rsplit(".", 1)
            m.setattr(name, keeping[getattr(importlib.import_module(module), attr)])
        kept = _mixer_step(mixer, x0, layout)
    assert torch.equal(kept[0], made[0])
    assert all(torch.equal(a, b) for a, b in zip(kept[1], made[1]))
    return kept[2] - made[2]


def wy_made_again(kernels: ModuleType, inputs: Dict[str, Optional[Tensor]], cu_seqlens: Optional[Tensor],
                  chunk_size: int) -> Tuple[Tensor, Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:  # fmt: skip
    """(X, the forward's w and u, wy_again's w and u from X) of the delta rule's WY pieces of packed `inputs`."""
    k, v, g = inputs["k"], inputs["v"], inputs["log_decay"]
    chunks = kernels.utils.make_chunks(cu_seqlens, 1, k.shape[1], chunk_size, k.device)
    b = None if g is None else kernels.utils.chunk_cumsum(g, chunks)[0]
    gate = (kernels.utils.NO_GATE if g is None else kernels.utils.SCALAR_GATE).value
    X, w, u = kernels.chunk_delta.wy_fwd(k, v, b, inputs["beta"], chunks, gate)
    return X, (w, u), kernels.chunk_delta.wy_again(k, v, b, inputs["beta"], X, chunks, gate)


def max_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| relative to max(1, max |expected|)."""
    expected = expected.float()
    return ((actual.float() - expected).abs().max() / expected.abs().max().clamp(min=1)).item()


def norm_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| (NaN anywhere gives NaN, so a failed comparison)."""
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def compare(
    got: Tuple[Tensor, Tensor, Dict[str, Tensor]],
    ref: Tuple[Tensor, Tensor, Dict[str, Tensor]],
    error: Callable[[Tensor, Tensor], float],
    skip: Sequence[str] = (),
) -> Dict[str, float]:
    """Error of the output, the final state and each gradient."""
    errors = {"o": error(got[0], ref[0]), "final_state": error(got[1], ref[1])}
    errors.update({f"d{n}": error(got[2][n], ref[2][n]) for n in ref[2] if n not in skip})
    return errors


def _take_modules(*packages: str) -> Dict[str, ModuleType]:
    """Remove the imported Python modules of packages from sys.modules and return them; Triton's compiled
    extension (triton._C) stays, shared by both imports."""
    names = [
        n
        for n in sys.modules
        if any(n == p or n.startswith(p + ".") for p in packages) and not n.startswith("triton._C")
    ]
    return {n: sys.modules.pop(n) for n in names}


def _patch_language_once(interpreter: ModuleType) -> None:
    """Speed-up (about a third): the interpreter re-applies the same patch to the triton.language modules
    a jit function sees on every call of one; apply it once per set of modules."""
    import triton.language as tl

    original = interpreter._patch_lang
    done: set[frozenset[int]] = set()

    def once(fn: Any) -> None:
        langs = frozenset(id(m) for m in fn.__globals__.values() if m is tl or m is tl.core)
        if langs not in done:
            original(fn)
            done.add(langs)

    interpreter._patch_lang = once


@contextmanager
def interpreted_kernels() -> Iterator[ModuleType]:
    """mmeff.kernels with every kernel run by the Triton interpreter (CPU tensors), on a private import of
    Triton; on exit the process's own Triton and mmeff.kernels modules (if any) are back in place."""
    import mmeff

    saved_env = os.environ.get("TRITON_INTERPRET")
    kept = _take_modules("triton", "mmeff.kernels")
    kept_attr = mmeff.__dict__.pop("kernels", None)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _patch_language_once(importlib.import_module("triton.runtime.interpreter"))
        yield importlib.import_module("mmeff.kernels")
    finally:
        _take_modules("triton", "mmeff.kernels")
        sys.modules.update(kept)
        mmeff.__dict__.pop("kernels", None)
        if kept_attr is not None:
            mmeff.kernels = kept_attr
        if saved_env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
