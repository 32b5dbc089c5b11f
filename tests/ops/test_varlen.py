"""Packed documents at the op level: boundaries from document ids, and every op on packed documents equal to the
same op on each document alone (outputs, final states and every gradient), on the PyTorch paths.

Tolerance: max |packed - separate| <= 1e-4 * max(1, max |separate|) (fp32).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmeff import ops
from mmeff.blocks import Layout
from mmeff.ops.varlen import cu_seqlens_from_docs, cu_seqlens_to, doc_bounds, doc_runs, host_bounds, seq_idx_from_cu_seqlens

LENGTHS = [5, 17, 1, 9]  # one single-token document
MODES = ["chunk", "recurrent"]


def _close(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= 1e-4 * max(1.0, expected.abs().max().item()), err


def test_boundaries_from_docs():
    docs = torch.tensor([[3, 3, 4, 4, 3], [7, 7, 7, 7, 7], [0, 1, 2, 2, 2]])
    # A document starts at each row start and each change of id; an id that comes back is a new document.
    assert cu_seqlens_from_docs(docs).tolist() == [0, 2, 4, 5, 10, 11, 12, 15]
    assert cu_seqlens_from_docs(docs).dtype == torch.int32
    assert doc_runs(docs).tolist() == [[0, 0, 1, 1, 2], [0] * 5, [0, 1, 2, 2, 2]]
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)  # an empty sequence in the middle
    assert seq_idx_from_cu_seqlens(cu, 5).tolist() == [0, 0, 2, 2, 2]
    with pytest.raises(ValueError, match=r"docs must be integer document ids \[B, T\], got torch.float32"):
        cu_seqlens_from_docs(torch.zeros(2, 3))


def test_host_bounds_come_from_the_host_until_the_tensor_is_written(monkeypatch):
    docs = torch.tensor([[3, 3, 4, 4, 3], [7, 7, 7, 7, 7]])
    bounds = doc_bounds(docs)
    assert bounds == (0, 2, 4, 5, 10)
    layout = Layout(docs=docs, bounds=bounds)
    cu = layout.cu_seqlens
    assert cu.dtype == torch.int32 and cu.tolist() == cu_seqlens_from_docs(docs).tolist()
    read = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: read.append(t) or [-1])
    assert host_bounds(cu) == list(bounds) and layout.host_bounds == bounds and not read  # never read back
    cu.add_(0)  # written in place: read again
    assert host_bounds(cu) == [-1] and len(read) == 1
    monkeypatch.undo()
    with torch.inference_mode():
        frozen = cu_seqlens_to([0, 3], "cpu")
    assert host_bounds(frozen) == [0, 3]
    with pytest.raises(ValueError, match=r"document bounds must rise from 0, got \[0, 4, 2\]"):
        cu_seqlens_to([0, 4, 2], "cpu")
    with pytest.raises(ValueError, match=r"Layout.bounds must end at the 10 tokens of docs \(2, 5\), got 3 bounds ending at 9"):
        Layout(docs=docs, bounds=(0, 4, 9))
    with pytest.raises(ValueError, match=r"document bounds must rise from 0, got \[0, 7, 3, 10\]"):
        Layout(docs=docs, bounds=(0, 7, 3, 10))
    with pytest.raises(ValueError, match="Layout.bounds describe the documents of Layout.docs, which is None"):
        Layout(bounds=(0, 4))


def _packed_vs_separate(
    run: Callable[..., tuple], inputs: Dict[str, Tensor], time_dim: Dict[str, int], states: List[str], lengths=LENGTHS
) -> None:
    """run(inputs, cu_seqlens or None) -> (out, final state); inputs with a time axis (time_dim) are split per
    document, `states` ([N, ...]) per sequence; compares outputs, states and all gradients."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    gen = torch.Generator().manual_seed(9)

    leaves = {n: t.detach().clone().requires_grad_(t.is_floating_point()) for n, t in inputs.items()}
    out, state = run(leaves, cu)
    w_out, w_state = torch.randn(out.shape, generator=gen), torch.randn(state.shape, generator=gen)
    ((out * w_out).sum() + (state * w_state).sum()).backward()

    outs, finals, grads = [], [], {n: [] for n in leaves}
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {}
        for n, t in inputs.items():
            if n in time_dim:
                part[n] = t.narrow(time_dim[n], start, end - start)
            elif n in states:
                part[n] = t[i : i + 1]
            else:
                part[n] = t
        part = {n: t.detach().clone().requires_grad_(t.is_floating_point()) for n, t in part.items()}
        o, s = run(part, None)
        ((o * w_out.narrow(time_dim["out"], start, end - start)).sum() + (s * w_state[i : i + 1]).sum()).backward()
        outs.append(o)
        finals.append(s)
        for n, t in part.items():
            grads[n].append(t.grad)
    _close(out, torch.cat(outs, time_dim["out"]))
    _close(state, torch.cat(finals))
    for n, leaf in leaves.items():
        if not leaf.requires_grad:
            continue
        if n in time_dim:
            _close(leaf.grad, torch.cat(grads[n], time_dim[n]))
        elif n in states:
            _close(leaf.grad, torch.cat(grads[n]))
        else:
            _close(leaf.grad, sum(grads[n]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["linear_attention", "retention", "gated_linear_attention", "delta_rule", "gated_delta_rule"])
def test_linear_ops_packed(op: str, mode: str):
    gen = torch.Generator().manual_seed(1)
    T, H, K, V = sum(LENGTHS), 2, 8, 4
    inputs = {
        "q": torch.randn(1, T, H, K, generator=gen),
        "k": F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1),
        "v": torch.randn(1, T, H, V, generator=gen),
        "initial_state": torch.randn(len(LENGTHS), H, K, V, generator=gen),
    }
    extra = {
        "retention": {"log_decay": -torch.rand(H, generator=gen)},
        "gated_linear_attention": {"log_g": F.logsigmoid(torch.randn(1, T, H, K, generator=gen))},
        "delta_rule": {"beta": torch.rand(1, T, H, generator=gen)},
        "gated_delta_rule": {
            "log_g": F.logsigmoid(torch.randn(1, T, H, generator=gen)),
            "beta": torch.rand(1, T, H, generator=gen),
        },
    }.get(op, {})  # fmt: skip
    time_dim = {n: 1 for n in ("q", "k", "v", "beta", "out")} | ({"log_g": 1} if "log_g" in extra else {})

    def run(x: Dict[str, Tensor], cu_seqlens) -> tuple:
        return getattr(ops, op)(**x, mode=mode, chunk_size=8, output_final_state=True, cu_seqlens=cu_seqlens)

    _packed_vs_separate(run, inputs | extra, time_dim, ["initial_state"])


@pytest.mark.parametrize("mode", MODES)
def test_ssd_packed(mode: str):
    gen = torch.Generator().manual_seed(2)
    T, H, P, G, N = sum(LENGTHS), 4, 4, 2, 8
    inputs = {
        "x": torch.randn(1, T, H, P, generator=gen),
        "dt": torch.randn(1, T, H, generator=gen),
        "A": -torch.rand(H, generator=gen) - 0.2,
        "B": torch.randn(1, T, G, N, generator=gen),
        "C": torch.randn(1, T, G, N, generator=gen),
        "D": torch.randn(H, generator=gen),
        "z": torch.randn(1, T, H, P, generator=gen),
        "dt_bias": torch.randn(H, generator=gen),
        "initial_states": torch.randn(len(LENGTHS), H, P, N, generator=gen),
    }

    def run(x: Dict[str, Tensor], cu_seqlens) -> tuple:
        return ops.ssd(**x, dt_softplus=True, chunk_size=8, return_final_states=True, mode=mode, cu_seqlens=cu_seqlens)

    _packed_vs_separate(run, inputs, {n: 1 for n in ("x", "dt", "B", "C", "z", "out")}, ["initial_states"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bc", ["dn", "bnt", "bgnt"])
def test_selective_scan_packed(mode: str, bc: str):
    gen = torch.Generator().manual_seed(3)
    T, Dm, N, G = sum(LENGTHS), 4, 8, 2
    shape = {"dn": (Dm, N), "bnt": (1, N, T), "bgnt": (1, G, N, T)}[bc]
    inputs = {
        "u": torch.randn(1, Dm, T, generator=gen),
        "delta": torch.randn(1, Dm, T, generator=gen),
        "A": -torch.rand(Dm, N, generator=gen) - 0.2,
        "B": torch.randn(*shape, generator=gen),
        "C": torch.randn(*shape, generator=gen),
        "D": torch.randn(Dm, generator=gen),
        "z": torch.randn(1, Dm, T, generator=gen),
        "delta_bias": torch.randn(Dm, generator=gen),
        "initial_state": torch.randn(len(LENGTHS), Dm, N, generator=gen),
    }
    time_dim = {"u": 2, "delta": 2, "z": 2, "out": 2} | ({} if bc == "dn" else {"B": len(shape) - 1, "C": len(shape) - 1})

    def run(x: Dict[str, Tensor], cu_seqlens) -> tuple:
        return ops.selective_scan(**x, delta_softplus=True, return_last_state=True, mode=mode, chunk_size=8,
                                  cu_seqlens=cu_seqlens)  # fmt: skip

    _packed_vs_separate(run, inputs, time_dim, ["initial_state"])


def test_ssd_packed_errors():
    x = torch.randn(2, 6, 2, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[N\+1\] with batch size 1"):
        ops.ssd(x, torch.rand(2, 6, 2), -torch.rand(2), torch.randn(2, 6, 1, 4), torch.randn(2, 6, 1, 4),
                cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match=r"initial_state must be \[N,H,K,V\] with N = 2 sequences"):
        ops.ssd(x[:1], torch.rand(1, 6, 2), -torch.rand(2), torch.randn(1, 6, 1, 4), torch.randn(1, 6, 1, 4),
                initial_states=torch.randn(3, 2, 4, 4), cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))  # fmt: skip


@pytest.mark.parametrize("width", [4, 2])
@pytest.mark.parametrize("with_prev", [False, True])
def test_causal_conv1d_docs(width: int, with_prev: bool):
    # Two rows of packed documents (one of a single token, one id coming back later in a row): each document
    # run alone; `prev` continues only the first document of each row.
    gen = torch.Generator().manual_seed(4)
    docs = torch.tensor([[1, 1, 1, 2, 3, 3, 3, 3, 1, 1], [0] * 6 + [5] * 4])
    C = 6
    x, weight, bias = torch.randn(2, 10, C, generator=gen), torch.randn(C, width, generator=gen), torch.randn(C, generator=gen)
    prev = torch.randn(2, C, width - 1, generator=gen) if with_prev else None
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = ops.causal_conv1d(*leaves, prev=prev, docs=docs)
    w_y = torch.randn(y.shape, generator=gen)
    (y * w_y).sum().backward()

    parts = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected = torch.empty_like(y)
    cu = cu_seqlens_from_docs(docs).tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        row, s, e = start // 10, start % 10, (end - 1) % 10 + 1
        history = prev[row : row + 1] if with_prev and s == 0 else None
        expected[row, s:e] = ops.causal_conv1d(parts[0][row : row + 1, s:e], parts[1], parts[2], prev=history)[0]
    (expected * w_y).sum().backward()
    _close(y, expected)
    for leaf, part in zip(leaves, parts):
        _close(leaf.grad, part.grad)
    with pytest.raises(ValueError, match=r"docs must be \[B, T\] = \(2, 10\), got \(2, 9\)"):
        ops.causal_conv1d(x, weight, docs=docs[:, :9])
