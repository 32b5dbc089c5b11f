"""compile_sm90.py's register report: a kernel compiled for Hopper without a GPU, with the alignment hints a launch gives."""

import json
import sys
from pathlib import Path

import pytest

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parent))
import compile_sm90  # noqa: E402


@triton.jit
def _copy(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)


def _ptx(hinted: list[str]) -> str:
    source = ASTSource(_copy, {"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024},
                       compile_sm90.divisible(_copy, hinted))  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


def test_compile_sm90_reports_registers_of_the_build_a_launch_gets():
    # The 16-byte alignment and multiple-of-16 hints Triton's JIT gives a launch's arguments: with them the copy loads
    # four floats an instruction, without them one (the H100's register counts matched only with the hints).
    hinted, plain = _ptx(["x", "y", "n"]), _ptx([])
    assert "ld.global.v4" in hinted and "ld.global.v4" not in plain
    usage = compile_sm90.ptxas_usage(hinted, 90)
    registers = int(usage.split()[1].rstrip(","))
    assert 0 < registers <= 255 and usage.endswith("spill stores 0 B"), usage


def test_compile_sm90_names_an_only_kernel_no_launch_recorded(tmp_path):
    path = tmp_path / "launches.json"
    path.write_text(json.dumps([{"module": "m", "name": "_fwd_h_kernel", "sig": {}, "cx": {}, "opts": {}, "div16": []}]))
    with pytest.raises(SystemExit, match="--only _bwd_dqk: no such kernel launched by these --kernels; launched: _fwd_h_kernel"):
        compile_sm90.compile_all(str(path), 90, only=["_bwd_dqk"])
