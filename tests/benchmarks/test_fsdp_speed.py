"""benchmarks/fsdp_speed.py at tiny sizes on the CPU (gloo, one rank): its command line and the records it writes."""

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fsdp_speed_smoke_writes_every_field(script, tmp_path):
    script("fsdp_speed", "--device", "cpu", "--models", "hybrid_1b", "--variants", "plain", "fsdp_ckpt_offload",
           "--warmup", "0", "--iters", "1", "--out", str(tmp_path / "fsdp"))  # fmt: skip
    records = json.loads((tmp_path / "fsdp.json").read_text())["records"]
    assert [(r["model"], r["variant"], r["checkpoint"], r["offload"]) for r in records] == [
        ("hybrid_1b", "plain", False, False), ("hybrid_1b", "fsdp_ckpt_offload", True, True)]
    for r in records:
        assert "note" not in r, r["note"]
        assert r["tok_s"] > 0 and r["ms"] > 0 and r["T"] == 64 and r["B"] == 2 and r["device"] == "cpu"
    assert records[1]["loss0"] == pytest.approx(records[0]["loss0"], abs=0.05)  # bf16 weights vs fp32 on the CPU
    assert records[0]["vs_plain"] == 1 and records[1]["vs_plain"] == pytest.approx(records[1]["tok_s"] / records[0]["tok_s"])
    assert "| hybrid_1b |" in (tmp_path / "fsdp.md").read_text()


def test_fsdp_speed_defaults_are_the_issue_s_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from fsdp_speed import MODELS, parse_args

    args = parse_args([])
    assert args.T == [4096] and args.tokens == 16384 and args.models == ["lm_gla", "hybrid_1b"] and len(args.variants) == 5
    _, shape = MODELS["hybrid_1b"]
    assert (shape.dim, shape.depth) == (2048, 24)
