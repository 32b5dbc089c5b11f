"""Compile every Triton kernel launch of mmeff.kernels for Hopper (sm90) on a machine without a GPU.

The interpreter accepts code that compiled Triton rejects (e.g. a `tl.static_range` bound that is not a
constexpr, globals that are not `tl.constexpr`). This script runs the kernels' entry points (the recurrence, the
short conv, the grid conv, non-causal linear attention, the bidirectional GLA forward; `--kernels` picks some) under `TRITON_INTERPRET=1` at small
sizes, records the signature and constexprs of each distinct
launch, then compiles each one in a second process with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`.
Slow (minutes: ptxas runs for every variant), hence a script and not part of `make test`:

    python tests/kernels/compile_sm90.py [--arch 90] [--kernels recurrence grouped conv conv2d noncausal]
    python tests/kernels/compile_sm90.py --kernels recurrence --only _bwd_dqk_kernel --registers

`--registers` prints what ptxas reports for each build: registers a thread and spilled bytes, which set how many
programs share an SM. Each build gets the alignment hints Triton's JIT gives a launch (16-byte aligned tensors,
integers that are multiples of 16); with them and the GPU machine's Triton (3.6: `pip install --no-deps --target DIR
triton==3.6.0`, then `PYTHONPATH=DIR`) the counts equal the H100's own for GLA's backward at K = V = 64 (2026-12-07:
255 registers and 49,152 B of shared memory with dv in the same program, 121 in key tiles of 32, 128 for
`_gla_dv_kernel`; without the hints 202 and 255). The local Triton 3.5 gives other counts.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64"}


KERNELS = ("recurrence", "grouped", "conv", "conv2d", "noncausal", "bidirectional")


def record(out: str, kernels: list[str]) -> None:
    """Run fwd+bwd of the kernel kinds under the interpreter; write each distinct launch to `out` (JSON)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[tuple, dict] = {}

    def note(fn_wrapper: InterpretedFunction, args: tuple, kwargs: dict) -> None:
        fn = fn_wrapper.fn
        names = list(fn_wrapper.arg_names)
        bound = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
        consts = {p.name for p in inspect.signature(fn).parameters.values() if "constexpr" in str(p.annotation)}
        sig, cx, div16 = {}, {}, []
        for n in names:
            v = bound.get(n)
            if isinstance(v, torch.Tensor):
                sig[n] = "*" + DTYPES[str(v.dtype).removeprefix("torch.")]
                div16 += [n] if v.data_ptr() % 16 == 0 else []
            elif v is None or n in consts or isinstance(v, bool) or not isinstance(v, (int, float)):
                sig[n], cx[n] = "constexpr", getattr(v, "value", v)
            else:
                sig[n] = "fp32" if isinstance(v, float) else "i32"
                div16 += [n] if isinstance(v, int) and v % 16 == 0 else []
        opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
        key = (fn.__module__, fn.__qualname__, json.dumps(sig, sort_keys=True), json.dumps(cx, sort_keys=True, default=str))
        launches.setdefault(key, {"module": fn.__module__, "name": fn.__qualname__, "sig": sig, "cx": cx, "opts": opts,
                                  "div16": div16})  # fmt: skip

    init, getitem = InterpretedFunction.__init__, InterpretedFunction.__getitem__

    def patched_init(self, fn, **kw):
        init(self, fn, **kw)
        run = self.run
        self.run = lambda *a, **k: (note(self, a, k), run(*a, **k))[1]

    def patched_getitem(self, grid):
        launch = getitem(self, grid)
        return lambda *a, **k: (note(self, a, k), launch(*a, **k))[1]

    InterpretedFunction.__init__, InterpretedFunction.__getitem__ = patched_init, patched_getitem
    from mmeff.kernels import linear_recurrence_triton

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16) if "recurrence" in kernels else ():
        for gate in ("none", "head", "key"):
            for delta in (False, True):
                if gate == "key" and delta:
                    continue  # the chunk path falls back to PyTorch; the fused recurrent kernel covers it below
                # GLA's keys of 32 (the ViT-S GLA's: one tile), 64 and 128 take key tiles in the backward
                # (chunk_o.GLA_KEY_TILE) and _gla_dv_kernel
                for T, K in ((80, 64), (8, 64), *([(80, 128), (80, 32)] if gate == "key" else [])):
                    grad = T > 16  # chunked fwd+bwd, and the fused recurrent kernel (short, no grad)
                    q, k = (torch.randn(2, T, 2, K, dtype=dtype, requires_grad=grad) for _ in range(2))
                    v = torch.randn(2, T, 2, 64, dtype=dtype, requires_grad=grad)
                    g = None if gate == "none" else -torch.rand(2, T, 2, *([K] if gate == "key" else []))
                    beta = torch.rand(2, T, 2) if delta else None
                    h0 = torch.randn(2, 2, K, 64)
                    for t in (g, beta, h0):
                        if t is not None:
                            t.requires_grad_(grad)
                    o, ht = linear_recurrence_triton(q, k, v, g, beta, 0.125, h0, True)
                    if grad:
                        (o.float().sum() + ht.sum()).backward()
    from mmeff.kernels import chunk_o

    # q and k shared by a group of heads under a scalar gate (Mamba-2's SSD): at real sizes a program takes a group's
    # heads (`_dqk_group`, GH > 1) once there are enough chunks; at these sizes only with GROUP_PROGRAMS at 1. The
    # ViT's mamba2-bi (state 64, 12 heads a group) and the LM's mamba2 (state 128, 8 heads a program).
    programs, chunk_o.GROUP_PROGRAMS = chunk_o.GROUP_PROGRAMS, 1
    for dtype in (torch.float32, torch.bfloat16) if "grouped" in kernels else ():
        for K, heads in ((64, 12), (128, 8)):
            q, k = (torch.randn(1, 80, 1, K, dtype=dtype, requires_grad=True) for _ in range(2))
            v = torch.randn(1, 80, heads, 64, dtype=dtype, requires_grad=True)
            g = (-torch.rand(1, 80, heads)).requires_grad_()
            o, _ = linear_recurrence_triton(q, k, v, g, None, 0.125)
            o.float().sum().backward()
    chunk_o.GROUP_PROGRAMS = programs
    from mmeff.kernels.conv import CausalConv

    for dtype in (torch.float32, torch.bfloat16) if "conv" in kernels else ():
        for bias, silu, docs in ((True, True, False), (False, False, False), (True, True, True)):
            x = torch.randn(2, 70, 130, dtype=dtype, requires_grad=True)
            weight = torch.randn(130, 4, requires_grad=True)
            b = torch.randn(130, requires_grad=True) if bias else None
            runs = (torch.arange(70) // 30).expand(2, 70).to(torch.int32) if docs else None
            CausalConv.apply(x, weight, b, silu, runs).float().sum().backward()
    from mmeff.ops.custom_ops import global_linear_attention_op, grid_conv_op

    for dtype in (torch.float32, torch.bfloat16) if "conv2d" in kernels else ():
        for bias in (True, False):
            x = torch.randn(2, 7 * 11, 3 * 70, dtype=dtype)[..., -70:].requires_grad_()
            weight = torch.randn(70, 3, 3, requires_grad=True)
            grid_conv_op(x, weight, torch.randn(70, requires_grad=True) if bias else None, 7, 11).float().sum().backward()
    for dtype in (torch.float32, torch.bfloat16) if "noncausal" in kernels else ():
        for feature_map in ("identity", "elu", "relu"):
            for normalize, dim in ((True, 64), (False, 64), (True, 128)):  # 128: tiles that are not square
                qkv = torch.randn(2, 70, 3 * 2 * dim, dtype=dtype, requires_grad=True)
                q, k, v = (t.unflatten(-1, (2, dim)) for t in qkv.chunk(3, -1))
                global_linear_attention_op(q, k, v, 0.125, normalize, 1e-6, feature_map).float().sum().backward()
    from mmeff.ops.custom_ops import bidirectional_gla_op

    for dtype in (torch.float32, torch.bfloat16) if "bidirectional" in kernels else ():
        for dk, dv in ((32, 64), (64, 128)):  # the ViT-S's heads; the widest the kernels take
            q, k = (torch.rand(2, 130, 2, dk, dtype=dtype) for _ in range(2))  # its own kernels are forward-only
            bidirectional_gla_op(q, k, torch.randn(2, 130, 2, dv, dtype=dtype), -torch.rand(2, 130, 2, dk), 0.125)
    with open(out, "w") as f:
        json.dump(list(launches.values()), f)
    print(f"{len(launches)} distinct launches recorded", flush=True)


def divisible(fn: object, names: list[str]) -> dict:
    """The `tt.divisibility` 16 hints a launch gives its arguments `names` (16-byte aligned tensors, integers that are
    multiples of 16), as Triton's JIT specializes them at run time: without them loads cannot be vectorized."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def ptxas_usage(ptx: str, arch: int) -> str:
    """What Triton's bundled ptxas reports for `ptx` on sm`arch`a: registers a thread and spilled bytes (the
    compiled kernel's own n_regs and n_spills need a GPU's driver to load it)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return f"registers {regs.group(1) if regs else '?'}, spill stores {spills.group(1) if spills else '?'} B"


def compile_all(path: str, arch: int, only: list[str] | None = None, registers: bool = False) -> int:
    """Compile each recorded launch for sm`arch` (`only`: those kernels by name); the number that failed."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    launches = json.load(open(path))
    unknown = sorted(set(only or ()) - {launch["name"] for launch in launches})
    if unknown:
        recorded = " ".join(sorted({launch["name"] for launch in launches}))
        raise SystemExit(f"compile_sm90: --only {' '.join(unknown)}: no such kernel launched by these --kernels; "
                         f"launched: {recorded}")  # fmt: skip
    failed = 0
    for launch in launches:
        if only and launch["name"] not in only:
            continue
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        while not isinstance(fn, JITFunction):  # autotune / heuristics wrappers
            fn = fn.fn
        constants = {(fn.arg_names.index(n),): v for n, v in launch["cx"].items()}
        start = time.time()
        try:
            kernel = triton.compile(
                ASTSource(fn, launch["sig"], constants, divisible(fn, launch["div16"])), target=GPUTarget("cuda", arch, 32),
                options=launch["opts"] or {"num_warps": 4},
            )
            usage = f"; {ptxas_usage(kernel.asm['ptx'], arch)}, {kernel.metadata.num_warps} warps, {launch['cx']}" if registers else ""
            print(f"ok   {launch['name']:22s} {time.time() - start:6.1f}s shared memory {kernel.metadata.shared} B{usage}",
                  flush=True)  # fmt: skip
        except Exception as e:  # report every failing variant, not just the first
            failed += 1
            # The whole chain: a CompilationError's own text ends at the failing call, its cause (the type error) below it.
            print(f"FAIL {launch['name']} {launch['cx']}\n{''.join(traceback.format_exception(e))}", flush=True)
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="kernel kinds (default all)")
    p.add_argument("--only", nargs="+", help="compile only the kernels of these names (e.g. _bwd_dqk_kernel)")
    p.add_argument("--registers", action="store_true", help="also print each build's registers and spills (ptxas -v)")
    p.add_argument("--record-to", help=argparse.SUPPRESS)  # the interpreter phase, in its own process
    args = p.parse_args()
    if args.record_to is None and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the compile phase needs compiled Triton (the recording sets it itself)")
    if args.record_to:
        record(args.record_to, args.kernels)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, __file__, "--record-to", path, "--kernels", *args.kernels], check=True, env=env)
        failed = compile_all(path, args.arch, args.only, args.registers)
    print(f"{failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
