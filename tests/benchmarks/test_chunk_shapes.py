"""benchmarks/chunk_shapes.py on the CPU: every op at the smoke sizes, its records, and the gradient comparison."""

import json

import pytest


def test_chunk_shapes_smoke_writes_each_op_and_compares_two_builds(script, tmp_path, capsys):
    script("chunk_shapes", "--device", "cpu", "--shapes", "smoke", "--grads", str(tmp_path / "a"), "--out-dir",
           str(tmp_path), "--warmup", "0", "--reps", "1")  # fmt: skip
    data = json.loads((tmp_path / "chunk_shapes_cpu.json").read_text())
    assert [r["op"] for r in data["records"]] == ["gla", "retention", "gated_delta_rule", "ssd"]
    assert all(r["ms"] > 0 and "kernels" not in r for r in data["records"])  # no GPU kernels on the CPU
    assert "| ssd | 2 x 40 | 4 | 16 | 16 |" in (tmp_path / "chunk_shapes_cpu.md").read_text()
    capsys.readouterr()
    script("chunk_shapes", "--compare", str(tmp_path / "a"), str(tmp_path / "a"))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["case"] for r in rows} == {"gla_2x40", "retention_2x40", "gated_delta_rule_2x40", "ssd_2x40"}
    assert all(e == 0.0 for r in rows for e in r["rel_err"]) and len(rows[0]["rel_err"]) == 5  # gated_delta_rule's 5
    script("chunk_shapes", "--device", "cpu", "--shapes", "smoke", "--ops", "gla", "--out-dir", str(tmp_path),
           "--warmup", "0", "--reps", "1")  # fmt: skip
    records = json.loads((tmp_path / "chunk_shapes_cpu.json").read_text())["records"]
    assert len(records) == 5 and len({r["run"] for r in records}) == 2  # the first run's records kept
    assert (tmp_path / "chunk_shapes_cpu.md").read_text().count("| op | B x T |") == 2


def test_chunk_shapes_names_a_case_missing_from_the_other_build(script, tmp_path):
    script("chunk_shapes", "--device", "cpu", "--shapes", "smoke", "--ops", "ssd", "--grads", str(tmp_path / "a"),
           "--out-dir", str(tmp_path), "--warmup", "0", "--reps", "1")  # fmt: skip
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit, match="ssd_2x40.pt missing"):
        script("chunk_shapes", "--compare", str(tmp_path / "a"), str(tmp_path / "b"))
    with pytest.raises(SystemExit, match="--ops mlp"):
        script("chunk_shapes", "--device", "cpu", "--shapes", "smoke", "--ops", "mlp")
